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
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from handgrad import _checks

Padding = tuple[tuple[int, int], tuple[int, int]]


class WindowConfig(NamedTuple):
    """Where a convolution's or a pool's windows sit (static: a ``nondiff_argnums`` value).

    Output (i, j) reads ``x_pad[i·s + a·d, j·s + b·d]`` through the window's tap (a, b)."""

    window: tuple[int, int]  # taps (kh, kw): the kernel's size or the pool's window
    stride: tuple[int, int]
    padding: Padding  # ((top, bottom), (left, right))
    dilation: tuple[int, int]  # the taps are d apart (1 for pooling)
    groups: int  # channel groups (1 for pooling)
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]


def window_config(op: str, x, window, stride, padding, dilation=(1, 1), groups=1,
                  kernel_name="window") -> WindowConfig:
    """The configuration of ``x``'s windows, after checking that they fit."""
    in_hw = tuple(x.shape[2:])
    reach = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    pads = normalize_padding(op, padding, in_hw, reach, stride)
    _checks.check_window_fits(op, x, reach, pads, kernel_name)
    out_hw = window_count(padded_size(pads, in_hw), window, stride, dilation)
    return WindowConfig(tuple(window), tuple(stride), pads, tuple(dilation), groups, in_hw,
                        out_hw)


def normalize_padding(
    op: str, padding, in_hw: Sequence[int], kernel_eff: Sequence[int], stride: Sequence[int]
) -> Padding:
    """int | (ph, pw) | ((top, bottom), (left, right)) | "VALID" | "SAME" -> ((t, b), (l, r)).

    "SAME" follows XLA/TensorFlow: output size ceil(in/stride), the odd pixel at the end.
    """
    _checks.check_padding(op, padding)
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        pads = []
        for size, k, s in zip(in_hw, kernel_eff, stride):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int | np.integer):
        return ((int(padding),) * 2,) * 2
    if isinstance(padding[0], int | np.integer):
        return ((int(padding[0]),) * 2, (int(padding[1]),) * 2)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def padded_size(padding: Padding, in_hw) -> tuple[int, int]:
    """(H + top + bottom, W + left + right)."""
    return tuple(size + lo + hi for size, (lo, hi) in zip(in_hw, padding))


def window_count(padded_hw, kernel, stride, dilation=(1, 1)) -> tuple[int, int]:
    """How many windows fit along each padded axis: (Hp − k_eff) // s + 1, no checks (for
    windows :func:`window_config` has already seen fit)."""
    return tuple((size - ((k - 1) * d + 1)) // s + 1
                 for size, k, s, d in zip(padded_hw, kernel, stride, dilation))


def full_padding(config: WindowConfig) -> Padding:
    """The edge padding of the stride-dilated error map for note 004's full convolution:
    (k_eff − 1 − lo, k_eff − 1 − hi + remainder) per axis, so that it is the input's size plus
    the kernel's reach. Input rows past the last window (the stride's remainder) were never
    read: the extra high-side `remainder` gives them zero gradient. A pad larger than
    k_eff − 1 turns into negative padding, i.e. cropping."""
    pads = []
    for size, k, d, s, (lo, hi) in zip(config.in_hw, config.window, config.dilation,
                                       config.stride, config.padding):
        k_eff = (k - 1) * d + 1
        remainder = (size + lo + hi - k_eff) % s
        pads.append((k_eff - 1 - lo, k_eff - 1 - hi + remainder))
    return tuple(pads)


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
