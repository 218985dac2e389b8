r"""Max and mean pooling (NCHW) with the backward passes of seeds 000 and 001.

* Max pooling records the position of each window's maximum in the forward pass (the notes'
  "max id"), as a small integer index within the window, and the backward sends the whole
  gradient to that position and zero to the others.
* Mean pooling gives each of the n inputs of a window 1/n of its gradient — never a copy of
  the whole gradient, which would multiply it by n (seed 000).

Both backward passes are a sum over the k² window offsets of :func:`window_place`, the adjoint
of the strided slice that offset read. Derivation: docs/derivations.md §5.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from handgrad import _checks
from handgrad.ops import _windows


def pool_config(op, x, window, stride, padding, pad_at_most_half_window=False):
    _windows.check_nchw(op, x)
    window = _checks.pair(op, "window", window)
    stride = window if stride is None else _checks.pair(op, "stride", stride)
    in_hw = tuple(x.shape[2:])
    pads = _windows.normalize_padding(op, padding, in_hw, window, stride)
    if pad_at_most_half_window:
        for k, (lo, hi) in zip(window, pads):
            if max(lo, hi) > k // 2:
                # Beyond half a window, some window can lie entirely in the padding: its max
                # would be -inf and its gradient would vanish into the padding.
                raise ValueError(
                    f"{op}: `padding` {pads} must be at most half the window {window} on "
                    f"each side (x {tuple(x.shape)})."
                )
    out_hw = _windows.output_size(op, x.shape, in_hw, window, stride, pads, "window")
    return (window, stride, pads, in_hw, out_hw)


def _offsets(window):
    kh, kw = window
    return [(a, b) for a in range(kh) for b in range(kw)]  # row-major: index = a·kw + b


def _index_dtype(window):
    n = window[0] * window[1]
    return jnp.int8 if n <= 127 else (jnp.int16 if n <= 32767 else jnp.int32)


# Windows that tile the input (stride = window, no padding; rows past the last window are
# never read) make the backward a broadcast: view dx as (N, C, Ho, kh, Wo, kw) tiles, fill
# each tile from its window's gradient, reshape, and zero-pad the unread remainder. Measured
# on CPU 2.6× faster than summing the k² interior-padded pieces at LeNet-5's first pool;
# the general path below handles overlapping, strided and padded windows.


def _tiles(config) -> bool:
    window, stride, pads, _, _ = config
    return stride == window and pads == ((0, 0), (0, 0))


def _expand_to_tiles(per_window):
    """(N, C, Ho, Wo) -> (N, C, Ho, 1, Wo, 1): one value per window, broadcast over its tile."""
    n, c, ho, wo = per_window.shape
    return per_window.reshape(n, c, ho, 1, wo, 1)


def _tiled_shape(per_window, window):
    n, c, ho, wo = per_window.shape
    return (n, c, ho, window[0], wo, window[1])


def _window_offset_index(window, dtype):
    """(1, 1, 1, kh, 1, kw): each tile entry's row-major index a·kw + b within its window."""
    kh, kw = window
    index = jnp.arange(kh * kw, dtype=dtype).reshape(kh, kw)
    return index.reshape(1, 1, 1, kh, 1, kw)


def _untile(tiled, in_hw):
    n, c, ho, kh, wo, kw = tiled.shape
    dx = tiled.reshape(n, c, ho * kh, wo * kw)
    return jnp.pad(dx, ((0, 0), (0, 0), (0, in_hw[0] - ho * kh), (0, in_hw[1] - wo * kw)))


# --- max pooling ---------------------------------------------------------------------------


def _first_max(left, right):
    """Reducer of (value, index) pairs: the larger value, the smaller index on ties, and NaN
    above every number (the first NaN wins) — associative and commutative, as XLA requires."""
    (left_value, left_index), (right_value, right_index) = left, right
    left_nan, right_nan = jnp.isnan(left_value), jnp.isnan(right_value)
    left_first = left_index < right_index
    take_left = jnp.where(
        left_nan | right_nan,
        left_nan & (~right_nan | left_first),
        (left_value > right_value) | ((left_value == right_value) & left_first),
    )
    return (jnp.where(take_left, left_value, right_value),
            jnp.where(take_left, left_index, right_index))


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_with_argmax(x, config):
    """The max of every window and its index within the window (the notes' "max id").

    The k² strided slices (one per window offset, row-major) are stacked and reduced once,
    as (value, index) pairs: the *first* maximum wins ties, as PyTorch's, and NaN counts as
    the largest value, so a window's first NaN is its max id and its max is NaN — a NaN never
    disappears.

    Measured choices (XLA:CPU): reductions, not a running compare — XLA fused an elementwise
    compare chain into the backward's select and recomputed it for every input
    (forward+backward 14.6 ms at (128, 32, 32, 32), 3.2 ms with reductions); and one
    reduction of pairs, not ``jnp.max`` beside ``jnp.argmax`` — XLA fuses the layer before
    (relu, a convolution's bias) into each reduction that reads it, so two reductions
    computed it twice.
    """
    window, stride, pads, _, out_hw = config
    xp = _windows.pad_spatial(x, pads, -jnp.inf)
    offsets = _offsets(window)
    candidates = jnp.stack([_windows.window_slice(xp, a, b, out_hw, stride)
                            for a, b in offsets])
    index_dtype = _index_dtype(window)
    positions = lax.broadcasted_iota(index_dtype, candidates.shape, 0)
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(len(offsets), index_dtype))
    return lax.reduce((candidates, positions), init, _first_max, (0,))


