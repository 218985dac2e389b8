"""Mixed precision: every registered op in bfloat16 and float16 against float32.

For every op and every case of the registry, the forward output and the VJP (a random
cotangent) are computed in the low dtype and compared with the same op in float32 on the *same*
inputs — the low-precision inputs cast up to float32, so both sides see identical values (ties
that rounding creates in max-pool inputs are identical ties on both sides, broken the same way).
Pass: ``max |low − f32| ≤ rtol · max |f32|`` with ``tolerances.LOW_PRECISION_VS_FLOAT32``
(relative: bfloat16 ``rtol 3e-2`` is a few roundings of 2⁻⁸, not a fixed ``atol`` that would pass
anything on gradients of size 0.1; float16 ``rtol 3e-3``).
Outputs and cotangents keep the low dtype.

Then a whole training run in bfloat16 (float32 master weights) on the bundled digits.
"""

import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg
from handgrad import registry, tolerances

LOW_DTYPES = ("bfloat16", "float16")
SPECS = registry.specs()
# The quick suite: the first case of the first op of each family; `-m slow`: every case.
QUICK = registry.first_of_each_family()
CASES = [
    pytest.param(spec, case, dtype, id=f"{spec.name}-{dtype}-{case.id}",
                 marks=() if index == 0 and spec.name in QUICK and dtype == "bfloat16"
                 else (pytest.mark.slow,))
    for spec in SPECS
    for index, case in enumerate(spec.cases)
    for dtype in LOW_DTYPES
]


def _seed(*parts) -> int:
    """A stable digest of the case (hash() is salted per process); failures print it."""
    return zlib.crc32("/".join(parts).encode())


def _key(*parts):
    return jax.random.PRNGKey(_seed(*parts))


_ARGS: dict = {}


def _float32_args(spec, case):
    """The case's arguments drawn once in float32 and shared by both low dtypes, which round
    them: the registry's samplers draw in float32 and cast too."""
    name = (spec.name, case.id)
    if name not in _ARGS:
        _ARGS[name] = case.make_args(_key(spec.name, case.id), jnp.dtype("float32"))
    return _ARGS[name]


def _forward_and_vjp(spec, case, args, cotangent):
    """The op's output at `args` and the cotangents of its floating arguments."""
    diff = spec.diff_argnums(args)

    def f(*d):
        full = list(args)
        for i, v in zip(diff, d, strict=True):
            full[i] = v
        return spec.op(*full, **case.kwargs)

    out, pullback = jax.vjp(f, *(args[i] for i in diff))
    return out, pullback(cotangent.astype(out.dtype))


def _error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want), initial=0.0)), float(np.max(np.abs(want), initial=0.0))


@pytest.mark.parametrize("spec, case, dtype", CASES)
def test_low_precision_forward_and_vjp_match_float32(spec, case, dtype):
    low = jnp.dtype(dtype)
    tol = tolerances.LOW_PRECISION_VS_FLOAT32[dtype]
    args_low = tuple(a.astype(low) if jnp.issubdtype(a.dtype, jnp.floating) else a
                     for a in _float32_args(spec, case))
    # The float32 side gets the *rounded* inputs: identical values, identical ties.
    args_32 = tuple(a.astype(jnp.float32) if a.dtype == low else a for a in args_low)
    out_shape = jax.eval_shape(lambda *a: spec.op(*a, **case.kwargs), *args_low).shape
    # One cotangent, rounded to the low dtype, given to both sides.
    cot_low = jax.random.normal(_key(spec.name, case.id, "cot"), out_shape).astype(low)

    @jax.jit  # one program for both precisions: far cheaper than op-by-op dispatch
    def both(args_low, args_32, cot_low):
        return (_forward_and_vjp(spec, case, args_low, cot_low),
                _forward_and_vjp(spec, case, args_32, cot_low.astype(jnp.float32)))

    (out_low, grads_low), (out_32, grads_32) = both(args_low, args_32, cot_low)
    diff = spec.diff_argnums(args_low)
    assert out_low.dtype == low and out_32.dtype == jnp.float32
    assert out_low.shape == out_32.shape

    report = []
    err, scale = _error(out_low, out_32)
    ok = tol.allows(err, scale)
    report.append(f"output: max|err| {err:.2e}, max|f32| {scale:.2e}")
    for i, g_low, g_32 in zip(diff, grads_low, grads_32, strict=True):
        assert g_low.dtype == low, f"d{spec.argnames[i]} is {g_low.dtype}, expected {low}"
        assert g_low.shape == args_low[i].shape
        assert np.isfinite(np.asarray(g_low, np.float32)).all(), (
            f"d{spec.argnames[i]} not finite (seed {_seed(spec.name, case.id)})")
        err, scale = _error(g_low, g_32)
        ok &= tol.allows(err, scale)
        report.append(f"d{spec.argnames[i]}: max|err| {err:.2e}, max|f32| {scale:.2e}")
    assert ok, (f"{spec.name}[{case.id}] in {dtype} vs float32 (rtol {tol.rtol}, atol {tol.atol}; "
                f"seed {_seed(spec.name, case.id)}): " + "; ".join(report))


