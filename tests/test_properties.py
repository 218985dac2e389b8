"""Hypothesis over the registry: every op, on shapes and options drawn by hypothesis.

For each OpSpec (the registry as it is at collection time, so ops registered later are covered
without touching this file), hypothesis draws a case with ``spec.random_case(draw)`` and a PRNG
seed for its inputs; ``check_vjp`` must pass in float64 with finite differences. A quick variant
(a few examples per op) runs by default; a ``slow`` one draws 200 per op and adds grad-of-grad
and vmap.
"""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handgrad as hg
from handgrad import registry

SPECS = [pytest.param(spec, id=spec.name) for spec in registry.specs()]
# Every drawn case has new shapes, so check_vjp compiles afresh: ~1–3 s of CPU per example
# (conv2d and the norms the dearest), and the registry keeps growing. Two per op keep the default
# run fast (test_ops.py covers the fixed cases); the slow variant draws 200 per op.
QUICK_EXAMPLES = 2
SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large]

_make_args = jax.jit(lambda make, key: make(key, jnp.dtype("float64")), static_argnums=0)


def _check_drawn_case(spec, data, **options):
    case = spec.random_case(lambda lo, hi: data.draw(st.integers(lo, hi)))
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    k_args, k_check = jax.random.split(jax.random.PRNGKey(seed))
    # one jitted program draws the inputs: cheaper than eager jax.random per shape
    args = _make_args(case.make_args, k_args)
    result = hg.check_vjp(spec.op, spec.reference, *args, kwargs=case.kwargs, key=k_check,
                          name=f"{spec.name}[{case.id}]", finite_differences=True, **options)
    assert result.ok, str(result)
    assert any("finite diff" in c.what for c in result.comparisons), str(result)
    return result


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=QUICK_EXAMPLES, deadline=None, suppress_health_check=SUPPRESS)
@given(data=st.data())
def test_random_case_vjp_matches_autodiff_and_finite_differences(spec, data):
    _check_drawn_case(spec, data)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=200, deadline=None, suppress_health_check=SUPPRESS)
@given(data=st.data())
def test_random_case_all_checks_slow(spec, data):
    _check_drawn_case(spec, data, second_order=spec.second_order, vmap=True)
