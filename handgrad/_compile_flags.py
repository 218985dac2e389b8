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

FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)
_VERDICT = "HANDGRAD_COMPILE_FLAGS"  # the flags found to work, once tried


def _starts_with(flags: list[str]) -> bool:
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"]
    try:
        return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def supported_flags() -> list[str]:
    """The flags of :data:`FLAGS` this jaxlib accepts (tried once per process tree)."""
    if _VERDICT in os.environ:
        return os.environ[_VERDICT].split()
    flags = list(FLAGS) if _starts_with(list(FLAGS)) else [
        flag for flag in FLAGS if _starts_with([flag])]
    os.environ[_VERDICT] = " ".join(flags)
    return flags


def use_compile_fast_flags() -> None:
    """Add the supported flags to ``XLA_FLAGS``, each unless the user set that flag already.
    Call it before JAX starts its backend (XLA reads the flags then, once per process)."""
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in supported_flags() if f.split("=")[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
