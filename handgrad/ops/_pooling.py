r"""Max and mean pooling (NCHW) with the backward passes of notes 000 and 001.

* Max pooling records the position of each window's maximum in the forward pass (the notes'
  "max id"), as a small integer index within the window, and the backward sends the whole
  gradient to that position and zero to the others.
* Mean pooling gives each of the n inputs of a window 1/n of its gradient — never a copy of
  the whole gradient, which would multiply it by n (note 000).

Both backward passes are a sum over the k² window offsets of :func:`window_place`, the adjoint
of the strided slice that offset read. Where the windows tile the input,
``handgrad/ops/fast/pooling.py`` evaluates the same sums as one broadcast;
``handgrad.fast_paths(False)`` turns that off. Derivation: docs/derivations.md §5.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from handgrad import _checks
from handgrad.ops import _windows
from handgrad.ops._windows import WindowConfig
from handgrad.ops.fast import pooling as fast_pooling


def pool_config(op, x, window, stride, padding, pad_at_most_half_window=False) -> WindowConfig:
    """Check the arguments and return the static configuration."""
    _checks.check_nchw(op, x)
    window = _checks.pair(op, "window", window)
    stride = window if stride is None else _checks.pair(op, "stride", stride)
    pads = _windows.normalize_padding(op, padding, x.shape[2:], window, stride)
    if pad_at_most_half_window:
        _checks.check_pool_padding(op, x, window, pads)
    return _windows.window_config(op, x, window, stride, pads)


def _offsets(window):
    kh, kw = window
    return [(a, b) for a in range(kh) for b in range(kw)]  # row-major: index = a·kw + b


def _index_dtype(window):
    n = window[0] * window[1]
    return jnp.int8 if n <= 127 else (jnp.int16 if n <= 32767 else jnp.int32)


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
    disappears. (One reduction of pairs rather than a running compare, which XLA fuses into
    the backward and recomputes, or ``jnp.max`` beside ``jnp.argmax``, which fuses the layer
    before into both: docs/performance.md#max-pool2d-forward.)
    """
    x_pad = _windows.pad_spatial(x, config.padding, -jnp.inf)
    offsets = _offsets(config.window)
    candidates = jnp.stack([_windows.window_slice(x_pad, a, b, config.out_hw, config.stride)
                            for a, b in offsets])
    index_dtype = _index_dtype(config.window)
    positions = lax.broadcasted_iota(index_dtype, candidates.shape, 0)
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(len(offsets), index_dtype))
    return lax.reduce((candidates, positions), init, _first_max, (0,))


@_max_with_argmax.defjvp
def _max_with_argmax_jvp(config, primals, tangents):
    """The max's tangent is the input's tangent at the max id (JAX has no JVP rule for a
    reduction of pairs; grad-of-grad differentiates the forward through this)."""
    (x,), (x_dot,) = primals, tangents
    out, index = _max_with_argmax(x, config)
    x_dot_padded = _windows.pad_spatial(x_dot, config.padding, 0)
    out_dot = sum(
        jnp.where(index == k,
                  _windows.window_slice(x_dot_padded, a, b, config.out_hw, config.stride),
                  jnp.zeros((), x_dot.dtype))
        for k, (a, b) in enumerate(_offsets(config.window)))
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
    route = fast_pooling.dispatch("max_pool2d", config) or route_to_max_id
    return (route(index, g, config).astype(dtype_witness.dtype),)


def route_to_max_id(index, g, config: WindowConfig):
    """dx_pad = Σ_{a,b} window_place(g ⊙ [index = a·kw + b], a, b), cropped: each output's
    gradient whole to its window's max id, zero to the others."""
    padded_hw = _windows.padded_size(config.padding, config.in_hw)
    dx_pad = None
    for k, (a, b) in enumerate(_offsets(config.window)):
        routed = jnp.where(index == k, g, jnp.zeros_like(g))  # the gradient goes to the max id
        piece = _windows.window_place(routed, a, b, padded_hw, config.stride)
        dx_pad = piece if dx_pad is None else dx_pad + piece  # overlapping windows accumulate
    return _windows.crop_spatial(dx_pad, config.padding, config.in_hw)


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


def _window_sum(x, config: WindowConfig):
    x_pad = _windows.pad_spatial(x, config.padding, 0)
    total = None
    for a, b in _offsets(config.window):
        piece = _windows.window_slice(x_pad, a, b, config.out_hw, config.stride)
        total = piece if total is None else total + piece
    return total


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _avg_pool2d(x, config):
    kh, kw = config.window
    return (_window_sum(x, config) / (kh * kw)).astype(x.dtype)


def _avg_pool2d_fwd(x, config):
    # Nothing about x is needed: the backward depends on shapes only. A zero-size witness
    # carries the dtype.
    return _avg_pool2d(x, config), jnp.zeros((0,), x.dtype)


def _avg_pool2d_bwd(config, dtype_witness, g):
    spread = fast_pooling.dispatch("avg_pool2d", config) or spread_evenly
    return (spread(g, config).astype(dtype_witness.dtype),)


def spread_evenly(g, config: WindowConfig):
    """dx_pad = Σ_{a,b} window_place(g/n, a, b), cropped: each of a window's n inputs gets
    1/n of its gradient — not n copies of g."""
    kh, kw = config.window
    share = g / (kh * kw)
    padded_hw = _windows.padded_size(config.padding, config.in_hw)
    dx_pad = None
    for a, b in _offsets(config.window):
        piece = _windows.window_place(share, a, b, padded_hw, config.stride)
        dx_pad = piece if dx_pad is None else dx_pad + piece  # overlapping windows accumulate
    return _windows.crop_spatial(dx_pad, config.padding, config.in_hw)


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
