"""Input checks shared by every op, run at trace time, before anything reaches XLA.

Every message names the op, the argument, what it got (shape or dtype) and what was
expected, so a user can fix the call without reading handgrad's source.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
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
    check_static(op, "axis", axis, "a Python int")
    if not isinstance(axis, int | np.integer) or isinstance(axis, bool):
        raise TypeError(f"{op}: `axis` must be a Python int (static), got {axis!r}.")
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


def check_rate(op: str, rate) -> jax.Array:
    """A drop probability: a Python number in [0, 1], or a scalar array (possibly traced)."""
    if isinstance(rate, int | float) and not 0 <= rate <= 1:
        raise ValueError(f"{op}: `rate` must be in [0, 1], got {rate!r}.")
    rate = jnp.asarray(rate)
    if rate.shape != ():
        raise ValueError(
            f"{op}: `rate` must be a scalar (a Python float or a 0-d array), got shape "
            f"{shape_of(rate)} (dtype {dtype_of(rate)})."
        )
    if not isinstance(rate, jax.core.Tracer) and not 0 <= float(rate) <= 1:  # concrete: check
        raise ValueError(f"{op}: `rate` must be in [0, 1], got {float(rate)!r} (a 0-d array of "
                         f"dtype {dtype_of(rate)}).")
    return rate


def check_static(op: str, name: str, value, expected: str) -> None:
    """Raise TypeError if `value` (or an entry of it) is an array, concrete or traced.

    Hyper-parameters such as a stride, a window or an axis fix the shapes of the computation,
    so they must be known at trace time: a ``jnp`` scalar, or a value traced by ``jit`` or
    ``vmap``, cannot be one."""
    entries = value if isinstance(value, tuple | list) else (value,)
    entries = [v for e in entries for v in (e if isinstance(e, tuple | list) else (e,))]
    arrays = [v for v in entries if isinstance(v, jax.Array | np.ndarray)]
    if arrays:
        raise TypeError(
            f"{op}: `{name}` must be {expected} (static), got an array of shape "
            f"{shape_of(arrays[0])} and dtype {dtype_of(arrays[0])}. It fixes the shapes of the "
            f"computation: pass Python ints, not an array or a value traced by jit or vmap."
        )


def pair(op: str, name: str, value, *, minimum: int = 1) -> tuple[int, int]:
    """Normalize an int-or-pair argument (stride, window, dilation) to a pair of ints."""
    expected = "a Python int or a pair of Python ints"
    check_static(op, name, value, expected)
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        result = (int(value), int(value))
    elif (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value)
    ):
        result = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{op}: `{name}` must be {expected} (static), got {value!r}.")
    if min(result) < minimum:
        raise ValueError(f"{op}: `{name}` must be >= {minimum}, got {value!r}.")
    return result


# --- layer arguments (shared by the ops and handgrad.reference) ----------------------------


def check_dense_args(op: str, x, w, b) -> None:
    for name, arr in (("x", x), ("w", w)):
        check_floating(op, name, arr)
    check_min_rank(op, "x", x, 1, "(..., n_in)")
    check_rank(op, "w", w, 2, "(n_out, n_in)")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{op}: x has {x.shape[-1]} features but w expects {w.shape[1]} "
            f"(x {tuple(x.shape)}, w {tuple(w.shape)}; w is (n_out, n_in))."
        )
    check_bias(op, b, w, "n_out")


def check_bias(op: str, b, w, name: str) -> None:
    """`b`, when given, is a floating (w.shape[0],) vector."""
    if b is None:
        return
    check_floating(op, "b", b)
    if tuple(b.shape) != (w.shape[0],):
        raise ValueError(
            f"{op}: `b` must have shape ({name},) = ({w.shape[0]},) to match w "
            f"{tuple(w.shape)}, got {tuple(b.shape)}."
        )


def check_nchw(op: str, x) -> None:
    check_floating(op, "x", x)
    check_rank(op, "x", x, 4, "(N, C, H, W)")


def check_conv2d_args(op: str, x, w, b, groups) -> None:
    """x (N, C, H, W), w (O, C/groups, kh, kw), b (O,) or None, groups dividing C and O."""
    check_nchw(op, x)
    check_floating(op, "w", w)
    check_rank(op, "w", w, 4, "(O, C/groups, kh, kw)")
    check_static(op, "groups", groups, "a Python int")
    if isinstance(groups, bool) or not isinstance(groups, int | np.integer):
        raise TypeError(f"{op}: `groups` must be a Python int (static), got {groups!r}.")
    if groups < 1:
        raise ValueError(
            f"{op}: `groups` must be >= 1 (the number of channel groups), got {groups}.")
    o, cg = w.shape[:2]
    c = x.shape[1]
    if o % groups:
        raise ValueError(
            f"{op}: the output channels of w ({o}, w {tuple(w.shape)}) must be divisible by "
            f"`groups` (={groups})."
        )
    if cg * groups != c:
        raise ValueError(
            f"{op}: x has {c} channels but w expects C/groups·groups = {cg}·{groups} = "
            f"{cg * groups} (x {tuple(x.shape)}, w {tuple(w.shape)})."
        )
    check_bias(op, b, w, "O")


def check_padding(op: str, padding) -> None:
    """int | (ph, pw) | ((top, bottom), (left, right)), non-negative, or "VALID" | "SAME"."""
    check_static(op, "padding", padding,
                 "an int, (ph, pw), ((top, bottom), (left, right)), 'VALID' or 'SAME'")
    if isinstance(padding, str):
        if padding.upper() not in ("VALID", "SAME"):
            raise ValueError(
                f"{op}: `padding` string must be 'VALID' or 'SAME', got {padding!r}.")
        return
    is_int = lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool)  # noqa: E731
    is_pair = lambda p, of: (  # noqa: E731
        isinstance(p, tuple | list) and len(p) == 2 and all(map(of, p)))
    if is_int(padding):
        values = [padding]
    elif is_pair(padding, is_int):
        values = list(padding)
    elif is_pair(padding, lambda p: is_pair(p, is_int)):
        values = [v for p in padding for v in p]
    else:
        raise TypeError(
            f"{op}: `padding` must be an int, (ph, pw), ((top, bottom), (left, right)), "
            f"'VALID' or 'SAME', got {padding!r}."
        )
    if min(values) < 0:
        raise ValueError(f"{op}: `padding` must be non-negative, got {padding!r}.")


def check_window_fits(op: str, x, kernel_eff, pads, kernel_name: str) -> None:
    """Each window (`kernel_eff` = its reach, dilation included) fits in the padded input."""
    for axis, (size, k, (lo, hi)) in enumerate(zip(x.shape[2:], kernel_eff, pads)):
        padded = size + lo + hi
        if k > padded:
            dim = "height" if axis == 0 else "width"
            raise ValueError(
                f"{op}: the {kernel_name} ({k} along {dim}, dilation included) is larger than "
                f"the padded input ({padded} = {size} + {lo} + {hi}); x has shape "
                f"{shape_of(x)}."
            )


def check_pool_padding(op: str, x, window, pads) -> None:
    """Max pooling: at most half a window of padding on each side."""
    for k, (lo, hi) in zip(window, pads):
        if max(lo, hi) > k // 2:
            # Beyond half a window, some window can lie entirely in the padding: its max
            # would be -inf and its gradient would vanish into the padding.
            raise ValueError(
                f"{op}: `padding` {tuple(map(tuple, pads))} must be at most half the window "
                f"{tuple(window)} on each side (x {shape_of(x)})."
            )


def check_norm_args(op: str, x, gamma, beta, axis: int, features_name="x.shape[axis]") -> int:
    """Check a normalization's x, gamma, beta; return `axis` made non-negative."""
    check_floating(op, "x", x)
    check_min_rank(op, "x", x, 2, "(N, F, ...)")
    axis = check_axis(op, x, axis)
    for name, p in (("gamma", gamma), ("beta", beta)):
        check_floating(op, name, p)
        if tuple(p.shape) != (x.shape[axis],):
            raise ValueError(
                f"{op}: `{name}` must have shape ({features_name},) = ({x.shape[axis]},) for x "
                f"{tuple(x.shape)}, got {tuple(p.shape)}."
            )
    return axis
