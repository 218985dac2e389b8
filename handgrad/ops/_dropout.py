r"""Inverted dropout with a hand-written backward that regenerates the mask from the key.

Forward: :math:`y = x ⊙ M / (1 - p)` with :math:`M \sim \mathrm{Bernoulli}(1 - p)` drawn from
``key``. Backward: :math:`dx = g ⊙ M / (1 - p)` — the same mask, so the residual is the key
(two words), not a mask of x's size: the mask is drawn again by the counter-based generator,
a little slower on CPU, and `jax.vjp`/remat residuals stay small — where it matters,
activations kept across a long model (docs/performance.md#dropout-mask).
Derivation: docs/derivations.md §8.3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from handgrad import _checks


def _keep_scale(rate, dtype):
    """1/(1 − p) in at least float32, and 0 at p = 1 (all dropped) instead of 0·∞ = NaN."""
    # jnp.asarray, not .astype: under grad-of-jit a weak-typed rate reaches the backward as
    # a Python-float literal, which has no .astype.
    rate = jnp.asarray(rate, jnp.promote_types(dtype, jnp.float32))
    return jnp.where(rate < 1, 1 / jnp.where(rate < 1, 1 - rate, 1), 0)


def _mask(key, rate, shape):
    return jax.random.bernoulli(key, 1 - jnp.asarray(rate, jnp.float32), shape)


@jax.custom_vjp
def _dropout(x, rate, key):
    return jnp.where(_mask(key, rate, x.shape), x * _keep_scale(rate, x.dtype), 0).astype(x.dtype)


def _dropout_fwd(x, rate, key):
    # Residuals: the key and the rate (the mask is drawn again in the backward), and a
    # zero-size witness for x's shape and dtype.
    return _dropout(x, rate, key), (rate, key, jnp.zeros((0, *x.shape), x.dtype))


def _dropout_bwd(residuals, g):
    rate, key, witness = residuals
    shape = witness.shape[1:]
    dx = jnp.where(_mask(key, rate, shape), g * _keep_scale(rate, witness.dtype), 0)
    return dx.astype(witness.dtype), None, None  # no gradient for the rate or the key


_dropout.defvjp(_dropout_fwd, _dropout_bwd)


def dropout(x, rate, key, *, training: bool = True):
    r"""Inverted dropout: zero each entry with probability ``rate``, scale the rest by
    ``1/(1 − rate)`` so the expectation is unchanged; the identity when not training.

    Backward: :math:`dx = g ⊙ M/(1 - p)` with the mask ``M`` drawn again from ``key``.

    Args:
      x: floating array.
      rate: drop probability in ``[0, 1]``; a Python float or a (possibly traced) scalar.
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``); the same key gives the
        same mask in the forward and the backward pass.
      training: if False, return ``x`` unchanged.

    Returns:
      same shape and dtype as ``x``.

    Derivation: docs/derivations.md §8.3.
    """
    op = "dropout"
    x = jnp.asarray(x)
    _checks.check_floating(op, "x", x)
    rate = _checks.check_rate(op, rate)
    if not training:
        return x
    return _dropout(x, rate, key)
