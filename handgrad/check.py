"""check_vjp: compare a hand-written VJP with autodiff and with finite differences.

Usable on any user function that has a custom VJP, not only handgrad's ops::

    result = hg.check_vjp(my_op, my_reference, x, w)
    assert result.ok, str(result)
    print(result)        # a short report: one line per comparison, the worst error of each

What it checks, each on random inputs the caller supplies and random cotangents it draws:

1. forward: ``op(*args) == reference(*args)``, and the output's dtype is the reference's;
2. first order: ``vjp(op)(ct) == vjp(reference)(ct)`` per differentiable argument, and that
   each cotangent has its primal's shape and dtype (named per argument);
3. the backward run twice gives the same cotangents within ``nondet_tol`` (a non-deterministic
   or non-reentrant backward: scatter-adds on a GPU, Python state read while tracing), and a
   zero cotangent gives exactly zero gradients (nothing added that does not scale with ``g``);
4. finite differences in float64 (in a scoped ``jax.enable_x64`` when the user has not turned
   float64 on): per element for small arguments, along random directions for large ones, or —
   ``fast_mode=True``, like ``gradcheck(fast_mode=True)`` — one random projection ``vᵀJu`` per
   argument, rerun in the slow mode when it fails;
5. optionally second order (like PyTorch's ``gradgradcheck``): the gradient of
   ``ψ(x, ct) = ⟨vjp(op)(ct), u⟩`` for a random ``u``, with respect to the inputs *and* the
   cotangent, against the reference's;
6. optionally ``vmap`` (like ``check_batched_grad``): the VJP of a 2-example batch under
   ``jax.vmap`` against the reference's VJP example by example.

No comparison passes vacuously: one whose reference is non-finite, or identically zero, is
reported *not verified* (``.ok`` is False, with the reason) unless the caller says that is the
true answer (``allow_nonfinite=True`` / ``allow_zero=True``). The second-order check is judged
as a whole: a zero second derivative is the true answer for every piecewise-linear op (relu,
pooling, a bias), so a zero part is accepted when the hand side is *exactly* zero too and some
other part of the same check (the cotangent's, ``J·u``) is not zero.

On a failure of a small op (at most ``max_jacobian_entries`` Jacobian entries) the report shows
the numerical and the analytical Jacobian of each failing argument side by side, in float64,
with the worst entry marked.

Integer arguments (labels) are held fixed and not differentiated.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from handgrad import tolerances


@dataclass
class Comparison:
    """One comparison of two arrays: the worst absolute error, where, and against what scale.

    ``within`` says whether the error is within tolerance; ``unverified`` (empty when the
    comparison proves something) says why a comparison within tolerance still proves nothing.
    """

    what: str
    max_abs_err: float
    ref_scale: float
    worst_index: tuple[int, ...] | None
    tolerance: tolerances.Tolerance
    within: bool
    unverified: str = ""
    zero_reference: bool = False
    hand_scale: float = 0.0
    hint: str = ""
    argname: str | None = None

    @property
    def ok(self) -> bool:
        return self.within and not self.unverified

    @property
    def status(self) -> str:
        return "FAIL" if not self.within else ("not verified" if self.unverified else "ok")

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / self.ref_scale if self.ref_scale > 0 else self.max_abs_err

    @property
    def label(self) -> str:
        """``what`` with the argument's name: ``vjp arg 1 (w) vs autodiff``."""
        if self.argname is None or " arg " not in self.what:
            return self.what
        head, tail = self.what.split(" arg ", 1)
        number, _, rest = tail.partition(" ")
        return f"{head} arg {number} ({self.argname}) {rest}".rstrip()

    def __str__(self) -> str:
        where = f" at {self.worst_index}" if self.worst_index else ""
        text = f"{self.status:<12} {self.label:<40} rel {self.rel_err:.1e}"
        if not self.within:
            text += (f" (abs {self.max_abs_err:.1e}{where}; tol rtol={self.tolerance.rtol:g} "
                     f"atol={self.tolerance.atol:g})")
        if self.hint:
            text += f"  {self.hint}"
        if self.unverified:
            text += f"  ({self.unverified})"
        return text


