"""Registry-driven op tests: every registered op, every case, every dtype, every platform.

One test body per property, the whole registry as its table (JAX's lax_autodiff_test style).
A new op is covered by registering it in handgrad/registry.py.
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest

import handgrad as hg
from handgrad import ops, registry

SPECS = registry.specs()
CASES = [
    pytest.param(spec, case, dtype, id=f"{spec.name}-{dtype}-{case.id}")
    for spec in SPECS
    for case in spec.cases
    for dtype in spec.dtypes
]
# Grad-of-grad and vmap: the first three cases of each op in the quick suite, all in `-m slow`.
CASES_F64 = [
    pytest.param(*p.values, id=p.id,
                 marks=() if spec_index < 3 else (pytest.mark.slow,))
    for spec in SPECS
    for spec_index, p in enumerate(
        q for q in CASES if q.values[0] is spec and q.values[2] == "float64")
]


def _on(platform, args):
    device = jax.devices(platform)[0]
    return tuple(jax.device_put(a, device) for a in args)


def _precision(platform):
    # GPUs/TPUs run float32 matmuls and convolutions at reduced precision by default; the
    # exactness checks ask for full precision (verify.py reports the default too).
    if platform == "cpu":
        return contextlib.nullcontext()
    return jax.default_matmul_precision("highest")


def _check(spec, case, dtype, platform, **options):
    key = jax.random.PRNGKey(abs(hash((spec.name, case.id))) % (2**31))
    k_args, k_check = jax.random.split(key)
    args = _on(platform, case.make_args(k_args, jnp.dtype(dtype)))
    with jax.default_device(jax.devices(platform)[0]), _precision(platform):
        return hg.check_vjp(spec.op, spec.reference, *args, kwargs=case.kwargs, key=k_check,
                            name=f"{spec.name}[{case.id}]", **{**case.check, **options})


@pytest.mark.parametrize("spec, case, dtype", CASES)
def test_vjp_matches_autodiff_and_finite_differences(spec, case, dtype, platform):
    result = _check(spec, case, dtype, platform, finite_differences=dtype == "float64")
    assert result.ok, str(result)
    if dtype == "float64":
        assert any("finite diff" in c.what for c in result.comparisons), str(result)


@pytest.mark.parametrize("spec, case, dtype", CASES_F64)
def test_grad_of_grad_and_vmap(spec, case, dtype, platform):
    result = _check(spec, case, dtype, platform, finite_differences=False,
                    second_order=spec.second_order, vmap=True)
    assert result.ok, str(result)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_jaxpr_contains_custom_vjp_call(spec):
    case = spec.cases[0]
    args = case.make_args(jax.random.PRNGKey(0), jnp.dtype("float32"))
    jaxpr = str(jax.make_jaxpr(lambda *a: spec.op(*a, **case.kwargs))(*args))
    assert "custom_vjp_call" in jaxpr, jaxpr


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_cotangents_keep_dtype_bfloat16(spec):
    """Every cotangent has its primal's dtype, also for bfloat16 (JAX does not enforce it)."""
    case = spec.cases[0]
    args = case.make_args(jax.random.PRNGKey(0), jnp.dtype("bfloat16"))
    f, floating = spec.of_floating_args(args, case.kwargs)
    out, pullback = jax.vjp(f, *floating)
    assert out.dtype == jnp.bfloat16
    for primal, g in zip(floating, pullback(jnp.ones_like(out))):
        assert g.dtype == primal.dtype and g.shape == primal.shape


BAD = [
    pytest.param(spec, bad, id=f"{spec.name}-{bad.id}")
    for spec in SPECS
    for bad in spec.bad_inputs
]


@pytest.mark.parametrize("spec, bad", BAD)
def test_bad_input_raises_clear_error_at_trace_time(spec, bad):
    args = bad.args()
    # At trace time: inside jit, before XLA sees anything.
    with pytest.raises(bad.error, match=bad.match):
        jax.jit(lambda *a: spec.op(*a, **bad.kwargs))(*args)
    with pytest.raises(bad.error, match=bad.match):
        spec.op(*args, **bad.kwargs)


def test_every_public_op_is_registered():
    assert set(ops.OP_NAMES) == set(registry.REGISTRY), (
        "every public op needs an OpSpec in handgrad/registry.py"
    )
    for name in ops.OP_NAMES:
        assert getattr(hg, name) is getattr(ops, name)
        assert callable(getattr(hg.reference, name)), f"hg.reference.{name} is missing"


def test_every_op_has_bad_input_cases_and_a_derivation():
    for spec in SPECS:
        assert spec.bad_inputs, f"{spec.name} has no bad-input cases"
        assert spec.derivation.startswith("§"), spec.name
        assert spec.name in (spec.op.__doc__ or "") or spec.derivation in (spec.op.__doc__ or "")