# --- long and ill-conditioned reductions ----------------------------------------------------
# The registry's cases are small (reductions over a handful of entries), where rounding barely
# accumulates. These stress the places where 16-bit arithmetic goes wrong: statistics of inputs
# with a large mean (variance by cancellation), softmax over thousands of classes, and long dot
# products — the ops' float32 accumulation must keep them within the same tolerance.


def _normal(key, shape, scale=1.0, shift=0.0):
    return shift + scale * jax.random.normal(key, shape, jnp.float32)


def _norm_stress(x_shape, features):
    def make(k):  # inputs with mean 100 and unit spread: variance by cancellation would fail
        return (_normal(k[0], x_shape, shift=100.0), _normal(k[1], (features,), 0.2, 1.0),
                _normal(k[2], (features,), 0.1)), {}

    return make


STRESS_ARGS = {  # name -> (keys -> (args, kwargs)), drawn in float32
    "layer_norm": _norm_stress((4, 256), 256),
    "batch_norm": _norm_stress((256, 4), 4),
    "softmax": lambda k: ((_normal(k[0], (4, 2048), 3.0),), {}),
    "log_softmax": lambda k: ((_normal(k[0], (4, 2048), 3.0),), {}),
    "softmax_cross_entropy": lambda k: ((_normal(k[0], (8, 2048), 3.0),
                                         jax.random.randint(k[1], (8,), 0, 2048)), {}),
    "squared_error": lambda k: ((_normal(k[0], (64, 512)), _normal(k[1], (64, 512))), {}),
    "dense": lambda k: ((_normal(k[0], (8, 4096)), _normal(k[1], (4, 4096), 1 / 64),
                         _normal(k[2], (4,))), {}),
    "conv2d": lambda k: ((_normal(k[0], (4, 64, 8, 8)), _normal(k[1], (8, 64, 3, 3), 1 / 24),
                          _normal(k[2], (8,))), {"padding": 1}),
    "avg_pool2d": lambda k: ((_normal(k[0], (2, 3, 16, 16)),), {"window": 8}),
}
STRESS = [pytest.param(name, dtype, id=f"{name}-{dtype}")
          for name in STRESS_ARGS for dtype in LOW_DTYPES]


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", STRESS)
def test_long_reductions_stay_within_tolerance(name, dtype):
    low = jnp.dtype(dtype)
    spec = registry.REGISTRY[name]
    args, kwargs = STRESS_ARGS[name](jax.random.split(_key("stress", name), 3))
    case = registry.Case(f"stress-{name}", lambda key, dtype: args, kwargs)
    args_low = tuple(a.astype(low) if jnp.issubdtype(a.dtype, jnp.floating) else a
                     for a in args)
    args_32 = tuple(a.astype(jnp.float32) if a.dtype == low else a for a in args_low)
    out_shape = jax.eval_shape(lambda *a: spec.op(*a, **kwargs), *args_low).shape
    cot_low = jax.random.normal(_key("stress", name, "cot"), out_shape).astype(low)
    both = jax.jit(lambda a, b, c: (_forward_and_vjp(spec, case, a, c),
                                    _forward_and_vjp(spec, case, b, c.astype(jnp.float32))))
    (out_low, grads_low), (out_32, grads_32) = both(args_low, args_32, cot_low)
    tol = tolerances.LOW_PRECISION_VS_FLOAT32[dtype]
    for what, got, want in [("output", out_low, out_32),
                            *((f"d{spec.argnames[i]}", g, w) for i, g, w in
                              zip(spec.diff_argnums(args_low), grads_low, grads_32,
                                  strict=True))]:
        assert got.dtype == low, what
        err, scale = _error(got, want)
        assert tol.allows(err, scale), (
            f"{name} {what} in {dtype}: max|err| {err:.3e} > {tol.atol} + {tol.rtol}·{scale:.3e} "
            f"(seed {_seed('stress', name)})")