@dataclass
class CheckResult:
    name: str
    dtype: str
    comparisons: list[Comparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)  # diagnostics that are not comparisons
    notes: list[str] = field(default_factory=list)
    # on a failure: "d out / d x (arg 0)" -> (numerical, analytical, output shape, input shape)
    jacobians: dict[str, tuple] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.comparisons)

    @property
    def not_verified(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.within and c.unverified]

    def worst(self, prefix: str) -> Comparison | None:
        """The comparison with the largest relative error among those whose name starts so."""
        chosen = [c for c in self.comparisons if c.what.startswith(prefix)]
        return max(chosen, key=lambda c: c.rel_err, default=None)

    def __str__(self) -> str:
        counts = {"failed": sum(not c.within for c in self.comparisons),
                  "not verified": len(self.not_verified)}
        bad = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        if self.problems:
            bad = ", ".join(filter(None, [f"{len(self.problems)} problem"
                                          f"{'s' if len(self.problems) > 1 else ''}", bad]))
        lines = [f"check_vjp({self.name}, {self.dtype}): {'PASS' if self.ok else 'FAIL'} "
                 f"({bad + ' of ' if bad else ''}{len(self.comparisons)} comparisons; "
                 f"rel = max|hand − reference| / max|reference|)"]
        lines += [f"  {c}" for c in self.comparisons]
        if self.passed:
            lines.append(f"  ok           {'; '.join(self.passed)}")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  skipped: {s}" for s in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        for what, jacobians in self.jacobians.items():
            lines += _side_by_side(what, *jacobians)
        return "\n".join(lines)

    def __bool__(self) -> bool:  # so `assert check_vjp(...)` reads naturally
        return self.ok


def _compare(what, got, want, tol, *, allow_zero=False, allow_nonfinite=False,
             argname=None) -> Comparison:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return Comparison(f"{what} (shape {got.shape} != {want.shape})", np.inf, 0.0, None, tol,
                          False, argname=argname)
    if got.size == 0:
        return Comparison(what, 0.0, 0.0, None, tol, True,
                          "" if allow_zero else "nothing to compare: the arrays are empty",
                          zero_reference=True, argname=argname)
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
    hand_scale = float(np.max(np.abs(np.where(np.isfinite(got), got, 0.0))))
    index = tuple(int(i) for i in worst)
    within = tol.allows(max_abs, scale)
    nonfinite = int(np.sum(~np.isfinite(want)))
    zero = scale == 0.0 and nonfinite == 0
    unverified = ""
    if nonfinite and not allow_nonfinite:
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(want))[0])
        unverified = (f"the reference has {nonfinite} non-finite entries, the first "
                      f"{want[first] if first else float(want)} at {first}: they prove nothing "
                      f"(allow_nonfinite=True if that is the true answer)")
    elif zero and not allow_zero:
        side = "both sides are" if hand_scale == 0.0 else "the reference is"
        unverified = (f"{side} identically zero: the inputs do not exercise the formula "
                      f"(allow_zero=True if zero is the true answer)")
    hint = "" if within else _hint(got, want)
    return Comparison(what, max_abs, scale, index, tol, within, unverified, zero, hand_scale,
                      hint, argname)


def _hint(got, want) -> str:
    """What a wrong gradient looks like, when it is simply related to the right one."""
    if not (np.isfinite(got).all() and np.isfinite(want).all()) or not np.any(want):
        return ""
    if want.ndim == 2 and want.shape[0] == want.shape[1] > 1 and np.allclose(got, want.T):
        return "= the transpose of the reference: a missing transpose?"
    factor = float(np.vdot(got, want) / np.vdot(want, want))
    if np.linalg.norm(got - factor * want) <= 1e-6 * np.linalg.norm(got):
        if abs(factor + 1) < 1e-6:
            return "= −1 × the reference: a sign error?"
        return f"= {factor:.6g} × the reference: a missing or extra factor?"
    return ""


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


# Mixed into every seed: without it the default key's words (0, 0) and stream 0 seed NumPy
# exactly as ``default_rng(0)`` does, so the cotangent equalled a user's inputs drawn that way
# (and gᵀx = xᵀg hid a transposed dW).
_SALT = 0x68676368  # "hgch"


def host_rng(key, *salt: int) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key's words (and ``salt``). Drawing on the host
    compiles nothing; each eager or jitted jax.random draw compiles a program per shape. The
    registry's input samplers use it too."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng([*np.asarray(key, np.uint32).ravel().tolist(), *salt])


