"""Argument checks for attention, shared by the ops and the plain-JAX reference.

Every message names the op, the argument in backticks, what it got and what was expected, as
the helpers in :mod:`handgrad._checks` do. Checks run at trace time, before XLA sees anything.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handgrad import _checks


class AttentionArgs(NamedTuple):
    """The checked arguments of an attention call: arrays, the mask at rank 4, the scale."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    mask: jax.Array | None  # boolean, rank 4, broadcastable to (N, H, Tq, Tk); None: no mask
    causal: bool
    scale: float


def attention_args(op: str, q, k, v, mask, causal, scale) -> AttentionArgs:
    """Check q (N, H, Tq, d), k (N, H, Tk, d), v (N, H, Tk, dv), the mask, ``causal`` and
    ``scale``; return them normalized (``scale`` defaults to 1/√d)."""
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    for name, x, layout in (("q", q, "(N, H, Tq, d)"), ("k", k, "(N, H, Tk, d)"),
                            ("v", v, "(N, H, Tk, dv)")):
        _checks.check_floating(op, name, x)
        _checks.check_rank(op, name, x, 4, layout)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: `q`, `k` and `v` must have the same dtype, got {q.dtype}, "
                        f"{k.dtype} and {v.dtype}.")
    n, h, tq, d = q.shape
    if k.shape[:2] != (n, h) or k.shape[3] != d:
        raise ValueError(f"{op}: `k` must have shape (N, H, Tk, d) with (N, H, d) = {(n, h, d)} "
                         f"from q {q.shape}, got {k.shape}.")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{op}: `v` must have shape (N, H, Tk, dv) with (N, H, Tk) = "
                         f"{k.shape[:3]} from k {k.shape}, got {v.shape}.")
    tk = k.shape[2]
    if tq < 1 or tk < 1:
        raise ValueError(f"{op}: `q` and `k` must hold at least one position each (Tq, Tk >= 1), "
                         f"got q {q.shape} and k {k.shape}.")
    if not isinstance(causal, bool | np.bool_):
        raise TypeError(f"{op}: `causal` must be a bool, got {causal!r}.")
    if causal and tq != tk:
        raise ValueError(f"{op}: `causal=True` needs as many queries as keys (Tq = Tk, query i "
                         f"sees keys j <= i), got Tq = {tq} and Tk = {tk}.")
    scale = 1 / math.sqrt(d) if scale is None else _checks.check_scalar(op, "scale", scale)
    if mask is not None:
        mask = _rank4_mask(op, jnp.asarray(mask), (n, h, tq, tk))
    return AttentionArgs(q, k, v, mask, bool(causal), scale)


def _rank4_mask(op, mask, full):
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{op}: `mask` must be boolean (True = may attend), got {mask.dtype} "
                        f"(shape {mask.shape}).")
    shape = (1,) * (4 - mask.ndim) + mask.shape
    if mask.ndim > 4 or any(s not in (1, f) for s, f in zip(shape, full)):
        raise ValueError(f"{op}: `mask` must broadcast to (N, H, Tq, Tk) = {full}, got shape "
                         f"{mask.shape}.")
    return mask.reshape(shape)


def block_size(op: str, name: str, value) -> int | None:
    """A block length: None (the platform's default) or a positive Python int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{op}: `{name}` must be a positive int or None, got {value!r}.")
    return int(value)
