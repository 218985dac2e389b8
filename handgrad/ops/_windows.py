"""Sliding-window plumbing shared by convolution and pooling (NCHW).

The adjoint pair at the heart of every windowed backward (tinygrad names such pairs):

* ``window_slice`` — for one offset (a, b) inside the window, the strided slice of the padded
  input that the window's (a, b) entry reads, for every output position: shape (N, C, Ho, Wo);
* ``window_place`` — its adjoint: put an (N, C, Ho, Wo) map back where that slice came from,
  zeros elsewhere. A strided slice's adjoint is an interior pad (s − 1 zeros between entries,
  the notes' "dilate the error map by the stride") plus edge padding.

Summing ``window_place`` over the k² offsets scatters a gradient back through any window
op, accumulating where windows overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

from handgrad import _checks

Padding = tuple[tuple[int, int], tuple[int, int]]


def normalize_padding(
    op: str, padding, in_hw: Sequence[int], kernel_eff: Sequence[int], stride: Sequence[int]
) -> Padding:
    """int | (ph, pw) | ((top, bottom), (left, right)) | "VALID" | "SAME" -> ((t, b), (l, r)).

    "SAME" follows XLA/TensorFlow: output size ceil(in/stride), the odd pixel at the end.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            pads = []
            for size, k, s in zip(in_hw, kernel_eff, stride):
                out = -(-size // s)
                total = max((out - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"{op}: `padding` string must be 'VALID' or 'SAME', got {padding!r}.")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if is_int(padding):
        pads = ((padding, padding), (padding, padding))
    elif isinstance(padding, tuple | list) and len(padding) == 2 and all(map(is_int, padding)):
        pads = ((padding[0], padding[0]), (padding[1], padding[1]))
    elif (
        isinstance(padding, tuple | list)
        and len(padding) == 2
        and all(isinstance(p, tuple | list) and len(p) == 2 and all(map(is_int, p))
                for p in padding)
    ):
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    else:
        raise TypeError(
            f"{op}: `padding` must be an int, (ph, pw), ((top, bottom), (left, right)), "
            f"'VALID' or 'SAME', got {padding!r}."
        )
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"{op}: `padding` must be non-negative, got {padding!r}.")
    return tuple(tuple(p) for p in pads)


def output_size(
    op: str, x_shape, in_hw, kernel_eff, stride, padding: Padding, kernel_name: str
) -> tuple[int, int]:
    """(H + pad − k_eff) // s + 1 per spatial axis; raises if the window does not fit."""
    for axis, (size, k, (lo, hi)) in enumerate(zip(in_hw, kernel_eff, padding)):
        padded = size + lo + hi
        if k > padded:
            dim = "height" if axis == 0 else "width"
            raise ValueError(
                f"{op}: the {kernel_name} ({k} along {dim}, dilation included) is larger than "
                f"the padded input ({padded} = {size} + {lo} + {hi}); x has shape "
                f"{tuple(x_shape)}."
            )
    return window_count(padded_size(padding, in_hw), kernel_eff, stride)


def padded_size(padding: Padding, in_hw) -> tuple[int, int]:
    """(H + top + bottom, W + left + right)."""
    return tuple(size + lo + hi for size, (lo, hi) in zip(in_hw, padding))


def window_count(padded_hw, kernel, stride, dilation=(1, 1)) -> tuple[int, int]:
    """How many windows fit along each padded axis: (Hp − k_eff) // s + 1, no checks (for
    configurations :func:`output_size` has already validated)."""
    return tuple((size - ((k - 1) * d + 1)) // s + 1
                 for size, k, s, d in zip(padded_hw, kernel, stride, dilation))


def check_nchw(op: str, x) -> None:
    _checks.check_floating(op, "x", x)
    _checks.check_rank(op, "x", x, 4, "(N, C, H, W)")


def window_slice(xp, a: int, b: int, out_hw, stride, dilation=(1, 1)):
    """The entries that window offset (a, b) reads for every output position: (N, C, Ho, Wo)."""
    (ho, wo), (sh, sw), (dh, dw) = out_hw, stride, dilation
    start = (0, 0, a * dh, b * dw)
    limit = (xp.shape[0], xp.shape[1], a * dh + (ho - 1) * sh + 1, b * dw + (wo - 1) * sw + 1)
    return lax.slice(xp, start, limit, (1, 1, sh, sw))


def window_place(piece, a: int, b: int, padded_hw, stride, dilation=(1, 1)):
    """Adjoint of :func:`window_slice`: ``piece`` (N, C, Ho, Wo) scattered back into a zero
    (N, C, Hp, Wp) array — an interior pad of s − 1 zeros between entries plus edge pads."""
    (ho, wo), (sh, sw), (dh, dw) = piece.shape[2:], stride, dilation
    (hp, wp) = padded_hw
    zero = jnp.zeros((), piece.dtype)
    return lax.pad(piece, zero, (
        (0, 0, 0),
        (0, 0, 0),
        (a * dh, hp - a * dh - (ho - 1) * sh - 1, sh - 1),
        (b * dw, wp - b * dw - (wo - 1) * sw - 1, sw - 1),
    ))


def pad_spatial(x, padding: Padding, value):
    (t, b), (l, r) = padding
    return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (0, 0, 0), (t, b, 0), (l, r, 0)))


def crop_spatial(xp, padding: Padding, in_hw):
    (t, _), (l, _) = padding
    return lax.slice(xp, (0, 0, t, l), (xp.shape[0], xp.shape[1], t + in_hw[0], l + in_hw[1]))
