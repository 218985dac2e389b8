"""check_vjp: compare a hand-written VJP with autodiff and with finite differences.

Usable on any user function that has a custom VJP, not only handgrad's ops::

    result = hg.check_vjp(my_op, my_reference, x, w)
    assert result.ok, str(result)

What it checks, each on random inputs the caller supplies and random cotangents it draws:

1. forward: ``op(*args) == reference(*args)``;
2. first order: ``vjp(op)(ct) == vjp(reference)(ct)`` per differentiable argument, and that
   each cotangent has its primal's shape and dtype;
3. finite differences in float64: per element (for small arguments) or along random
   directions, ``(φ(x + εe) − φ(x − εe)) / 2ε`` with ``φ = ⟨ct, op(x)⟩``, against the hand VJP;
4. optionally second order (like PyTorch's ``gradgradcheck``): the gradient of
   ``ψ(x) = ⟨vjp(op)(ct), u⟩`` for a random ``u`` against the reference's;
5. optionally ``vmap`` (like ``check_batched_grad``): the VJP of a 2-example batch under
   ``jax.vmap`` against the reference's VJP example by example.

Integer arguments (labels) are held fixed and not differentiated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from handgrad import tolerances


@dataclass
class Comparison:
    """One comparison of two arrays: the worst absolute error, where, and against what scale."""

    what: str
    max_abs_err: float
    ref_scale: float
    worst_index: tuple[int, ...] | None
    tolerance: tolerances.Tolerance
    ok: bool

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / self.ref_scale if self.ref_scale > 0 else self.max_abs_err

    def __str__(self) -> str:
        where = f" at {self.worst_index}" if self.worst_index is not None else ""
        flag = "ok" if self.ok else "FAIL"
        return (
            f"{self.what}: rel {self.rel_err:.2e} (abs {self.max_abs_err:.2e}{where}; "
            f"tol rtol={self.tolerance.rtol:g} atol={self.tolerance.atol:g}) {flag}"
        )


@dataclass
class CheckResult:
    name: str
    dtype: str
    comparisons: list[Comparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.comparisons)

    def worst(self, prefix: str) -> Comparison | None:
        """The comparison with the largest relative error among those whose name starts so."""
        chosen = [c for c in self.comparisons if c.what.startswith(prefix)]
        return max(chosen, key=lambda c: c.rel_err, default=None)

    def __str__(self) -> str:
        lines = [f"check_vjp({self.name}, {self.dtype}): {'PASS' if self.ok else 'FAIL'}"]
        lines += [f"  {c}" for c in self.comparisons]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  skipped: {s}" for s in self.skipped]
        return "\n".join(lines)

    def __bool__(self) -> bool:  # so `assert check_vjp(...)` reads naturally
        return self.ok


def _compare(what, got, want, tol) -> Comparison:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return Comparison(
            f"{what} (shape {got.shape} != {want.shape})", np.inf, 0.0, None, tol, False
        )
    if got.size == 0:
        return Comparison(what, 0.0, 0.0, None, tol, True)
    finite = np.isfinite(got) & np.isfinite(want)
    # Non-finite entries must match exactly (the same inf, or NaN for NaN); they never enter
    # the scale, so one inf in the reference cannot make the tolerance infinite.
    same_special = (got == want) | (np.isnan(got) & np.isnan(want))
    # The subtraction only on finite pairs: inf − inf would warn (and be thrown away anyway).
    finite_diff = np.abs(np.where(finite, got, 0.0) - np.where(finite, want, 0.0))
    diff = np.where(finite, finite_diff, np.where(same_special, 0.0, np.inf))
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.ndim else ()
    max_abs = float(diff[worst]) if diff.ndim else float(diff)
    scale = float(np.max(np.abs(np.where(np.isfinite(want), want, 0.0))))
    index = tuple(int(i) for i in worst)
    return Comparison(what, max_abs, scale, index, tol, tol.allows(max_abs, scale))


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _rng(key, stream: int) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key. Drawing cotangents and directions with NumPy
    costs no XLA compilation (each eager jax.random call per shape would)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng([*np.asarray(key, np.uint32).ravel().tolist(), stream])


def _random_like(rng: np.random.Generator, tree):
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.result_type(x)), tree)


def _vdot(a, b):
    return sum(
        jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def _x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def check_vjp(
    op: Callable,
    reference: Callable,
    *args,
    argnums: Sequence[int] | None = None,
    kwargs: dict | None = None,
    key: jax.Array | None = None,
    tolerance: tolerances.Tolerance | None = None,
    platform: str | None = None,
    finite_differences: bool = True,
    fd_step: float = tolerances.FD_STEP,
    fd_tolerance: tolerances.Tolerance = tolerances.FINITE_DIFFERENCES,
    max_fd_elements: int = 512,
    fd_directions: int = 4,
    second_order: bool = False,
    vmap: bool = False,
    name: str | None = None,
) -> CheckResult:
    """Check ``op``'s VJP against ``jax.vjp(reference)`` and central finite differences.

    Args:
      op: the function with a hand-written VJP.
      reference: the same function in plain JAX (what autodiff differentiates).
      *args: the inputs; floating ones are differentiated unless ``argnums`` says otherwise.
      argnums: indices of the arguments to differentiate (default: every floating one).
      kwargs: static keyword arguments passed to both functions.
      key: PRNG key for cotangents and directions (default ``PRNGKey(0)``).
      tolerance: for op vs reference; default from :mod:`handgrad.tolerances` by dtype
        and ``platform`` (default: the platform the first argument lives on).
      finite_differences: run the float64 finite-difference check (skipped, and said so,
        when float64 is disabled).
      max_fd_elements: arguments up to this size are checked element by element, larger
        ones along ``fd_directions`` random unit directions.
      second_order: also compare the gradient of ``⟨vjp(op)(ct), u⟩`` (grad of grad).
      vmap: also compare the VJP under ``jax.vmap`` over a batch of two inputs.

    Returns:
      a :class:`CheckResult`; ``.ok`` is True when every comparison is within tolerance.
    """
    kwargs = dict(kwargs or {})
    key = jax.random.PRNGKey(0) if key is None else key
    args = tuple(jnp.asarray(a) for a in args)
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _is_float(a))
    argnums = tuple(argnums)
    if not argnums:
        raise ValueError("check_vjp: no floating argument to differentiate")
    name = name or getattr(op, "__name__", "op")
    dtype = jnp.result_type(args[argnums[0]])
    if platform is None:
        platform = next(iter(args[argnums[0]].devices())).platform
    tol = tolerance or tolerances.autodiff_tolerance(dtype, platform)
    result = CheckResult(name=name, dtype=jnp.dtype(dtype).name)

    static_kwargs, dynamic_kwargs = _split_kwargs(kwargs)
    plan = _Plan(op, reference, argnums, static_kwargs, float(fd_step))
    diff_args = tuple(args[i] for i in argnums)
    rng_ct, rng_fd, rng_u = (_rng(key, stream) for stream in range(3))
    ct = _random_like(rng_ct, jax.eval_shape(
        lambda *d: op(*_substitute(args, argnums, d), **kwargs), *diff_args))
    run_fd = finite_differences and _x64_enabled()
    if finite_differences and not run_fd:
        result.skipped.append("finite differences: float64 is disabled (jax_enable_x64)")
    fd_probes = {}
    if run_fd:
        for position, x in enumerate(diff_args):
            if x.size <= max_fd_elements:  # every basis vector: an element-wise gradient
                probe = np.eye(x.size).reshape(x.size, *x.shape)
            else:  # random unit directions: directional derivatives
                probe = rng_fd.standard_normal((fd_directions, *x.shape))
                norms = np.linalg.norm(probe.reshape(fd_directions, -1), axis=1)
                probe = probe / norms.reshape((fd_directions,) + (1,) * x.ndim)
            fd_probes[position] = jnp.asarray(probe, jnp.float64)
    u = _random_like(rng_u, diff_args) if second_order else None
    batched = tuple(jnp.stack([a, jnp.flip(a)]) for a in args) if vmap else None
    batched_ct = (jax.tree_util.tree_map(lambda c: jnp.stack([c, jnp.flip(c)]), ct)
                  if vmap else None)

    try:
        out = _program(plan, args, dynamic_kwargs, ct, fd_probes, u, batched, batched_ct)
    except (TypeError, ValueError) as error:
        if "Custom VJP bwd rule" not in str(error):
            raise
        # JAX refuses a backward whose cotangent has the wrong shape or structure (a missing
        # transpose, say) before anything runs: that is a failed check, not a crash.
        result.problems.append(f"the backward's output does not match the inputs: {error}")
        return result
    result.comparisons.append(_compare("forward", out["forward_op"], out["forward_ref"], tol))
    for i, g_op, g_ref, primal in zip(argnums, out["vjp_op"], out["vjp_ref"], diff_args):
        if g_op.shape != primal.shape or g_op.dtype != primal.dtype:
            result.problems.append(
                f"cotangent of arg {i} is {g_op.dtype}{list(g_op.shape)}, "
                f"primal is {primal.dtype}{list(primal.shape)}"
            )
        result.comparisons.append(_compare(f"vjp arg {i} vs autodiff", g_op, g_ref, tol))
    if "fd" in out:
        hand64, fd = out["fd"]
        for position, i in enumerate(argnums):
            _record_fd(result, i, hand64[position], fd[position], fd_probes[position],
                       diff_args[position].size <= max_fd_elements, fd_tolerance)
    if "gg_op" in out:
        for i, a, b in zip(argnums, out["gg_op"], out["gg_ref"]):
            result.comparisons.append(_compare(f"grad-of-grad arg {i} vs autodiff", a, b, tol))
    if "vmap_op" in out:
        for example in range(2):
            for position, i in enumerate(argnums):
                result.comparisons.append(_compare(
                    f"vmap example {example} arg {i} vs autodiff",
                    out["vmap_op"][position][example], out["vmap_ref"][example][position], tol,
                ))
    return result


@dataclass(frozen=True)
class _Plan:
    """The static part of a check: what is compiled. Equal plans with equal shapes reuse one
    compiled program (hypothesis draws the same shapes again and again)."""

    op: Callable
    reference: Callable
    argnums: tuple[int, ...]
    static_kwargs: tuple
    fd_step: float


def _split_kwargs(kwargs: dict):
    """Hashable keyword arguments are compiled in; arrays (a PRNG key, running statistics)
    are passed to the program as data."""
    static, dynamic = [], {}
    for name, value in sorted(kwargs.items()):
        if isinstance(value, jax.Array | np.ndarray):
            dynamic[name] = value
        else:
            hash(value)  # raises for a list or dict: pass tuples
            static.append((name, value))
    return tuple(static), dynamic


# Everything is computed in ONE jit-compiled program: compiling once is far cheaper than
# compiling every primitive for eager dispatch, and it runs the op under jit as users do.
@partial(jax.jit, static_argnums=0)
def _program(plan: _Plan, args, dynamic_kwargs, ct, fd_probes, u, batched, batched_ct):
    kwargs = {**dict(plan.static_kwargs), **dynamic_kwargs}
    argnums = plan.argnums

    def restrict(fn, full):
        return lambda *diff: fn(*_substitute(full, argnums, diff), **kwargs)

    f_op, f_ref = restrict(plan.op, args), restrict(plan.reference, args)
    diff = tuple(args[i] for i in argnums)
    out = {}
    out["forward_op"], vjp_op = jax.vjp(f_op, *diff)
    out["forward_ref"], vjp_ref = jax.vjp(f_ref, *diff)
    out["vjp_op"], out["vjp_ref"] = vjp_op(ct), vjp_ref(ct)
    if fd_probes:
        out["fd"] = _finite_differences(f_op, diff, ct, fd_probes, plan.fd_step)
    if u is not None:
        every = tuple(range(len(diff)))

        def psi(f, *d):
            return _vdot(jax.vjp(f, *d)[1](ct), u)

        out["gg_op"] = jax.grad(lambda *d: psi(f_op, *d), argnums=every)(*diff)
        out["gg_ref"] = jax.grad(lambda *d: psi(f_ref, *d), argnums=every)(*diff)
    if batched is not None:
        def grads(fn, full, c):
            d = tuple(full[i] for i in argnums)
            return jax.vjp(restrict(fn, full), *d)[1](c)

        out["vmap_op"] = jax.vmap(lambda full, c: grads(plan.op, full, c))(batched, batched_ct)
        out["vmap_ref"] = [
            grads(plan.reference, tuple(b[e] for b in batched),
                  jax.tree_util.tree_map(lambda t, e=e: t[e], batched_ct))
            for e in range(2)
        ]
    return out


def _substitute(full, positions, values):
    full = list(full)
    for p, v in zip(positions, values):
        full[p] = v
    return tuple(full)


def _finite_differences(f_op, diff, ct, probes, step):
    """Central differences of φ(x) = ⟨ct, op(x)⟩ in float64 along each probe, and the hand
    VJP in float64 to compare them with. Integer arguments stay as they are."""
    diff64 = tuple(d.astype(jnp.float64) for d in diff)
    ct64 = jax.tree_util.tree_map(lambda c: c.astype(jnp.float64), ct)
    hand64 = jax.vjp(f_op, *diff64)[1](ct64)

    def phi(*d):
        return _vdot(ct64, f_op(*d))

    fd = {}
    for position, probe in probes.items():
        def phi_along(e, position=position):
            plus = _substitute(diff64, (position,), (diff64[position] + step * e,))
            minus = _substitute(diff64, (position,), (diff64[position] - step * e,))
            return (phi(*plus) - phi(*minus)) / (2 * step)

        fd[position] = jax.vmap(phi_along)(probe)
    return hand64, fd


def _record_fd(result, i, hand, fd, probe, elementwise, tol):
    if elementwise:
        result.comparisons.append(
            _compare(f"vjp arg {i} vs finite diff", hand, fd.reshape(hand.shape), tol))
        return
    analytic = jnp.tensordot(probe, hand, axes=hand.ndim)
    cmp = _compare(f"vjp arg {i} vs finite diff ({probe.shape[0]} directions)",
                   analytic, fd, tol)
    # A directional derivative along a unit vector has the scale of the gradient's norm.
    cmp.ref_scale = max(cmp.ref_scale, float(jnp.linalg.norm(hand)))
    cmp.ok = tol.allows(cmp.max_abs_err, cmp.ref_scale)
    result.comparisons.append(cmp)
