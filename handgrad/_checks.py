"""Input checks shared by every op, run at trace time, before anything reaches XLA.

Every message names the op, the argument, what it got (shape or dtype) and what was
expected, so a user can fix the call without reading handgrad's source.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def shape_of(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def dtype_of(x):
    return jnp.result_type(x)


def check_floating(op: str, name: str, x) -> None:
    """Raise TypeError unless `x` has a floating dtype (what a differentiable input needs)."""
    dtype = dtype_of(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{op}: `{name}` must have a floating dtype, got {dtype} (shape {shape_of(x)})."
        )


def check_rank(op: str, name: str, x, expected: int | Sequence[int], layout: str = "") -> None:
    """Raise ValueError unless `x` has one of the `expected` ranks."""
    ranks = (expected,) if isinstance(expected, int) else tuple(expected)
    if np.ndim(x) not in ranks:
        want = " or ".join(str(r) for r in ranks)
        where = f" {layout}" if layout else ""
        raise ValueError(
            f"{op}: `{name}` must have rank {want}{where}, got shape {shape_of(x)}."
        )


def check_min_rank(op: str, name: str, x, minimum: int, layout: str = "") -> None:
    if np.ndim(x) < minimum:
        where = f" {layout}" if layout else ""
        raise ValueError(
            f"{op}: `{name}` must have rank >= {minimum}{where}, got shape {shape_of(x)}."
        )


def check_same_shape(op: str, name_a: str, a, name_b: str, b) -> None:
    if shape_of(a) != shape_of(b):
        raise ValueError(
            f"{op}: `{name_a}` and `{name_b}` must have the same shape, "
            f"got {name_a} {shape_of(a)} and {name_b} {shape_of(b)}."
        )


def check_axis(op: str, x, axis: int) -> int:
    """Return `axis` normalized to be non-negative, or raise if it is out of range."""
    if not isinstance(axis, int | np.integer) or isinstance(axis, bool):
        raise TypeError(f"{op}: `axis` must be a Python int, got {axis!r}.")
    ndim = np.ndim(x)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{op}: `axis` (={axis}) is out of range for an input of shape {shape_of(x)}."
        )
    return int(axis) % ndim


def check_scalar(op: str, name: str, value) -> float:
    """A static float hyperparameter (a slope, an epsilon): must be a Python/NumPy number."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise TypeError(
            f"{op}: `{name}` must be a Python number (it is a static hyperparameter), "
            f"got {type(value).__name__}. Pass a float, not an array or a traced value."
        )
    return float(value)


def pair(op: str, name: str, value, *, minimum: int = 1) -> tuple[int, int]:
    """Normalize an int-or-pair argument (stride, window, dilation) to a pair of ints."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        result = (int(value), int(value))
    elif (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value)
    ):
        result = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{op}: `{name}` must be an int or a pair of ints, got {value!r}.")
    if min(result) < minimum:
        raise ValueError(f"{op}: `{name}` must be >= {minimum}, got {value!r}.")
    return result
