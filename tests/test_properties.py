"""Hypothesis over the registry: every op, on shapes and options drawn by hypothesis.

For each OpSpec (the registry as it is at collection time, so ops registered later are covered
without touching this file), hypothesis draws a case with ``spec.random_case(draw)`` and a PRNG
seed for its inputs; ``check_vjp`` must pass in float64 against autodiff and finite
differences. A quick variant (a few examples per op) runs by default; a ``slow`` one draws 200
per op against autodiff.
"""

import jax
import jax.numpy as jnp
import pytest
from conftest import release_compiled_programs_if_needed
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import handgrad as hg
from handgrad import registry

SPECS = [pytest.param(spec, id=spec.name) for spec in registry.specs()]
# Example counts come from the hypothesis profile (tests/conftest.py): a drawn case with new
# shapes compiles check_vjp's program afresh, which is most of an example's time. The quick
# profile's two per op keep the default run short (test_ops.py covers the fixed cases); the
# slow variant takes the "full" profile, 200 per op.
FULL = settings.get_profile("full")


def _check_drawn_case(spec, data, finite_differences=True):
    release_compiled_programs_if_needed()  # 200 examples compile thousands of programs
    case = spec.random_case(lambda lo, hi: data.draw(st.integers(lo, hi)))
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    k_args, k_check = jax.random.split(jax.random.PRNGKey(seed))
    args = case.make_args(k_args, jnp.dtype("float64"))  # drawn on the host: nothing compiled
    result = hg.check_vjp(spec.op, spec.reference, *args, kwargs=case.kwargs, key=k_check,
                          name=f"{spec.name}[{case.id}]",
                          finite_differences=finite_differences)
    # A draw in which no input reaches an output (a 1×1 image whose strided windows read only
    # padding; one negative entry under slope 0; causal attention where each query sees one
    # key, so dq = dk = 0) proves nothing: both sides are exactly zero. Such a draw is not
    # counted (hypothesis draws another); anything else that is not ok fails.
    failing = [c for c in result.comparisons if not c.ok]
    vacuous = failing and all(c.within and c.zero_reference and c.hand_scale == 0.0
                              and c.unverified for c in failing)
    assume(not (vacuous and not result.problems))
    assert result.ok, str(result)
    if finite_differences:
        assert any("finite diff" in c.what for c in result.comparisons), str(result)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
@given(data=st.data())
def test_random_case_vjp_matches_autodiff_and_finite_differences(spec, data):
    _check_drawn_case(spec, data)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
@settings(FULL)
@given(data=st.data())
def test_random_case_vjp_matches_autodiff_slow(spec, data):
    # 200 drawn cases per op, forward and VJP against autodiff (float64, rtol 1e-10). Finite
    # differences, grad-of-grad and vmap run on the quick draws above and on every fixed
    # registered case (tests/test_ops.py): compiling them for 3,600 fresh shapes would take
    # CI most of an hour for little extra coverage.
    _check_drawn_case(spec, data, finite_differences=False)
