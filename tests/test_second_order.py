"""Second order through the hand-written VJPs: hg.hessian and hg.hvp (reverse-over-reverse)
against jax.hessian (forward-over-reverse) of the plain-JAX reference, for every registered op.

``jax.hessian`` cannot differentiate a ``custom_vjp`` (pinned below), but it can differentiate
``spec.reference``, which has no custom rule: the two Hessians must agree to float64's
autodiff tolerance in handgrad/tolerances.py (1e-12 relative).

The scalar under test is ``f = Σ c ⊙ y + Σ c' ⊙ tanh(y)`` with ``y = op(args)`` and fixed random
cotangents ``c, c'`` (``y + tanh(y)`` for losses, whose ``y`` is already a scalar). The linear
term's Hessian is Σ cᵢ ∇²yᵢ: it tests the derivative of the backward pass w.r.t. its
residuals. The tanh term adds Jᵀ·diag(c'·tanh''(y))·J: it tests the first-order VJP inside a
second-order computation, and keeps the Hessian non-zero for piecewise-linear ops (relu,
max-pool, dropout, flatten, dense in x), whose linear-term Hessian is exactly zero. One scalar
with both terms costs half of two separate ones.
"""

import math
import re
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg
from handgrad import registry, tolerances

DOCS = Path(__file__).resolve().parents[1] / "docs" / "derivations.md"
RTOL = tolerances.autodiff_tolerance("float64").rtol
ATOL = tolerances.autodiff_tolerance("float64").atol
HESSIAN_MAX_SIZE = 64  # the Hessian is size²: larger arguments get hvp only
FAMILIES = ("dense", "activations", "losses", "conv", "pooling", "norm", "dropout", "embedding",
            "recurrent", "attention")
SPECS = registry.specs()


def test_every_family_is_covered():
    assert {spec.family for spec in SPECS} == set(FAMILIES), (
        "a new op family: add it to FAMILIES (and check its second order here)"
    )


def _key(spec, salt):
    """A key from a stable digest of the case (hash() is salted per process), printed: pytest
    shows it with a failure."""
    seed = zlib.crc32(f"{spec.name}/{salt}".encode())
    print(f"seed {seed} ({spec.name}/{salt})")
    return jax.random.PRNGKey(seed)


def _args(spec, case):
    return case.make_args(_key(spec, case.id), jnp.dtype("float64"))


def _scalar_fn(spec, case, args, fn):
    """(f(*diff_args), diff_argnums): the scalar of `fn` (op or reference) over the floating
    arguments, the others (integer labels) held fixed."""
    diff = spec.diff_argnums(args)
    out_shape = jax.eval_shape(lambda *a: spec.reference(*a, **case.kwargs), *args)
    k1, k2 = jax.random.split(_key(spec, "cotangent"))
    c1 = jax.random.normal(k1, out_shape.shape, jnp.float64)
    c2 = jax.random.normal(k2, out_shape.shape, jnp.float64)

    def f(*d):
        full = list(args)
        for i, v in zip(diff, d, strict=True):
            full[i] = v
        y = fn(*full, **case.kwargs)
        if spec.family == "losses":
            return y + jnp.tanh(y)
        return jnp.sum(c1 * y) + jnp.sum(c2 * jnp.tanh(y))

    return f, diff