def test_the_comparison_can_fail():
    """The check is not vacuous: a layer norm computed naively in bfloat16 (variance as
    E[x²] − E[x]², no float32 statistics) on inputs with a large mean misses the tolerance,
    where hg.layer_norm (float32 statistics) on the same inputs passes."""
    tol = tolerances.LOW_PRECISION_VS_FLOAT32["bfloat16"]
    x = (40 + jax.random.normal(jax.random.PRNGKey(0), (4, 64))).astype(jnp.bfloat16)
    gamma, beta = jnp.ones((64,), jnp.bfloat16), jnp.zeros((64,), jnp.bfloat16)

    def naive(x):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean
        return (x - mean) * jax.lax.rsqrt(jnp.maximum(var, 0) + jnp.bfloat16(1e-5))

    want = hg.layer_norm(x.astype(jnp.float32), gamma.astype(jnp.float32),
                         beta.astype(jnp.float32))
    assert not tol.allows(*_error(naive(x), want))
    assert tol.allows(*_error(hg.layer_norm(x, gamma, beta), want))


def test_a_wrong_small_gradient_fails_the_relative_tolerance():
    """On gradients of size ~0.1, the former fixed ``atol=2e-2`` let a 20 % error through
    (0.12 for 0.1); the relative tolerance catches it and still passes bfloat16 rounding."""
    tol = tolerances.LOW_PRECISION_VS_FLOAT32["bfloat16"]
    want = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (64,))
    assert not tol.allows(*_error((1.2 * want).astype(jnp.bfloat16), want))
    assert tol.allows(*_error(want.astype(jnp.bfloat16), want))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name, z", [("tanh", 2.0), ("tanh", -3.0), ("sigmoid", 4.0),
                                     ("sigmoid", 6.0), ("gelu", -4.8)])
def test_one_saturated_unit_in_low_precision_matches_float32(name, z, dtype):
    """A 1×1 input, so the relative error is that one unit's. tanh and sigmoid save their output
    in float32 for 16-bit inputs: a rounded to bfloat16 near 1 would leave 1 − a² (at tanh 2.0)
    or 1 − a (at sigmoid 4.0) 5–10 % off. gelu(−4.8) in float16 is subnormal: within its
    spacing, the tolerance's atol."""
    low = jnp.dtype(dtype)
    tol = tolerances.LOW_PRECISION_VS_FLOAT32[dtype]
    op = getattr(hg, name)
    x_low = jnp.full((1, 1), z, low)
    g_low = jnp.full((1, 1), 0.75, low)
    out_low, (dx_low,) = (lambda o, f: (o, f(g_low)))(*jax.vjp(op, x_low))
    out_32, (dx_32,) = (lambda o, f: (o, f(g_low.astype(jnp.float32))))(
        *jax.vjp(op, x_low.astype(jnp.float32)))
    assert dx_low.dtype == low
    for what, got, want in (("output", out_low, out_32), ("dx", dx_low, dx_32)):
        err, scale = _error(got, want)
        assert scale > 0 and tol.allows(err, scale), (
            f"{name}({z}) {what} in {dtype}: max|err| {err:.2e} of {scale:.2e} "
            f"(rtol {tol.rtol}, atol {tol.atol})")


# --- a bfloat16 training run ------------------------------------------------------------------


@pytest.mark.slow
def test_bfloat16_mlp_training_on_digits():  # 30 epochs of 45 steps
    import optax

    from handgrad import data as data_lib
    from handgrad import models, train

    data = data_lib.load_digits()
    spec = models.MODELS["mlp"]
    params = spec.init(jax.random.PRNGKey(0), data.image_shape, data.num_classes)
    loss_fn = models.classification_loss(spec.apply, ops=hg, compute_dtype=jnp.bfloat16)

    # The loss and gradients are computed in bfloat16; the master weights stay float32.
    x0, y0 = jnp.asarray(data.x_train[:8]), jnp.asarray(data.y_train[:8])
    grads = jax.grad(lambda p: loss_fn(p, (x0, y0))[0])(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    jaxpr = str(jax.make_jaxpr(lambda p: jax.grad(lambda q: loss_fn(q, (x0, y0))[0])(p))(params))
    assert "bf16" in jaxpr

    started = time.perf_counter()
    params, _, history, _ = train.fit(params, optax.adam(1e-3), loss_fn, data, epochs=30,
                                      batch_size=32, seed=0, progress=False)
    seconds = time.perf_counter() - started
    accuracy = history.epochs[-1]["test_accuracy"]
    print(f"bf16 MLP on digits: test accuracy {accuracy:.4f} after 30 epochs ({seconds:.1f} s); "
          f"train loss {history.epochs[0]['train_loss']:.3f} -> "
          f"{history.epochs[-1]['train_loss']:.3f}")
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]
    assert accuracy >= 0.96, history.to_json()
