"""XLA flags for runs that compile many small programs and run each once or twice.

The test suite and ``handgrad verify`` compile a fresh program for every op, case and shape they
check. For them LLVM's optimizations (``--xla_backend_optimization_level=0``) and XLA:CPU's newer
fusion emitters (``--xla_cpu_use_fusion_emitters=false`` falls back to the loop emitters) cost
more compile time than they save at run time; docs/performance.md#compile-flags has the figures.
Results agree to round-off either way. Benchmarks and training never set these.

XLA aborts the process on a flag it does not know, and flags come and go between jaxlib
releases: each one is tried once, in a subprocess, and kept only if JAX starts with it. The
verdict is left in the environment, so child processes (pytest-xdist's workers) reuse it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)
_VERDICT = "HANDGRAD_COMPILE_FLAGS"  # the flags found to work, once tried
# every backend present parses XLA_FLAGS (a GPU plugin with its own copy of XLA too)
_PROBE = "import jax; [d.client for d in jax.devices()]; jax.numpy.zeros(1).block_until_ready()"


def _try(flags: list[str]) -> str | None:
    """None if JAX starts every backend with ``flags``, else what the failed start said."""
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                              text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None if done.returncode == 0 else (done.stderr.strip()[-500:] or
                                              f"exit code {done.returncode}")


def supported_flags() -> list[str]:
    """The flags of :data:`FLAGS` this JAX accepts (tried once per process tree). A dropped
    flag is a warning, with what the failed start said."""
    if _VERDICT in os.environ:
        return os.environ[_VERDICT].split()
    flags = list(FLAGS)
    if _try(flags) is not None:
        flags = []
        for flag in FLAGS:
            failure = _try([flag])
            if failure is None:
                flags.append(flag)
            else:
                warnings.warn(f"XLA flag {flag} left out: JAX did not start with it "
                              f"({failure})", RuntimeWarning, stacklevel=2)
    os.environ[_VERDICT] = " ".join(flags)
    return flags


def use_compile_fast_flags() -> None:
    """Add the supported flags to ``XLA_FLAGS``, each unless the user set that flag already.
    Call it before JAX starts its backend (XLA reads the flags then, once per process):
    importing jax does not start it, the first computation or ``jax.devices()`` does."""
    if backend_started():
        warnings.warn("JAX's backend has started: XLA_FLAGS set now take effect only in "
                      "child processes", RuntimeWarning, stacklevel=2)
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in supported_flags() if f.split("=")[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def backend_started() -> bool:
    """Whether JAX's backend has started in this process (its XLA_FLAGS are then fixed)."""
    if "jax" not in sys.modules:
        return False
    try:  # not public API: where it moves, no warning rather than an error
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False