@_max_with_argmax.defjvp
def _max_with_argmax_jvp(config, primals, tangents):
    """The max's tangent is the input's tangent at the max id (JAX has no JVP rule for a
    reduction of pairs; grad-of-grad differentiates the forward through this)."""
    (x,), (x_dot,) = primals, tangents
    out, index = _max_with_argmax(x, config)
    window, stride, pads, _, out_hw = config
    x_dot_padded = _windows.pad_spatial(x_dot, pads, 0)
    out_dot = sum(
        jnp.where(index == k, _windows.window_slice(x_dot_padded, a, b, out_hw, stride),
                  jnp.zeros((), x_dot.dtype))
        for k, (a, b) in enumerate(_offsets(window)))
    return (out, index), (out_dot, np.zeros(index.shape, jax.dtypes.float0))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool2d(x, config):
    return _max_with_argmax(x, config)[0]


def _max_pool2d_fwd(x, config):
    out, index = _max_with_argmax(x, config)
    # Residual: the argmax index only (int8 for windows up to 127 entries), not the input.
    return out, (index, jnp.zeros((0,), x.dtype))


def _max_pool2d_bwd(config, residuals, g):
    index, dtype_witness = residuals
    window, stride, pads, in_hw, _ = config
    if _tiles(config):
        # Windows tile the input: every input has one window, and one select writes dx.
        offsets = _window_offset_index(window, index.dtype)
        routed = jnp.where(_expand_to_tiles(index) == offsets, _expand_to_tiles(g),
                           jnp.zeros((), g.dtype))
        return (_untile(routed, in_hw).astype(dtype_witness.dtype),)
    padded_hw = _windows.padded_size(pads, in_hw)
    dxp = None
    for k, (a, b) in enumerate(_offsets(window)):
        routed = jnp.where(index == k, g, jnp.zeros_like(g))  # the gradient goes to the max id
        piece = _windows.window_place(routed, a, b, padded_hw, stride)
        dxp = piece if dxp is None else dxp + piece  # overlapping windows accumulate
    return (_windows.crop_spatial(dxp, pads, in_hw).astype(dtype_witness.dtype),)


_max_pool2d.defvjp(_max_pool2d_fwd, _max_pool2d_bwd)


def max_pool2d(x, window, stride=None, padding=0):
    r"""2-D max pooling, NCHW; padding is −∞ padding.

    Forward keeps, for every output, the index of its window's maximum (first maximum in
    row-major order on ties, like PyTorch). Backward routes each output gradient to that one
    input and zero elsewhere, accumulating where windows overlap:

    .. math:: dx_{p} = \sum_{\text{windows } W \ni p} g_W \,[p = \operatorname{argmax}_W x]

    Args:
      x: ``(N, C, H, W)``.
      window: int or (kh, kw).
      stride: int or (sh, sw); defaults to ``window``.
      padding: int, (ph, pw), ((top, bottom), (left, right)), "VALID" or "SAME"; at most half
        the window on each side (so no window is all padding).

    Returns:
      ``(N, C, Ho, Wo)``.

    Derivation: docs/derivations.md §5.1.
    """
    x = jnp.asarray(x)
    config = pool_config("max_pool2d", x, window, stride, padding, pad_at_most_half_window=True)
    return _max_pool2d(x, config)


# --- mean pooling --------------------------------------------------------------------------


def _window_sum(x, config):
    window, stride, pads, _, out_hw = config
    xp = _windows.pad_spatial(x, pads, 0)
    total = None
    for a, b in _offsets(window):
        piece = _windows.window_slice(xp, a, b, out_hw, stride)
        total = piece if total is None else total + piece
    return total


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _avg_pool2d(x, config):
    window = config[0]
    return (_window_sum(x, config) / (window[0] * window[1])).astype(x.dtype)


def _avg_pool2d_fwd(x, config):
    # Nothing about x is needed: the backward depends on shapes only. A zero-size witness
    # carries the dtype.
    return _avg_pool2d(x, config), jnp.zeros((0,), x.dtype)


def _avg_pool2d_bwd(config, dtype_witness, g):
    window, stride, pads, in_hw, _ = config
    share = g / (window[0] * window[1])  # each of the n inputs gets 1/n — not n copies of g
    if _tiles(config):
        tiled = jnp.broadcast_to(_expand_to_tiles(share), _tiled_shape(share, window))
        return (_untile(tiled, in_hw).astype(dtype_witness.dtype),)
    padded_hw = _windows.padded_size(pads, in_hw)
    dxp = None
    for a, b in _offsets(window):
        piece = _windows.window_place(share, a, b, padded_hw, stride)
        dxp = piece if dxp is None else dxp + piece
    return (_windows.crop_spatial(dxp, pads, in_hw).astype(dtype_witness.dtype),)


_avg_pool2d.defvjp(_avg_pool2d_fwd, _avg_pool2d_bwd)


def avg_pool2d(x, window, stride=None, padding=0):
    r"""2-D mean pooling, NCHW, zero padding counted in the mean.

    Padding follows PyTorch's default ``count_include_pad=True``: every window divides by
    ``n = kh·kw``, padded zeros included. Backward: every input of a window receives
    :math:`g/n` of that window's gradient (accumulated over overlapping windows).

    Args:
      x: ``(N, C, H, W)``.
      window: int or (kh, kw).
      stride: int or (sh, sw); defaults to ``window``.
      padding: int, (ph, pw), ((top, bottom), (left, right)), "VALID" or "SAME" (zeros).

    Returns:
      ``(N, C, Ho, Wo)``.

    Derivation: docs/derivations.md §5.2.
    """
    x = jnp.asarray(x)
    config = pool_config("avg_pool2d", x, window, stride, padding)
    return _avg_pool2d(x, config)
