"""Registry-driven op tests: every registered op, every case, every dtype, every platform.

One test body per property, the whole registry as its table (JAX's lax_autodiff_test style).
A new op is covered by registering it in handgrad/registry.py.

Every case runs with the fast paths on (the default); a case whose call the dispatch gives a
faster evaluation (``handgrad.ops.fast.describe``) runs again with them off, so that the
textbook evaluation of every formula is checked on the same shapes.
"""

import contextlib
import zlib

import jax
import jax.numpy as jnp
import pytest

import handgrad as hg
from handgrad import ops, registry, tolerances
from handgrad.ops import fast

SPECS = registry.specs()


def seed_of(case_id: str) -> int:
    """A stable seed from the case id (Python's hash() is salted per process)."""
    return zlib.crc32(case_id.encode())


def takes_fast_path(spec, case) -> bool:
    """Whether the dispatch gives some formula of this call a faster evaluation here."""
    args = case.make_args(jax.random.PRNGKey(0), jnp.float32)  # drawn on the host
    return any(path != "textbook" for path in fast.describe(spec.name, *args,
                                                            **case.kwargs).values())


QUICK_CASES = 1  # per op in the quick suite; every case under `-m slow`


def _case_params():
    """(spec, case, dtype, fast) for every case and dtype with fast paths on, and with them
    off for the cases that take one. The quick suite proves every op on its first
    QUICK_CASES cases in float64 (autodiff and finite differences), and the textbook
    evaluation on the first case that has a faster one; `-m slow` runs all the rest (every
    case, float32 and 16-bit dtypes, every case textbook)."""
    for spec in SPECS:
        first_textbook = True
        for index, case in enumerate(spec.cases):
            both_ways = takes_fast_path(spec, case)
            for dtype in spec.dtypes:
                quick = dtype == "float64" and index < QUICK_CASES
                yield pytest.param(spec, case, dtype, True, id=f"{spec.name}-{dtype}-{case.id}",
                                   marks=() if quick else (pytest.mark.slow,))
                if both_ways:
                    quick = dtype == "float64" and first_textbook
                    first_textbook = first_textbook and dtype != "float64"
                    yield pytest.param(
                        spec, case, dtype, False, id=f"{spec.name}-{dtype}-{case.id}-textbook",
                        marks=() if quick else (pytest.mark.slow,))


CASES = list(_case_params())


QUICK_FAMILY = registry.first_of_each_family()


def _quick_family(specs):
    """The quick suite's sample of a per-op property: the first op of each family (every op
    runs under `-m slow`)."""
    return [pytest.param(s, id=s.name, marks=() if s.name in QUICK_FAMILY else (pytest.mark.slow,))
            for s in specs]


def _second_order_params():
    """Grad-of-grad and vmap in float64: the first case of the first op of each family in the
    quick suite (and, with fast paths off, the first case that takes one), all in `-m slow`."""
    for spec in SPECS:
        f64 = [p for p in CASES if p.values[0] is spec and p.values[2] == "float64"]
        first_textbook = next((p for p in f64 if not p.values[3]), None)
        for index, p in enumerate(q for q in f64 if q.values[3]):
            quick = index == 0 and spec.name in QUICK_FAMILY
            yield pytest.param(*p.values, id=p.id, marks=() if quick else (pytest.mark.slow,))
        for p in f64:
            if not p.values[3]:
                yield pytest.param(*p.values, id=p.id,
                                   marks=() if p is first_textbook else (pytest.mark.slow,))


CASES_F64 = list(_second_order_params())


def _on(platform, args):
    device = jax.devices(platform)[0]
    return tuple(jax.device_put(a, device) for a in args)


def _precision(platform):
    # GPUs/TPUs run float32 matmuls and convolutions at reduced precision by default; the
    # exactness checks ask for full precision (verify.py reports the default too).
    if platform == "cpu":
        return contextlib.nullcontext()
    return jax.default_matmul_precision("highest")


def _check(spec, case, dtype, fast_paths, platform, **options):
    """check_vjp of the case, and the seed its inputs were drawn with (for the message)."""
    seed = seed_of(f"{spec.name}[{case.id}]")
    k_args, k_check = jax.random.split(jax.random.PRNGKey(seed))
    args = _on(platform, case.make_args(k_args, jnp.dtype(dtype)))
    # "on" leaves the switch as it is (HANDGRAD_FAST_PATHS=0 runs the whole table textbook).
    switch = contextlib.nullcontext() if fast_paths else hg.fast_paths(False)
    with jax.default_device(jax.devices(platform)[0]), _precision(platform), switch:
        result = hg.check_vjp(spec.op, spec.reference, *args, kwargs=case.kwargs, key=k_check,
                              name=f"{spec.name}[{case.id}]",
                              nondet_tol=tolerances.nondeterminism_tolerance(dtype, platform),
                              **{**case.check, **options})
    enabled = fast_paths and hg.fast_paths_enabled()
    return result, f"seed {seed}, fast paths {'on' if enabled else 'off'}: {result}"


