"""Test configuration: float64 on (finite differences need it), strict shapes.

``jax_numpy_rank_promotion="raise"`` turns an accidental broadcast into an error instead of a
silently wrong gradient (a ``db`` of the wrong rank, say), as equinox's tests do.
"""

import os

# The suite compiles hundreds of small XLA programs and runs each once or twice: LLVM's
# optimizations cost more time than they save here (about 2× on the op checks). Results do
# not depend on it; benchmarks never run under this flag.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

from hypothesis import settings  # noqa: E402

from handgrad.verification import available_platforms  # noqa: E402

# Small example counts by default; `-m slow` runs and HANDGRAD_HYPOTHESIS_PROFILE=full use more.
settings.register_profile("quick", max_examples=10, deadline=None, derandomize=False)
settings.register_profile("full", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HANDGRAD_HYPOTHESIS_PROFILE", "quick"))


PLATFORMS = ("cpu", "gpu", "tpu")


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs after every test. A worker runs hundreds of tests that each
    compile fresh shapes; every XLA:CPU executable keeps memory mappings, and without this a
    worker reached ~52,000 of Linux's 65,530 (vm.max_map_count) and LLVM segfaulted on the
    next compile. Tests share almost no programs, so nothing is lost."""
    yield
    jax.clear_caches()


@pytest.fixture(params=PLATFORMS)
def platform(request):
    """Every platform: the present ones run, the absent ones are skipped with the reason."""
    if request.param not in available_platforms():
        pytest.skip(f"no {request.param} device: jax.devices() offers {jax.devices()}")
    return request.param
