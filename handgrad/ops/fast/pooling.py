"""A faster evaluation of the pooling backward when the windows tile the input.

With stride = window and no padding (rows past the last window are never read) every input
lies in at most one window, so the textbook sum over the k² window offsets (ops/_pooling.py)
has at most one term per input: view dx as (N, C, Ho, kh, Wo, kw) tiles, fill each tile from
its window's gradient in one broadcast, reshape, and zero-pad the unread remainder — fewer
passes over dx than k² placed pieces (docs/performance.md#pool2d-tiled). It has no
platform-specific part.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from handgrad.ops._windows import WindowConfig
from handgrad.ops.fast import fast_paths_enabled


def dispatch(op: str, config: WindowConfig) -> Callable | None:
    """The input gradient of ``op`` ("max_pool2d": ``(index, g, config) -> dx``,
    "avg_pool2d": ``(g, config) -> dx``) for windows that tile the input, or None (the
    textbook one)."""
    if not (fast_paths_enabled() and tiles(config)):
        return None
    return {"max_pool2d": tiled_max_input_grad, "avg_pool2d": tiled_avg_input_grad}[op]


def tiles(config: WindowConfig) -> bool:
    """The windows tile the input: stride = window, no padding."""
    return config.stride == config.window and config.padding == ((0, 0), (0, 0))


def _per_tile(per_window):
    """(N, C, Ho, Wo) -> (N, C, Ho, 1, Wo, 1): one value per window, broadcast over its tile."""
    n, c, ho, wo = per_window.shape
    return per_window.reshape(n, c, ho, 1, wo, 1)


def _untile(tiled, in_hw):
    n, c, ho, kh, wo, kw = tiled.shape
    dx = tiled.reshape(n, c, ho * kh, wo * kw)
    return jnp.pad(dx, ((0, 0), (0, 0), (0, in_hw[0] - ho * kh), (0, in_hw[1] - wo * kw)))


def tiled_max_input_grad(index, g, config: WindowConfig):
    """Tile entry (a, b) of window (i, j) is g[i, j] if its max id is a·kw + b, else 0."""
    kh, kw = config.window
    entry_index = jnp.arange(kh * kw, dtype=index.dtype).reshape(kh, kw)  # a·kw + b
    offsets = entry_index.reshape(1, 1, 1, kh, 1, kw)  # in the tiles' layout
    routed = jnp.where(_per_tile(index) == offsets, _per_tile(g), jnp.zeros((), g.dtype))
    return _untile(routed, config.in_hw)


def tiled_avg_input_grad(g, config: WindowConfig):
    """Every entry of window (i, j)'s tile is g[i, j]/n."""
    (kh, kw), (n, c, ho, wo) = config.window, g.shape
    share = g / (kh * kw)
    return _untile(jnp.broadcast_to(_per_tile(share), (n, c, ho, kh, wo, kw)), config.in_hw)