def _random_like(rng: np.random.Generator, tree):
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.result_type(x)), tree)


def _vdot(a, b):
    return sum(
        jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def _x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def _argnames(op, count: int, given) -> tuple[str, ...]:
    """The arguments' names from ``op``'s signature (``arg i`` where it has none)."""
    if given is not None:
        return tuple(given) + tuple(f"arg {i}" for i in range(len(given), count))
    try:
        params = list(inspect.signature(op).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(positional[i] if i < len(positional) else f"arg {i}" for i in range(count))


def _unit_directions(rng: np.random.Generator, count: int, shape) -> np.ndarray:
    probe = rng.standard_normal((count, *shape))
    norms = np.linalg.norm(probe.reshape(count, -1), axis=1)
    return probe / norms.reshape((count,) + (1,) * len(shape))


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
    fast_mode: bool = False,
    second_order: bool = False,
    vmap: bool = False,
    nondet_tol: float = 0.0,
    allow_zero: bool = False,
    allow_nonfinite: bool = False,
    max_jacobian_entries: int = 400,
    argnames: Sequence[str] | None = None,
    name: str | None = None,
) -> CheckResult:
    """Check ``op``'s VJP against ``jax.vjp(reference)`` and central finite differences.

    Args:
      op: the function with a hand-written VJP.
      reference: the same function in plain JAX (what autodiff differentiates).
      *args: the inputs; floating ones are differentiated unless ``argnums`` says otherwise.
      argnums: indices of the arguments to differentiate (default: every floating one).
      kwargs: keyword arguments passed to both functions (hashable ones are compiled in,
        arrays such as a PRNG key are passed as data).
      key: PRNG key for cotangents and directions (default ``PRNGKey(0)``).
      tolerance: for op vs reference; default from :mod:`handgrad.tolerances` by dtype
        and ``platform`` (default: the platform the first argument lives on).
      finite_differences: run the float64 finite-difference check (in a scoped
        ``jax.enable_x64`` when float64 is not enabled globally).
      max_fd_elements: arguments up to this size are checked element by element, larger
        ones along ``fd_directions`` random unit directions.
      fast_mode: finite differences along one random direction per argument, compared as the
        projection ``vᵀJu`` (``v`` the cotangent); on any failure the whole check is rerun in
        the slow mode, whose report is returned.
      second_order: also compare the gradient of ``⟨vjp(op)(ct), u⟩`` (grad of grad) with
        respect to the inputs and the cotangent.
      vmap: also compare the VJP under ``jax.vmap`` over a batch of two inputs.
      nondet_tol: the backward is run twice; the two results may differ by this much
        (absolute) at most. 0: they must be identical.
      allow_zero: accept a comparison whose reference is identically zero (the true gradient
        is zero); otherwise it is reported as not verified.
      allow_nonfinite: accept a reference with inf/NaN entries when the hand side has the same
        ones; otherwise the comparison is reported as not verified.
      max_jacobian_entries: on a failure, ops whose Jacobians have at most this many entries
        (output size × differentiated input sizes) get them in the report.
      argnames: names of the arguments for the report (default: ``op``'s signature).

    Returns:
      a :class:`CheckResult`; ``.ok`` is True when every comparison is within tolerance,
      verified, and no diagnostic found a problem. ``str(result)`` is the report.
    """
    options = dict(argnums=argnums, kwargs=kwargs, key=key, tolerance=tolerance,
                   platform=platform, finite_differences=finite_differences, fd_step=fd_step,
                   fd_tolerance=fd_tolerance, max_fd_elements=max_fd_elements,
                   fd_directions=fd_directions, second_order=second_order, vmap=vmap,
                   nondet_tol=nondet_tol, allow_zero=allow_zero, allow_nonfinite=allow_nonfinite,
                   max_jacobian_entries=max_jacobian_entries, argnames=argnames, name=name)
    result = _check(op, reference, args, fast_mode=fast_mode, **options)
    if fast_mode and not result.ok:
        slow = _check(op, reference, args, fast_mode=False, **options)
        fast_failures = [str(c).strip() for c in result.comparisons if not c.ok]
        fast_failures += result.problems
        slow.notes.insert(0, "fast mode (one random projection vᵀJu per argument) failed, "
                             "rerun in slow mode: " + " | ".join(fast_failures))
        return slow
    return result


def _check(op, reference, args, *, argnums, kwargs, key, tolerance, platform,
           finite_differences, fd_step, fd_tolerance, max_fd_elements, fd_directions,
           fast_mode, second_order, vmap, nondet_tol, allow_zero, allow_nonfinite,
           max_jacobian_entries, argnames, name) -> CheckResult:
    kwargs = dict(kwargs or {})
    key = jax.random.PRNGKey(0) if key is None else key
    args = tuple(jnp.asarray(a) for a in args)
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _is_float(a))
    argnums = tuple(argnums)
    if not argnums:
        raise ValueError("check_vjp: no floating argument to differentiate")
    name = name or getattr(op, "__name__", "op")
    names = _argnames(op, len(args), argnames)
    dtype = jnp.result_type(args[argnums[0]])
    if platform is None:
        platform = next(iter(args[argnums[0]].devices())).platform
    tol = tolerance or tolerances.autodiff_tolerance(dtype, platform)
    result = CheckResult(name=name, dtype=jnp.dtype(dtype).name)
    compare = partial(_compare, allow_zero=allow_zero, allow_nonfinite=allow_nonfinite)

    static_kwargs, dynamic_kwargs = _split_kwargs(kwargs)
    plan = _Plan(op, reference, argnums, static_kwargs, float(fd_step))
    diff_args = tuple(args[i] for i in argnums)
    rng_ct, rng_fd, rng_u = (host_rng(key, stream, _SALT) for stream in range(3))
    out_shape = jax.eval_shape(lambda *d: op(*_substitute(args, argnums, d), **kwargs),
                               *diff_args)
    ct = _random_like(rng_ct, out_shape)
    zero_ct = jax.tree_util.tree_map(lambda c: jnp.asarray(np.zeros(c.shape, c.dtype)), ct)
    fd_probes = {}
    if finite_differences:
        for position, x in enumerate(diff_args):
            if fast_mode:  # one random direction: vᵀJu with v = ct
                probe = _unit_directions(rng_fd, 1, x.shape)
            elif x.size <= max_fd_elements:  # every basis vector: an element-wise gradient
                probe = np.eye(x.size).reshape(x.size, *x.shape)
            else:  # random unit directions: directional derivatives
                probe = _unit_directions(rng_fd, fd_directions, x.shape)
            fd_probes[position] = probe
    fd_in_program = bool(fd_probes) and _x64_enabled()
    u = _random_like(rng_u, diff_args) if second_order else None
    batched = tuple(jnp.stack([a, jnp.flip(a)]) for a in args) if vmap else None
    batched_ct = (jax.tree_util.tree_map(lambda c: jnp.stack([c, jnp.flip(c)]), ct)
                  if vmap else None)

    try:
        probes_in = ({p: jnp.asarray(v, jnp.float64) for p, v in fd_probes.items()}
                     if fd_in_program else {})
        out = _program(plan, args, dynamic_kwargs, ct, zero_ct, probes_in, u, batched,
                       batched_ct)
        if fd_probes and not fd_in_program:
            # float64 is off globally: the finite differences alone run with it on, in their
            # own program (the user's op stays as the user runs it everywhere else).
            with jax.enable_x64(True):
                probes64 = {p: jnp.asarray(v, jnp.float64) for p, v in fd_probes.items()}
                out["fd"] = jax.device_get(
                    _fd_program(plan, args, dynamic_kwargs, ct, probes64))
            result.notes.append("finite differences in float64 under a scoped "
                                "jax.enable_x64 (float64 is off globally)")
    except (TypeError, ValueError) as error:
        if "Custom VJP bwd rule" not in str(error):
            raise
        # JAX refuses a backward whose cotangent has the wrong shape or structure (a missing
        # transpose, say) before anything runs: that is a failed check, not a crash.
        result.problems.append(f"the backward's output does not match the inputs: {error}")
        return result

    _record_forward(result, out, compare, tol)
    for position, i in enumerate(argnums):
        g_op, primal = out["vjp_op"][position], diff_args[position]
        if g_op.shape != primal.shape or g_op.dtype != primal.dtype:
            result.problems.append(
                f"cotangent of arg {i} (`{names[i]}`) is {g_op.dtype}{list(g_op.shape)}, "
                f"primal `{names[i]}` is {primal.dtype}{list(primal.shape)}"
            )
        result.comparisons.append(compare(f"vjp arg {i} vs autodiff", g_op,
                                          out["vjp_ref"][position], tol, argname=names[i]))
    if not any("cotangent of arg" in p for p in result.problems):
        result.passed.append("cotangents' dtypes and shapes")
    _record_reentrant(result, out, argnums, names, nondet_tol)
    _record_zero_cotangent(result, out, argnums, names, allow_nonfinite)
    if "fd" in out:
        hand64, fd = out["fd"]
        for position, i in enumerate(argnums):
            _record_fd(result, i, names[i], hand64[position], fd[position], fd_probes[position],
                       fast_mode, diff_args[position].size <= max_fd_elements, fd_tolerance,
                       compare)
    if "gg_op" in out:
        _record_second_order(result, out, argnums, names, tol, compare, allow_zero)
    if "vmap_op" in out:
        for example in range(2):
            for position, i in enumerate(argnums):
                result.comparisons.append(compare(
                    f"vmap example {example} arg {i} vs autodiff",
                    out["vmap_op"][position][example], out["vmap_ref"][example][position], tol,
                    argname=names[i]))
    if any(not c.within for c in result.comparisons):
        _attach_jacobians(result, plan, args, dynamic_kwargs, out_shape, names,
                          max_jacobian_entries)
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