@pytest.mark.parametrize("spec, case, dtype, fast_paths", CASES)
def test_vjp_matches_autodiff_and_finite_differences(spec, case, dtype, fast_paths, platform):
    result, report = _check(spec, case, dtype, fast_paths, platform,
                            finite_differences=dtype == "float64")
    assert result.ok, report
    if dtype == "float64":
        assert any("finite diff" in c.what for c in result.comparisons), report


# On GPUs JAX differentiates reduce_window max a second time at reduced precision (its
# UserWarning: "Using reduced precision for gradient of reduce-window min/max operator"): there
# the reference's own J·u is only float32-accurate (3e-7 on an H200), not the hand rule's.
REFERENCE_SECOND_ORDER_REDUCED_OFF_CPU = {"max_pool2d": 1e-5}


@pytest.mark.parametrize("spec, case, dtype, fast_paths", CASES_F64)
def test_grad_of_grad_and_vmap(spec, case, dtype, fast_paths, platform):
    result, report = _check(spec, case, dtype, fast_paths, platform, finite_differences=False,
                            second_order=spec.second_order, vmap=True)
    bound = REFERENCE_SECOND_ORDER_REDUCED_OFF_CPU.get(spec.name)
    if platform != "cpu" and bound is not None:
        wrong = [c for c in result.comparisons if not c.ok]
        assert all(c.what.startswith("grad-of-grad cotangent") and c.unverified == ""
                   and c.max_abs_err <= bound * max(c.ref_scale, 1.0) for c in wrong), report
        return
    assert result.ok, report


def test_switch_off_traces_the_textbook_evaluation_of_cases_run_both_ways():
    """The "-textbook" runs above are not repeats: with the switch off, describe names no fast
    path and the traced VJP differs from the one with it on — for one case of each op per
    combination of evaluations (tracing only, nothing compiled)."""
    seen = set()
    for spec in SPECS:
        for case in spec.cases:
            args = case.make_args(jax.random.PRNGKey(0), jnp.float32)
            with hg.fast_paths(True):
                evaluations = tuple(fast.describe(spec.name, *args, **case.kwargs).items())
            if set(dict(evaluations).values()) == {"textbook"} or (spec.name,
                                                                   evaluations) in seen:
                continue
            seen.add((spec.name, evaluations))
            f, floating = spec.of_floating_args(args, case.kwargs)

            def traced_vjp(f=f, floating=floating):
                def program(*a):  # a new function each time: JAX caches traces per function
                    out, pullback = jax.vjp(f, *a)
                    return pullback(jnp.ones_like(out))
                return str(jax.make_jaxpr(program)(*floating))

            with hg.fast_paths(False):
                textbook = traced_vjp()
                described = fast.describe(spec.name, *args, **case.kwargs)
            with hg.fast_paths(True):
                tuned = traced_vjp()
            assert set(described.values()) == {"textbook"}, (spec.name, case.id, described)
            assert textbook != tuned, f"{spec.name}[{case.id}]: the switch changed nothing"
            assert "platform_index" not in textbook, f"{spec.name}[{case.id}]"
    assert {name for name, _ in seen} >= {"conv2d", "max_pool2d", "avg_pool2d"}


@pytest.mark.parametrize("spec", _quick_family(SPECS))
def test_jaxpr_contains_custom_vjp_call(spec):
    case = spec.cases[0]
    args = case.make_args(jax.random.PRNGKey(0), jnp.dtype("float32"))
    jaxpr = str(jax.make_jaxpr(lambda *a: spec.op(*a, **case.kwargs))(*args))
    assert "custom_vjp_call" in jaxpr, jaxpr


def _value_and_pullback_of_ones(f, *args):
    out, pullback = jax.vjp(f, *args)
    return out, pullback(jnp.ones_like(out))


@pytest.mark.parametrize("spec", _quick_family(SPECS))
def test_cotangents_keep_dtype_bfloat16(spec):
    """Every cotangent has its primal's dtype, also for bfloat16 (JAX does not enforce it)."""
    case = spec.cases[0]
    args = case.make_args(jax.random.PRNGKey(0), jnp.dtype("bfloat16"))
    f, floating = spec.of_floating_args(args, case.kwargs)
    out, grads = jax.jit(lambda *a: _value_and_pullback_of_ones(f, *a))(*floating)
    assert out.dtype == jnp.bfloat16
    for primal, g in zip(floating, grads):
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
