r"""Scaled dot-product attention with the derived backward, and its blockwise evaluation.

Layout ``(N, H, T, d)`` (batch, heads, positions, features), as PyTorch's
``scaled_dot_product_attention``. Per batch and head, with ``Q`` (Tq, d), ``K`` (Tk, d),
``V`` (Tk, dv):

.. math::
    S = \text{scale}\cdot QK^\top,\qquad P = \operatorname{softmax}_{\text{rows}}(S),\qquad
    O = PV

and, from the softmax Jacobian of note 001 (§2.4) applied row by row, with ``dO = g``:

.. math::
    dV = P^\top dO,\quad dP = dO\,V^\top,\quad
    dS = P \odot \big(dP - \operatorname{rowsum}(dO \odot O)\big),\quad
    dQ = \text{scale}\cdot dS\,K,\quad dK = \text{scale}\cdot dS^\top Q .

:func:`attention` saves ``P`` (Tq × Tk per head); :func:`flash_attention` evaluates the same
function block by block and saves only ``O`` and the per-row log-sum-exp ``L`` (the block loops
are in ``_flash.py``). Derivation: docs/derivations.md §11.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from handgrad import _attention_checks
from handgrad.ops import _flash
from handgrad.ops._activations import accumulation_dtype


class AttentionConfig(NamedTuple):
    """Static configuration of :func:`attention` (hashable: a ``nondiff_argnums``)."""

    causal: bool
    scale: float


def _dot(spec, a, b):
    """einsum with operands in the input dtype and the sum in the accumulation dtype."""
    return jnp.einsum(spec, a, b, preferred_element_type=accumulation_dtype(a.dtype))


def _allowed(mask, causal, tq, tk):
    """Where a query may attend to a key, (1 | N, 1 | H, Tq, Tk); None: everywhere."""
    if causal:
        later = jnp.arange(tk)[None, :] > jnp.arange(tq)[:, None]  # key j after query i
        causal_mask = ~later[None, None]
        return causal_mask if mask is None else mask & causal_mask
    return mask


def _probabilities(q, k, mask, config):
    """P = softmax(S) row by row, S = scale·QKᵀ with −∞ where the mask forbids, in the
    accumulation dtype. A row with no allowed key gets P = 0."""
    S = _dot("nhqd,nhkd->nhqk", (config.scale * q).astype(q.dtype), k)  # (scale·Q)·Kᵀ
    allowed = _allowed(mask, config.causal, q.shape[2], k.shape[2])
    if allowed is not None:
        S = jnp.where(allowed, S, -jnp.inf)
    # Shifting by the row max changes nothing (softmax is invariant to it, so its derivative
    # is zero) and keeps exp() from overflowing; a row of −∞ is shifted by 0 instead.
    m = jax.lax.stop_gradient(jnp.max(S, axis=-1, keepdims=True))
    e = jnp.exp(S - jnp.where(jnp.isfinite(m), m, 0))
    row_sum = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(row_sum > 0, row_sum, 1)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, config):
    P = _probabilities(q, k, mask, config)
    return _dot("nhqk,nhkd->nhqd", P.astype(v.dtype), v).astype(v.dtype)  # O = P·V


def _attention_fwd(q, k, v, mask, config):
    P = _probabilities(q, k, mask, config)
    O = _attention(q, k, v, mask, config)
    # Residuals: Q, K, V, the probabilities P (N, H, Tq, Tk) and the output O.
    return O, (q, k, v, P, O)


def _attention_bwd(config, residuals, g):
    q, k, v, P, O = residuals
    dO = g
    dV = _dot("nhqk,nhqd->nhkd", P.astype(dO.dtype), dO)  # dV = Pᵀ·dO
    dP = _dot("nhqd,nhkd->nhqk", dO, v)  # dP = dO·Vᵀ
    # Softmax Jacobian per row: dS = P ⊙ (dP − rowsum(dP ⊙ P)), and rowsum(dP ⊙ P) = rowsum(dO ⊙ O).
    D = jnp.sum(dO.astype(P.dtype) * O.astype(P.dtype), axis=-1, keepdims=True)
    dS = (P * (dP - D)).astype(q.dtype)
    dQ = config.scale * _dot("nhqk,nhkd->nhqd", dS, k)  # dQ = scale·dS·K
    dK = config.scale * _dot("nhqk,nhqd->nhkd", dS, q)  # dK = scale·dSᵀ·Q
    return dQ.astype(q.dtype), dK.astype(k.dtype), dV.astype(v.dtype), None  # mask: none


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, mask=None, causal: bool = False, scale: float | None = None):
    r"""Scaled dot-product attention :math:`O = \operatorname{softmax}(\text{scale}\cdot QK^\top)V`.

    Backward (``dO = g``; the softmax Jacobian row by row, never formed):

    .. math::
        dV = P^\top dO,\quad dP = dO\,V^\top,\quad
        dS = P \odot (dP - \operatorname{rowsum}(dO \odot O)),\quad
        dQ = \text{scale}\cdot dS\,K,\quad dK = \text{scale}\cdot dS^\top Q

    Saves the probabilities ``P`` — (N, H, Tq, Tk) floats; :func:`flash_attention` is the same
    function in O(T) memory. A query with no allowed key returns zeros, and its gradients are
    zero (never NaN).

    Args:
      q: queries ``(N, H, Tq, d)``.
      k: keys ``(N, H, Tk, d)``.
      v: values ``(N, H, Tk, dv)``; all three of one floating dtype.
      mask: optional boolean array broadcastable to ``(N, H, Tq, Tk)``, True where query i may
        attend to key j. Not differentiated.
      causal: static; query i attends only to keys j ≤ i (needs Tq = Tk). Combines with ``mask``.
      scale: static; multiplies the scores, default ``1/√d``.

    Returns:
      ``O`` of shape ``(N, H, Tq, dv)``, the dtype of ``q``. For 16-bit inputs the scores,
      softmax statistics and sums are float32.

    Derivation: docs/derivations.md §11.1-§11.2.
    """
    args = _attention_checks.attention_args("attention", q, k, v, mask, causal, scale)
    return _attention(args.q, args.k, args.v, args.mask, AttentionConfig(args.causal, args.scale))


# --- flash attention: the same function, blockwise, O(T) memory -------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_attention(q, k, v, config):
    return _flash.forward(q, k, v, config)  # (O, L)


def _flash_attention_fwd(q, k, v, config):
    O, L = _flash_attention(q, k, v, config)
    # Residuals: Q, K, V, the output O and the per-row log-sum-exp L (N, H, Tq): no T×T array.
    return (O, L), (q, k, v, O, L)


def _flash_attention_bwd(config, residuals, g):
    q, k, v, O, L = residuals
    dO, dL = g  # dL is zero unless L itself is differentiated (grad of grad)
    # D = rowsum(dO ⊙ O) = rowsum(dP ⊙ P); since ∂L_i/∂S_ij = P_ij, dL enters as dS += dL·P.
    D = jnp.sum(dO.astype(L.dtype) * O.astype(L.dtype), axis=-1) - dL
    dQ, dK, dV = _flash.backward(q, k, v, L, dO, D, config)  # P = exp(S − L), tile by tile
    return dQ.astype(q.dtype), dK.astype(k.dtype), dV.astype(v.dtype)


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def flash_attention(q, k, v, *, causal: bool = False, scale: float | None = None,
                    block_q: int | None = None, block_k: int | None = None):
    r"""Attention evaluated block by block (FlashAttention): the function of :func:`attention`
    in O(N·H·T·d) memory.

    The forward walks key blocks with the online softmax (running max and sum) and saves only
    the output ``O`` and the per-row log-sum-exp :math:`L = \log\sum_j e^{S_{ij}}`. The backward
    recomputes :math:`P = e^{S - L}` one ``block_q × block_k`` tile at a time:

    .. math::
        D = \operatorname{rowsum}(dO \odot O),\quad
        dV_j \mathrel{+}= P_{ij}^\top dO_i,\quad
        dS_{ij} = P_{ij} \odot (dO_i V_j^\top - D_i),\quad
        dQ_i \mathrel{+}= \text{scale}\cdot dS_{ij} K_j,\quad
        dK_j \mathrel{+}= \text{scale}\cdot dS_{ij}^\top Q_i

    No T × T array exists, neither saved nor as a temporary. With ``causal`` the tiles above
    the diagonal are skipped. Plain ``jax.numpy``/``lax``: runs on every platform.

    Args:
      q: queries ``(N, H, Tq, d)``.
      k: keys ``(N, H, Tk, d)``.
      v: values ``(N, H, Tk, dv)``; all three of one floating dtype.
      causal: static; query i attends only to keys j ≤ i (needs Tq = Tk).
      scale: static; multiplies the scores, default ``1/√d``.
      block_q, block_k: static tile lengths (queries, keys); default per platform, capped at
        Tq and Tk. Lengths that are not a multiple are padded and masked.

    Returns:
      ``O`` of shape ``(N, H, Tq, dv)``, the dtype of ``q``; statistics and sums in float32
      for 16-bit inputs.

    Derivation: docs/derivations.md §11.3-§11.5.
    """
    op = "flash_attention"
    args = _attention_checks.attention_args(op, q, k, v, None, causal, scale)
    config = _flash.FlashConfig(args.causal, args.scale,
                                _attention_checks.block_size(op, "block_q", block_q),
                                _attention_checks.block_size(op, "block_k", block_k))
    O, _ = _flash_attention(args.q, args.k, args.v, config)
    return O