def _restrict(plan: _Plan, fn, full, kwargs):
    """``fn`` as a function of the differentiated arguments only, the others held at ``full``."""
    return lambda *diff: fn(*_substitute(full, plan.argnums, diff), **kwargs)


# Everything is computed in ONE jit-compiled program: compiling once is far cheaper than
# compiling every primitive for eager dispatch, and it runs the op under jit as users do.
@partial(jax.jit, static_argnums=0)
def _program(plan: _Plan, args, dynamic_kwargs, ct, zero_ct, fd_probes, u, batched,
             batched_ct):
    kwargs = {**dict(plan.static_kwargs), **dynamic_kwargs}
    f_op = _restrict(plan, plan.op, args, kwargs)
    f_ref = _restrict(plan, plan.reference, args, kwargs)
    diff = tuple(args[i] for i in plan.argnums)
    out = {}
    out["forward_op"], vjp_op = jax.vjp(f_op, *diff)
    out["forward_ref"], vjp_ref = jax.vjp(f_ref, *diff)
    # (the reference's cotangent in its own output dtype: a wrong output dtype is a problem
    # reported apart, not a crash)
    ct_ref = jax.tree_util.tree_map(lambda c, o: c.astype(o.dtype), ct, out["forward_ref"])
    out["vjp_op"], out["vjp_ref"] = vjp_op(ct), vjp_ref(ct_ref)
    # The backward again, on a cotangent XLA cannot prove equal to ct (so it cannot merge the
    # two evaluations into one), and on a zero cotangent passed in as data (nothing folds it).
    out["vjp_again"] = vjp_op(jax.lax.optimization_barrier(ct))
    out["vjp_zero"] = vjp_op(zero_ct)
    if fd_probes:
        out["fd"] = _finite_differences(f_op, diff, ct, fd_probes, plan.fd_step)
    if u is not None:
        # ψ(x, c) = ⟨vjp(f)(x)(c), u⟩, differentiated in the inputs and in the cotangent.
        every = tuple(range(len(diff) + 1))

        def psi(f, *d_and_c):
            *d, c = d_and_c
            return _vdot(jax.vjp(f, *d)[1](c), u)

        out["gg_op"] = jax.grad(lambda *a: psi(f_op, *a), argnums=every)(*diff, ct)
        out["gg_ref"] = jax.grad(lambda *a: psi(f_ref, *a), argnums=every)(*diff, ct)
    if batched is not None:
        def grads(fn, full, c):
            d = tuple(full[i] for i in plan.argnums)
            return jax.vjp(_restrict(plan, fn, full, kwargs), *d)[1](c)

        out["vmap_op"] = jax.vmap(lambda full, c: grads(plan.op, full, c))(batched, batched_ct)
        out["vmap_ref"] = [
            grads(plan.reference, tuple(b[e] for b in batched),
                  jax.tree_util.tree_map(lambda t, e=e: t[e], batched_ct))
            for e in range(2)
        ]
    return out


