r"""The block loops of :func:`handgrad.flash_attention`: attention in O(T) memory.

Queries are cut into blocks of ``block_q`` rows and keys into blocks of ``block_k`` rows (the
tails padded and masked). One ``lax.scan`` walks a fixed schedule of (query block i, key block j)
pairs — every pair, or with ``causal`` only those on or below the diagonal, so the blocks above
it are never computed. Only a ``block_q × block_k`` tile of scores exists at a time.

* :func:`forward`: the online softmax. Per query row it keeps the running max ``m``, the
  running sum ``l`` of ``exp(s − m)`` and the unnormalized output ``acc``; a new key block
  rescales them by ``exp(m_old − m_new)``. At the end ``O = acc/l`` and ``L = m + log l``.
* :func:`backward`: recomputes each tile ``P = exp(S − L)`` from the saved log-sum-exp and
  accumulates ``dQ``, ``dK``, ``dV`` tile by tile.

Statistics and accumulators are float32 for 16-bit inputs. The schedule has a static length,
so the backward can itself be differentiated (grad of grad). Derivation: docs/derivations.md
§11.3-§11.5.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from handgrad.ops._activations import accumulation_dtype

# Default block lengths per platform (rows of queries and of keys per tile), capped at the
# sequence lengths; why these: docs/derivations.md §11.5.
CPU_BLOCK = 128
ACCELERATOR_BLOCK = 512


class FlashConfig(NamedTuple):
    """Static configuration of a flash-attention call (hashable: a ``nondiff_argnums``)."""

    causal: bool
    scale: float
    block_q: int | None  # None: the platform's default
    block_k: int | None


class _Tiling(NamedTuple):
    """The tiling of one call: block lengths, unpadded lengths, and the schedule."""

    block_q: int
    block_k: int
    tq: int
    tk: int
    pairs: np.ndarray  # (number of tiles, 2) int32: (query block i, key block j)


def _tiling(config: FlashConfig, tq: int, tk: int) -> _Tiling:
    bq, bk = min(config.block_q, tq), min(config.block_k, tk)
    nq, nk = -(-tq // bq), -(-tk // bk)
    pairs = [(i, j) for i in range(nq) for j in range(nk)
             # causal (Tq = Tk): key block j is needed while its first key j·bk is at most
             # the last query of block i; the blocks beyond are skipped, not masked.
             if not config.causal or j * bk <= min((i + 1) * bq, tq) - 1]
    return _Tiling(bq, bk, tq, tk, np.asarray(pairs, np.int32))


def _per_platform(fn, config: FlashConfig, *args):
    """``fn(*args, config)`` with the block lengths the user left out set per platform,
    chosen when the program is lowered for its device."""
    if config.block_q and config.block_k:
        return fn(*args, config)

    def with_block(block):
        filled = config._replace(block_q=config.block_q or block, block_k=config.block_k or block)
        return lambda *a: fn(*a, filled)

    return lax.platform_dependent(*args, cpu=with_block(CPU_BLOCK),
                                  default=with_block(ACCELERATOR_BLOCK))


# --- tiles ------------------------------------------------------------------------------------


def _pad_rows(x, block):
    """Pad axis 2 (positions) up to a multiple of ``block`` with zeros."""
    pad = -x.shape[2] % block
    return x if pad == 0 else jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))


def _rows(x, block_index, block):
    return lax.dynamic_slice_in_dim(x, block_index * block, block, axis=2)


def _add_rows(x, block_index, block, update):
    """x[:, :, rows of the block] += update (in place in the loop carry)."""
    start = block_index * block
    current = lax.dynamic_slice_in_dim(x, start, block, axis=2)
    return lax.dynamic_update_slice_in_dim(x, current + update, start, axis=2)


def _dot(spec, a, b):
    """einsum with operands in the input dtype and the sum in the accumulation dtype."""
    return jnp.einsum(spec, a, b, preferred_element_type=accumulation_dtype(a.dtype))


def _scaled(q, config: FlashConfig):
    """scale·Q, once: then S = (scale·Q)·Kᵀ tile by tile, and dK = dSᵀ·(scale·Q)."""
    return (config.scale * q).astype(q.dtype)


def _masked_scores(cq_i, k_j, i, j, tiling: _Tiling, config: FlashConfig):
    """The tile S = (scale·Q_i)·K_jᵀ with −∞ where a query may not see a key: padded tails,
    and for causal attention keys after the query."""
    s = _dot("nhqd,nhkd->nhqk", cq_i, k_j)
    query = i * tiling.block_q + jnp.arange(tiling.block_q)[:, None]
    key = j * tiling.block_k + jnp.arange(tiling.block_k)[None, :]
    allowed = (query < tiling.tq) & (key < tiling.tk)
    if config.causal:
        allowed &= key <= query
    return jnp.where(allowed[None, None], s, -jnp.inf)


# --- forward: online softmax ------------------------------------------------------------------


def forward(q, k, v, config: FlashConfig):
    """``(O, L)``: the attention output (N, H, Tq, dv) in the input dtype and the per-row
    log-sum-exp of the scores L (N, H, Tq) in the accumulation dtype."""
    return _per_platform(_forward, config, q, k, v)


def _forward(q, k, v, config: FlashConfig):
    tiling = _tiling(config, q.shape[2], k.shape[2])
    bq, bk = tiling.block_q, tiling.block_k
    cq, k, v = _pad_rows(_scaled(q, config), bq), _pad_rows(k, bk), _pad_rows(v, bk)
    acc_dtype = accumulation_dtype(q.dtype)
    rows = cq.shape[:3]
    start = (jnp.full(rows, -jnp.inf, acc_dtype),  # m: running max of the scores
             jnp.zeros(rows, acc_dtype),  # l: running Σ exp(s − m)
             jnp.zeros((*rows, v.shape[3]), acc_dtype))  # acc: running Σ exp(s − m)·v

    def tile(carry, pair):
        m, l, acc = carry
        i, j = pair[0], pair[1]
        s = _masked_scores(_rows(cq, i, bq), _rows(k, j, bk), i, j, tiling, config)
        m_old, l_old = _rows(m, i, bq), _rows(l, i, bq)
        m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
        # A row that has seen no allowed key yet keeps m = −∞; shift it by 0 instead, so that
        # exp(−∞ − shift) = 0 rather than exp(−∞ + ∞) = NaN.
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0)
        p = jnp.exp(s - shift[..., None])
        rescale = jnp.exp(m_old - shift)  # exp(m_old − m_new): the old terms, re-shifted
        l_new = rescale * l_old + jnp.sum(p, axis=-1)
        acc_new = rescale[..., None] * _rows(acc, i, bq) + _dot(
            "nhqk,nhkd->nhqd", p.astype(v.dtype), _rows(v, j, bk))
        m = lax.dynamic_update_slice_in_dim(m, m_new, i * bq, axis=2)
        l = lax.dynamic_update_slice_in_dim(l, l_new, i * bq, axis=2)
        acc = lax.dynamic_update_slice_in_dim(acc, acc_new, i * bq, axis=2)
        return (m, l, acc), None

    (m, l, acc), _ = lax.scan(tile, start, tiling.pairs)
    tq = tiling.tq
    m, l, acc = m[:, :, :tq], l[:, :, :tq], acc[:, :, :tq]
    out = acc / l[..., None]  # every query sees at least one key (Tk ≥ 1; causal: key 0)
    return out.astype(v.dtype), m + jnp.log(l)


# --- backward: recompute P tile by tile -------------------------------------------------------


def backward(q, k, v, L, dO, D, config: FlashConfig):
    """``(dQ, dK, dV)`` in the accumulation dtype, from the saved log-sum-exp ``L`` and
    ``D = rowsum(dO ⊙ O)`` (minus the cotangent of L), both (N, H, Tq)."""
    return _per_platform(_backward, config, q, k, v, L, dO, D)


def _backward(q, k, v, L, dO, D, config: FlashConfig):
    tiling = _tiling(config, q.shape[2], k.shape[2])
    bq, bk = tiling.block_q, tiling.block_k
    cq, dO, L, D = (_pad_rows(x, bq) for x in (_scaled(q, config), dO, L, D))
    k, v = _pad_rows(k, bk), _pad_rows(v, bk)
    acc_dtype = accumulation_dtype(q.dtype)
    start = tuple(jnp.zeros(x.shape, acc_dtype) for x in (cq, k, v))  # dQ/scale, dK, dV

    def tile(carry, pair):
        dQ, dK, dV = carry
        i, j = pair[0], pair[1]
        cq_i, dO_i = _rows(cq, i, bq), _rows(dO, i, bq)
        k_j, v_j = _rows(k, j, bk), _rows(v, j, bk)
        s = _masked_scores(cq_i, k_j, i, j, tiling, config)
        p = jnp.exp(s - _rows(L, i, bq)[..., None])  # P = exp(S − L); −∞ (masked) gives 0
        dV = _add_rows(dV, j, bk, _dot("nhqk,nhqd->nhkd", p.astype(dO.dtype), dO_i))  # Pᵀ·dO
        dP = _dot("nhqd,nhkd->nhqk", dO_i, v_j)  # dP = dO·Vᵀ
        dS = (p * (dP - _rows(D, i, bq)[..., None])).astype(q.dtype)  # P ⊙ (dP − D)
        dQ = _add_rows(dQ, i, bq, _dot("nhqk,nhkd->nhqd", dS, k_j))  # dQ_i/scale += dS·K_j
        dK = _add_rows(dK, j, bk, _dot("nhqk,nhqd->nhkd", dS, cq_i))  # dK_j += dSᵀ·scale·Q_i
        return (dQ, dK, dV), None

    (dQ, dK, dV), _ = lax.scan(tile, start, tiling.pairs)
    return config.scale * dQ[:, :, :tiling.tq], dK[:, :, :tiling.tk], dV[:, :, :tiling.tk]
