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

The families with faster evaluations: ``conv`` (conv2d's forward, dx and dw on CPU) and
``pooling`` (max and mean pooling's dx when the windows tile the input). :func:`describe`
names the evaluation each formula of a call gets. Measurements behind every choice:
docs/performance.md.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import jax

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


def describe(op: str, *args, **kwargs) -> dict[str, str]:
    """The evaluation each formula of ``op(*args, **kwargs)`` gets on the default backend
    with the switch as it is now: "textbook" (the one written in the op's module) or the name
    of a faster one, e.g. ``{"forward": "banded", "input_grad": "col2im", "weight_grad":
    "banded"}`` for LeNet-5's first layer on CPU.

    Args:
      op: a public op's name; conv2d, max_pool2d and avg_pool2d have faster evaluations.
      *args, **kwargs: the op's arguments (arrays or ``jax.ShapeDtypeStruct``), as for the op.

    Returns:
      formula ("forward", "input_grad", "weight_grad" where the op has one) -> evaluation.
    """
    from handgrad.ops import OP_NAMES  # the ops import this module: imported when called

    if op == "conv2d":
        return _describe_conv2d(*args, **kwargs)
    if op in ("max_pool2d", "avg_pool2d"):
        return _describe_pool(op, *args, **kwargs)
    if op in OP_NAMES:
        return {"forward": "textbook", "backward": "textbook"}
    raise ValueError(f"describe: `op` must be one of {OP_NAMES}, got {op!r}.")


def _describe_conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    from handgrad.ops import _conv
    from handgrad.ops.fast import conv

    config = _conv.conv2d_config("conv2d", x, w, b, stride, padding, dilation, groups)
    return conv.describe(tuple(w.shape), config, jax.default_backend())


def _describe_pool(op, x, window, stride=None, padding=0):
    from handgrad.ops import _pooling
    from handgrad.ops.fast import pooling

    config = _pooling.pool_config(op, x, window, stride, padding,
                                  pad_at_most_half_window=op == "max_pool2d")
    tiled = pooling.dispatch(op, config) is not None
    return {"forward": "textbook", "input_grad": "tiled" if tiled else "textbook"}