def _assert_close(got, want, what):
    got_leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(got)]
    want_leaves = [np.asarray(w) for w in jax.tree_util.tree_leaves(want)]
    assert len(got_leaves) == len(want_leaves), what
    scale = max(float(np.max(np.abs(w), initial=0.0)) for w in want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype == np.float64, (what, g.shape, w.shape)
        err = float(np.max(np.abs(g - w), initial=0.0))
        assert err <= ATOL + RTOL * scale, f"{what}: max |err| {err:.3e}, max |ref| {scale:.3e}"
    return scale


def _total_size(args, diff):
    return sum(args[i].size for i in diff)


def _hessian_case(spec):
    """The first case whose floating arguments hold at most HESSIAN_MAX_SIZE entries in all."""
    for case in spec.cases:
        args = _args(spec, case)
        if _total_size(args, spec.diff_argnums(args)) <= HESSIAN_MAX_SIZE:
            return case
    return None


# The quick suite: the first op of each family; `-m slow`: every op.
QUICK = registry.first_of_each_family()
PARAMS = [pytest.param(spec, id=f"{spec.family}-{spec.name}",
                       marks=() if spec.name in QUICK else (pytest.mark.slow,))
          for spec in SPECS]


@pytest.mark.parametrize("spec", PARAMS)
def test_hessian_matches_jax_hessian_of_reference(spec):
    case = _hessian_case(spec)
    if case is None:
        pytest.skip(f"{spec.name}: every case has > {HESSIAN_MAX_SIZE} floating entries "
                    "(hvp only)")
    args = _args(spec, case)
    f_hg, diff = _scalar_fn(spec, case, args, spec.op)
    f_ref, _ = _scalar_fn(spec, case, args, spec.reference)
    d_args = tuple(args[i] for i in diff)

    # Every block, the mixed ones (∂²f/∂x∂w, …) included: argnums as a tuple.
    argnums = tuple(range(len(d_args)))
    blocks_hg = jax.jit(hg.hessian(f_hg, argnums=argnums))(*d_args)
    blocks_ref = jax.jit(jax.hessian(f_ref, argnums=argnums))(*d_args)
    # The basic check first: w.r.t. the first floating argument (shape x.shape + x.shape).
    assert blocks_hg[0][0].shape == d_args[0].shape * 2
    _assert_close(blocks_hg[0][0], blocks_ref[0][0],
                  f"{spec.name}[{case.id}] hessian w.r.t. {spec.argnames[diff[0]]}")
    scale = _assert_close(blocks_hg, blocks_ref, f"{spec.name}[{case.id}] full hessian")
    assert scale > 0  # the test can fail: the Hessian is not trivially zero


# hvp in the quick suite for the ops whose first case is too big for a Hessian test's case
HVP_QUICK = {"conv2d", "rnn", "attention"}
HVP_PARAMS = [pytest.param(spec, id=f"{spec.family}-{spec.name}",
                           marks=() if spec.name in HVP_QUICK else (pytest.mark.slow,))
              for spec in SPECS]


@pytest.mark.parametrize("spec", HVP_PARAMS)
def test_hvp_matches_jax_hessian_of_reference_times_v(spec):
    case = spec.cases[0]  # the first case, whatever its size
    args = _args(spec, case)
    f_hg, diff = _scalar_fn(spec, case, args, spec.op)
    f_ref, _ = _scalar_fn(spec, case, args, spec.reference)
    d_args = tuple(args[i] for i in diff)
    keys = jax.random.split(_key(spec, "v"), len(d_args))
    v = tuple(jax.random.normal(k, a.shape, jnp.float64) for k, a in zip(keys, d_args))

    hv = jax.jit(lambda a, t: hg.hvp(lambda p: f_hg(*p), a, t))(d_args, v)
    # H·v of the reference by forward-over-reverse (JAX's own hvp): one jvp of its gradient,
    # where the full jax.hessian would cost one per entry.
    grad_ref = jax.grad(lambda p: f_ref(*p))
    want = jax.jit(lambda a, t: jax.jvp(grad_ref, (a,), (t,))[1])(d_args, v)
    assert isinstance(hv, tuple) and len(hv) == len(d_args)
    _assert_close(hv, want, f"{spec.name}[{case.id}] hvp ({_total_size(args, diff)} entries)")


def test_hvp_accepts_a_single_array_and_hessian_is_symmetric():
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 4), jnp.float64)
    w = jax.random.normal(jax.random.PRNGKey(4), (2, 4), jnp.float64)

    def f(x):
        return hg.softmax_cross_entropy(hg.tanh(hg.dense(x, w)), jnp.array([0, 1, 1]))

    h = jax.jit(hg.hessian(f))(x).reshape(x.size, x.size)
    np.testing.assert_allclose(h, h.T, rtol=0, atol=1e-13)
    v = jax.random.normal(jax.random.PRNGKey(5), x.shape, jnp.float64)
    hv = jax.jit(lambda x, v: hg.hvp(f, x, v))(x, v)
    np.testing.assert_allclose(hv.ravel(), h @ v.ravel(), rtol=1e-12, atol=1e-14)


# --- what does not work, and that the docs say so -----------------------------------------