@partial(jax.jit, static_argnums=0)
def _fd_program(plan: _Plan, args, dynamic_kwargs, ct, fd_probes):
    """The finite differences alone, for a caller whose float64 is off (run under x64)."""
    kwargs = {**dict(plan.static_kwargs), **dynamic_kwargs}
    diff = tuple(args[i] for i in plan.argnums)
    return _finite_differences(_restrict(plan, plan.op, args, kwargs), diff, ct, fd_probes,
                               plan.fd_step)


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


# --- turning the program's outputs into comparisons and problems ----------------------------


def _record_forward(result, out, compare, tol):
    got, want = out["forward_op"], out["forward_ref"]
    result.comparisons.append(compare("forward", got, want, tol))
    got_dtypes = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(got)}
    want_dtypes = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(want)}
    if got_dtypes != want_dtypes:
        result.problems.append(f"the forward's output is {sorted(got_dtypes)}, "
                               f"the reference's {sorted(want_dtypes)}")


def _max_difference(a, b) -> tuple[float, tuple[int, ...]]:
    """max |a − b| with NaN equal to NaN and an inf equal to the same inf."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return np.inf, ()
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):  # inf − inf: not the same special value, so inf
        diff = np.abs(a - b)
    diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
    if diff.size == 0:
        return 0.0, ()
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return float(diff[worst]), tuple(int(i) for i in worst)


def _record_reentrant(result, out, argnums, names, nondet_tol):
    worst, same = 0.0, True
    for i, first, second in zip(argnums, out["vjp_op"], out["vjp_again"]):
        diff, where = _max_difference(first, second)
        worst = max(worst, diff)
        if not diff <= nondet_tol:
            same = False
            result.problems.append(
                f"the backward run twice differs: arg {i} (`{names[i]}`) by {diff:.2e} at "
                f"{where} > nondet_tol={nondet_tol:g} (non-deterministic or non-reentrant: a "
                f"GPU scatter-add, Python state read while tracing)")
    if same:
        result.passed.append("backward run twice: identical" if worst == 0.0 else
                             f"backward run twice: within {worst:.1e} <= nondet_tol")


def _record_zero_cotangent(result, out, argnums, names, allow_nonfinite):
    bad = []
    for i, g in zip(argnums, out["vjp_zero"]):
        g = np.asarray(g, np.float64)
        # 0 · inf = NaN: where the gradient itself is infinite, allow_nonfinite accepts it
        wrong = (g != 0) & (np.isfinite(g) | (not allow_nonfinite))
        if np.any(wrong):
            nonzero = np.argwhere(wrong)
            first = tuple(int(j) for j in nonzero[0])
            bad.append(f"arg {i} (`{names[i]}`) has {len(nonzero)} non-zero entries, "
                       f"{g[first] if first else float(g)} at {first}")
    if bad:
        result.problems.append("a zero cotangent gives non-zero gradients (the backward adds "
                               "something that does not scale with g): " + "; ".join(bad))
    else:
        result.passed.append("zero cotangent -> zero")


def _record_fd(result, i, argname, hand, fd, probe, fast_mode, elementwise, tol, compare):
    hand, fd = np.asarray(hand, np.float64), np.asarray(fd, np.float64)
    if elementwise and not fast_mode:
        result.comparisons.append(compare(f"vjp arg {i} vs finite diff", hand,
                                          fd.reshape(hand.shape), tol, argname=argname))
        return
    analytic = np.tensordot(probe, hand, axes=hand.ndim)
    what = (f"vjp arg {i} vs finite diff (fast mode: vᵀJu)" if fast_mode else
            f"vjp arg {i} vs finite diff ({probe.shape[0]} directions)")
    cmp = compare(what, analytic, fd, tol, argname=argname)
    # A directional derivative along a unit vector has the scale of the gradient's norm.
    cmp.ref_scale = max(cmp.ref_scale, float(np.linalg.norm(hand)))
    cmp.within = cmp.within or tol.allows(cmp.max_abs_err, cmp.ref_scale)
    cmp.hint = ""
    result.comparisons.append(cmp)


def _record_second_order(result, out, argnums, names, tol, compare, allow_zero):
    """Per input and for the cotangent; judged as a whole (see the module docstring)."""
    group = [compare(f"grad-of-grad arg {i} vs autodiff", a, b, tol, argname=names[i])
             for i, a, b in zip(argnums, out["gg_op"][:-1], out["gg_ref"][:-1])]
    ct_op, ct_ref = (ravel_pytree(out[k][-1])[0] for k in ("gg_op", "gg_ref"))
    group.append(compare("grad-of-grad cotangent vs autodiff (J·u)", ct_op, ct_ref, tol))
    if not allow_zero and not all(c.zero_reference for c in group):
        for c in group:
            if c.zero_reference and c.within and c.hand_scale == 0.0:
                c.unverified = ""
                c.hint = "(zero, exactly, as the reference)"
            elif c.zero_reference and c.within:
                c.unverified = ("the reference is identically zero but the hand side is not "
                                "exactly zero")
    result.comparisons.extend(group)


# --- on a failure: the Jacobians side by side ----------------------------------------------


def _attach_jacobians(result, plan, args, dynamic_kwargs, out_shape, names, max_entries):
    """For a small op whose VJP failed: each failing argument's numerical and analytical
    Jacobian in float64 (rows: output entries, columns: the argument's entries)."""
    out_size = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(out_shape))
    sizes = [int(args[i].size) for i in plan.argnums]
    if out_size * sum(sizes) > max_entries:
        return
    failing = {i for i in plan.argnums for c in result.comparisons
               if not c.within and c.what.startswith((f"vjp arg {i} ", f"vmap example 0 arg {i} ",
                                                  f"vmap example 1 arg {i} "))}
    if not failing:
        return
    try:
        with jax.enable_x64(True):
            eye_out = jnp.eye(out_size, dtype=jnp.float64)
            probes = {p: jnp.eye(n, dtype=jnp.float64) for p, n in enumerate(sizes)}
            numerical, analytical = jax.device_get(
                _jacobian_program(plan, args, dynamic_kwargs, eye_out, probes))
    except Exception as error:  # a report's extra must not hide the report
        result.notes.append(f"the Jacobians could not be computed: {type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}")
        return
    for position, i in enumerate(plan.argnums):
        if i in failing:
            out_dims = (out_size,) if len(jax.tree_util.tree_leaves(out_shape)) > 1 else (
                jax.tree_util.tree_leaves(out_shape)[0].shape)
            result.jacobians[f"d out / d {names[i]} (arg {i})"] = (
                np.asarray(numerical[position]), np.asarray(analytical[position]), out_dims,
                args[i].shape)


