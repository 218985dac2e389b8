"""Test configuration: float64 on (finite differences need it), strict shapes.

``jax_numpy_rank_promotion="raise"`` turns an accidental broadcast into an error instead of a
silently wrong gradient (a ``db`` of the wrong rank, say), as equinox's tests do.
"""

import os
import re

import jax
import pytest
from hypothesis import HealthCheck, settings

from handgrad._compile_flags import use_compile_fast_flags

# The suite compiles thousands of small XLA programs and runs each once or twice: XLA flags
# that make compiling cheaper (LLVM at level 0, XLA:CPU's loop emitters) save more than they
# cost (handgrad/_compile_flags.py). Results do not depend on them; benchmarks never use them,
# and test_promises.py runs one training parity test at XLA's defaults. XLA reads them when
# JAX starts its backend: importing jax and handgrad does not, importing the registry does.
use_compile_fast_flags()

# Under pytest-xdist every worker is a process of its own: on a GPU each would take JAX's default
# 75 % of the memory at start, and the second one fails with CUDA_ERROR_OUT_OF_MEMORY.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

from handgrad.verification import available_platforms  # noqa: E402  (starts the backend)

# Hypothesis: example counts come from the profile (no test sets max_examples), draws are
# derandomized (the same examples every run, so a CI failure replays locally) and a failure
# prints the blob that reproduces it. "quick" is the default; `-m slow` tests take "full".
# HANDGRAD_HYPOTHESIS_PROFILE=full gives the quick tests the full counts too.
_COMMON = dict(deadline=None, derandomize=True, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("quick", max_examples=2, **_COMMON)
settings.register_profile("full", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("HANDGRAD_HYPOTHESIS_PROFILE", "quick"))

def memory_mappings() -> int | None:
    """How many memory mappings this process holds (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def release_compiled_programs_if_needed(limit: int = 20_000) -> None:
    """Drop JAX's compiled programs when this process holds more than `limit` memory mappings.
    Every XLA:CPU executable keeps some, and a worker that reached ~52,000 of Linux's 65,530
    (vm.max_map_count) segfaulted in LLVM on its next compile. Where the count cannot be read,
    drop them every time. Hypothesis tests call this between examples too (each example compiles
    fresh shapes)."""
    count = memory_mappings()
    if count is None or count > limit:
        jax.clear_caches()


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """After each test, as needed: neighbouring tests share some programs (references,
    models), which clearing after every test would compile again."""
    yield
    release_compiled_programs_if_needed()


def pytest_generate_tests(metafunc):
    """`platform`: every backend present here (CPU always; GPU and TPU when there). An absent
    one is not collected at all, so a skip never stands for a test that could not run."""
    if "platform" in metafunc.fixturenames:
        metafunc.parametrize("platform", available_platforms())


# A skip is a test that did not run. Only an accelerator's absence may excuse one; any other
# (a missing declared dependency, a case that matched nothing) fails the run.
ALLOWED_SKIP = re.compile(r"\b(gpu|tpu|accelerator)\b", re.IGNORECASE)
_UNEXPECTED_SKIPS = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not ALLOWED_SKIP.search(reason):
            _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    # under xdist the controller receives every worker's reports: it decides
    if _UNEXPECTED_SKIPS and exitstatus == 0 and not hasattr(session.config, "workerinput"):
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _UNEXPECTED_SKIPS:
        terminalreporter.section("skips that fail the run", sep="!")
        for line in _UNEXPECTED_SKIPS:
            terminalreporter.line(line)