JVP_MESSAGE = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"


# jax.hessian = jacfwd(jacrev(f)). In JAX 0.10 the reverse pass of a custom_vjp is traced as a
# `custom_lin` whose transpose simply calls the hand backward, so the outer forward mode only
# reaches a custom_vjp (and raises) when `_fwd` or `_bwd` calls a custom_vjp op (the op itself
# or another one, e.g. a loss's `_fwd` calling log_softmax). max_pool2d's `_fwd` computes the
# max directly and keeps only the integer argmax (plus a constant zero-size witness);
# softmax_cross_entropy's keeps the logits and their log-sum-exp, computed in plain JAX —
# nothing for forward mode to trip on, so jax.hessian happens to work there (and is checked
# against the reference's). jax.jvp (hence jax.jacfwd) always raises.
# The sequence ops rnn, lstm and gru likewise: their `_fwd` runs the forward scan once in plain
# JAX and keeps its states as residuals (calling the op for the primal would run the recurrence
# twice), and their `_bwd` is a plain reverse scan (derivations §10.6). rnn_step's `_fwd` too
# computes h in plain JAX (to keep it in float32); lstm_step and gru_step call the op, and raise.
JAX_HESSIAN_SUCCEEDS = {"sigmoid", "tanh", "max_pool2d", "softmax_cross_entropy", "rnn", "lstm",
                        "gru", "rnn_step"}
# One op per family (the first that raises), and the exceptions.
FORWARD_MODE_PARAMS = [
    pytest.param(spec, id=f"{family}-{spec.name}",
                 marks=() if family in ("dense", "conv", "recurrent") else (pytest.mark.slow,))
    for family in FAMILIES
    for spec in [next(s for s in SPECS
                      if s.family == family and s.name not in JAX_HESSIAN_SUCCEEDS)]
] + [pytest.param(s, id=f"{s.family}-{s.name}", marks=pytest.mark.slow)
     for s in SPECS if s.name in JAX_HESSIAN_SUCCEEDS]


@pytest.mark.parametrize("spec", FORWARD_MODE_PARAMS)
def test_forward_mode_on_a_handgrad_op_raises(spec):
    case = _hessian_case(spec) or spec.cases[0]
    args = _args(spec, case)
    f, diff = _scalar_fn(spec, case, args, spec.op)
    x = args[diff[0]]
    g = lambda x: f(x, *(args[i] for i in diff[1:]))  # noqa: E731
    assert math.isfinite(float(jax.jit(g)(x)))  # the function itself is fine
    # JAX 0.10 raises TypeError (the message is what users search for).
    with pytest.raises(TypeError, match=re.escape(JVP_MESSAGE)):
        jax.jvp(g, (x,), (jnp.ones_like(x),))
    if spec.name in JAX_HESSIAN_SUCCEEDS:
        f_ref, _ = _scalar_fn(spec, case, args, spec.reference)
        g_ref = lambda x: f_ref(x, *(args[i] for i in diff[1:]))  # noqa: E731
        _assert_close(jax.jit(jax.hessian(g))(x), jax.jit(jax.hessian(g_ref))(x),
                      f"jax.hessian({spec.name})")
    else:
        with pytest.raises(TypeError, match=re.escape(JVP_MESSAGE)):
            jax.jit(jax.hessian(g))(x)


def test_docs_explain_the_jvp_error_and_reverse_over_reverse():
    text = DOCS.read_text(encoding="utf-8")
    assert "§9" in text
    start = text.index("## §9")
    end = text.find("\n## ", start + 1)
    section = text[start:] if end < 0 else text[start:end]
    assert re.search(r"reverse[- ]over[- ]reverse", section, re.IGNORECASE), (
        "docs/derivations.md §9 should name reverse-over-reverse"
    )
    # The error the docs quote is the one JAX raises, with its class.
    with pytest.raises(TypeError) as info:
        jax.hessian(lambda x: jnp.sum(hg.relu(x)))(jnp.ones(3))
    assert f"TypeError: {str(info.value).strip()}" in section
    assert JVP_MESSAGE in section
    # ...and the API points there too.
    assert "jax.hessian" in (hg.hessian.__doc__ or "") and "§9" in (hg.second_order.__doc__ or "")
