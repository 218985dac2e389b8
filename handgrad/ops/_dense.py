r"""Dense (fully connected) layer and flatten, with hand-written backward passes.

The notes (notes 000, 002) write samples as columns: ``Z = W·A_prev + b`` with ``A_prev`` of
shape ``(n_in, m)``. handgrad is batch-first, so samples are rows and every formula holds
transposed: ``z = x·Wᵀ + b``. Derivation: docs/derivations.md §1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from handgrad import _checks


def broadcast_bias(b, ndim):
    """b (n_out,) -> (1, …, 1, n_out): the explicit broadcast over the sample axes."""
    return b.reshape((1,) * (ndim - 1) + b.shape)


@jax.custom_vjp
def _dense(x, w, b):
    z = jnp.matmul(x, w.T)
    return z + broadcast_bias(b, z.ndim)


def _dense_fwd(x, w, b):
    # Residuals: the layer input (for dW) and the weights (for dA_prev); b needs nothing.
    return _dense(x, w, b), (x, w)


def _dense_bwd(residuals, g):
    x, w = residuals
    # g is ∂J/∂Z (batch-first, (..., n_out)); for a mean loss it already carries 1/m.
    g_rows = g.reshape(-1, g.shape[-1])  # (M, n_out): every leading axis is a "sample" axis
    x_rows = x.reshape(-1, x.shape[-1])  # (M, n_in)
    dA_prev = jnp.matmul(g, w)  # notes: dA_prev = Wᵀ·dZ  -> batch-first: g·W
    dW = jnp.matmul(g_rows.T, x_rows)  # notes: dW = dZ·A_prevᵀ/m -> gᵀ·x (1/m inside g)
    db = jnp.sum(g_rows, axis=0)  # notes: db = Σ dZ/m over samples (bias broadcast ↔ sum)
    return dA_prev.astype(x.dtype), dW.astype(w.dtype), db.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def _dense_no_bias(x, w):
    return jnp.matmul(x, w.T)


def _dense_no_bias_fwd(x, w):
    return _dense_no_bias(x, w), (x, w)


def _dense_no_bias_bwd(residuals, g):
    dA_prev, dW, _ = _dense_bwd(residuals, g)
    return dA_prev, dW


_dense_no_bias.defvjp(_dense_no_bias_fwd, _dense_no_bias_bwd)


def dense(x, w, b=None):
    r"""Affine layer :math:`z = x W^\top + b`, batch-first.

    Backward (the notes' column formulas, transposed to rows; ``g = ∂J/∂z``):

    .. math::
        dx = g W, \qquad dW = g^\top x, \qquad db = \textstyle\sum_{\text{rows}} g

    For a mean loss the cotangent ``g`` already holds the ``1/m`` that the notes apply at
    ``dW = dZ·A_prevᵀ/m`` and ``db = Σ dZ/m``, so the numbers are the same.

    Args:
      x: inputs, shape ``(m, n_in)`` (any number of leading sample axes is allowed).
      w: weights, shape ``(n_out, n_in)`` — the notes' ``W[l]``.
      b: optional bias, shape ``(n_out,)``.

    Returns:
      ``z`` of shape ``(m, n_out)``.

    Derivation: docs/derivations.md §1.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    b = None if b is None else jnp.asarray(b)
    _checks.check_dense_args("dense", x, w, b)
    if b is None:
        return _dense_no_bias(x, w)
    return _dense(x, w, b)


@jax.custom_vjp
def _flatten(x):
    return x.reshape(x.shape[0], -1)


def _flatten_fwd(x):
    # Only the shape is needed, and that is static: keep a zero-size witness of it.
    return _flatten(x), jnp.zeros((0, *x.shape[1:]), x.dtype)


def _flatten_bwd(witness, g):
    # reshape ↔ reshape back (an adjoint pair): the gradient is the same numbers, re-shaped.
    return (g.reshape(g.shape[0], *witness.shape[1:]).astype(witness.dtype),)


_flatten.defvjp(_flatten_fwd, _flatten_bwd)


def flatten(x):
    r"""Flatten every axis after the first: ``(N, d1, d2, …) -> (N, d1·d2·…)``.

    Backward: the cotangent reshaped back to ``x``'s shape (reshape is its own adjoint).

    Args:
      x: array of shape ``(N, …)``, rank ≥ 1.

    Returns:
      array of shape ``(N, prod(x.shape[1:]))``.

    Derivation: docs/derivations.md §1.4.
    """
    x = jnp.asarray(x)
    _checks.check_floating("flatten", "x", x)
    _checks.check_min_rank("flatten", "x", x, 1, "(N, ...)")
    return _flatten(x)