@partial(jax.jit, static_argnums=0)
def _jacobian_program(plan: _Plan, args, dynamic_kwargs, eye_out, probes):
    kwargs = {**dict(plan.static_kwargs), **dynamic_kwargs}
    diff64 = tuple(args[i].astype(jnp.float64) for i in plan.argnums)
    f = _restrict(plan, plan.op, args, kwargs)

    def flat(*d):
        return ravel_pytree(f(*d))[0].astype(jnp.float64)

    out, pullback = jax.vjp(f, *diff64)
    flat_out, unravel = ravel_pytree(out)
    # lax.map, not vmap: a backward whose batching rule is what failed must not break this
    rows = jax.lax.map(lambda e: pullback(unravel(e.astype(flat_out.dtype))), eye_out)
    analytical = [r.reshape(eye_out.shape[0], -1) for r in rows]
    numerical = []
    step = plan.fd_step
    for position, eye in probes.items():
        def column(e, position=position):
            x = diff64[position]
            e = e.reshape(x.shape)
            plus = _substitute(diff64, (position,), (x + step * e,))
            minus = _substitute(diff64, (position,), (x - step * e,))
            return (flat(*plus) - flat(*minus)) / (2 * step)

        numerical.append(jax.lax.map(column, eye).T)
    return numerical, analytical


