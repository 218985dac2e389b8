"""Faster evaluations of the same formulas, kept apart from the textbook ones.

The textbook evaluation of every formula lives with its op (``handgrad/ops/_<family>.py``)
and is what a reader checks against the notes. A faster evaluation of the *same* formula —
tuned for a platform and a range of shapes — lives in this package, is reached through one
dispatch per family, and can be switched off everywhere:

    with handgrad.fast_paths(False):      # the textbook evaluation of every formula
        grads = jax.grad(loss)(params, batch)

or ``HANDGRAD_FAST_PATHS=0`` in the environment (read once, at import). The switch is read
when an op is *traced*: a function that ``jax.jit`` compiled before the switch changed keeps
the evaluation it was traced with (JAX caches the trace); trace it again (a new ``jax.jit``,
or ``jax.clear_caches()``) to pick up the change.

Measurements behind every choice: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

ENV_VAR = "HANDGRAD_FAST_PATHS"


def _from_environment() -> bool:
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("1", "true", "on", "yes", ""):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{ENV_VAR} must be 1/0 (or true/false, on/off), got {value!r}")


_DEFAULT = _from_environment()
_local = threading.local()


def fast_paths_enabled() -> bool:
    """Whether ops traced now may use a faster evaluation (the default) or must use the
    textbook one."""
    return getattr(_local, "enabled", _DEFAULT)


@contextlib.contextmanager
def fast_paths(enabled: bool = True) -> Iterator[None]:
    """Allow (``True``) or forbid (``False``) the faster evaluations for ops traced inside.

    ``with handgrad.fast_paths(False): ...`` forces the textbook evaluation of every formula
    (the one docs/derivations.md derives); the results are the same up to float round-off.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"fast_paths: `enabled` must be a bool, got {enabled!r}")
    previous = fast_paths_enabled()
    _local.enabled = enabled
    try:
        yield
    finally:
        _local.enabled = previous