def _side_by_side(what, numerical, analytical, out_shape, in_shape) -> list[str]:
    """The two Jacobians as text, the numerical left, the worst entry marked with *."""
    diff = np.abs(numerical - analytical)
    r, c = np.unravel_index(int(np.argmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape)
    worst = (int(r), int(c))
    out_index = tuple(int(i) for i in np.unravel_index(worst[0], out_shape))
    in_index = tuple(int(i) for i in np.unravel_index(worst[1], in_shape))

    def row(matrix, r):
        return "".join(f"{matrix[r, c]:10.3g}{'*' if (r, c) == worst else ' '}"
                       for c in range(matrix.shape[1]))

    width = 11 * numerical.shape[1]
    lines = [f"  Jacobian {what} (float64; rows: output{list(out_shape)} entries, columns: "
             f"input{list(in_shape)} entries, row-major). Worst *: output {out_index}, input "
             f"{in_index}: numerical {numerical[worst]:.6g}, analytical {analytical[worst]:.6g}",
             f"    {'numerical':>{width}} | analytical"]
    lines += [f"    {row(numerical, r)} | {row(analytical, r)}"
              for r in range(numerical.shape[0])]
    return lines


# --- a student's cmp: one intermediate at a time ---------------------------------------------


class Match(NamedTuple):
    """What :func:`compare` found: exact equality, approximate equality, max |a − b|."""

    name: str
    exact: bool
    approximate: bool
    max_abs_diff: float

    def __str__(self) -> str:
        return (f"{self.name:<15} | exact: {self.exact!s:<5} | approximate: "
                f"{self.approximate!s:<5} | max abs diff: {self.max_abs_diff:.3g}")


def compare(name: str, mine, reference, *, tolerance: tolerances.Tolerance | None = None,
            verbose: bool = True) -> Match:
    """Compare a gradient you computed by hand with a reference one, and print the verdict.

    The check used when writing a backward pass one intermediate at a time (Karpathy's
    ``cmp`` in "becoming a backprop ninja")::

        hg.compare("dlogits", dlogits, jax.grad(loss)(logits))
        # dlogits         | exact: False | approximate: True  | max abs diff: 2.8e-17

    Args:
      name: printed at the start of the line.
      mine: an array or a pytree of arrays.
      reference: the same structure (e.g. ``jax.grad`` of the reference).
      tolerance: for "approximate": ``max |mine − reference| ≤ atol + rtol · max |reference|``
        per leaf; default from :mod:`handgrad.tolerances` for the less precise dtype of the two.
      verbose: print the line (one per leaf for a pytree of several leaves).

    Returns:
      a :class:`Match` ``(name, exact, approximate, max_abs_diff)`` over all leaves.

    Raises:
      ValueError: when the two pytrees have different structures.
    """
    mine_leaves, mine_tree = jax.tree_util.tree_flatten_with_path(mine)
    ref_leaves, ref_tree = jax.tree_util.tree_flatten_with_path(reference)
    if mine_tree != ref_tree:
        raise ValueError(f"compare({name!r}): `mine` and `reference` have different "
                         f"structures: {mine_tree} vs {ref_tree}")
    matches = []
    for (path, a), (_, b) in zip(mine_leaves, ref_leaves):
        leaf = name + jax.tree_util.keystr(path)
        matches.append(_compare_leaf(leaf, a, b, tolerance))
    if verbose:
        for match in matches:
            print(match)
    return Match(name, all(m.exact for m in matches), all(m.approximate for m in matches),
                 max((m.max_abs_diff for m in matches), default=0.0))


def _compare_leaf(name, a, b, tolerance) -> Match:
    a_np, b_np = np.asarray(a), np.asarray(b)
    if a_np.shape != b_np.shape:
        print(f"{name}: shape {a_np.shape} != reference shape {b_np.shape}")
        return Match(name, False, False, np.inf)
    if tolerance is None:
        candidates = [tolerances.autodiff_tolerance(d) for d in (a_np.dtype, b_np.dtype)
                      if jnp.issubdtype(d, jnp.inexact)]
        tolerance = max(candidates, key=lambda t: t.rtol,
                        default=tolerances.Tolerance(rtol=0.0, atol=0.0))
    a64, b64 = a_np.astype(np.float64), b_np.astype(np.float64)
    exact = bool(np.array_equal(a64, b64, equal_nan=True))
    diff, _ = _max_difference(a64, b64)
    scale = float(np.max(np.abs(np.where(np.isfinite(b64), b64, 0.0)), initial=0.0))
    return Match(name, exact, exact or tolerance.allows(diff, scale), diff)
