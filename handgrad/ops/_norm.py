r"""Batch normalization and layer normalization with the compact derived backward.

With :math:`\hat x = (x - μ)/σ`, :math:`σ = \sqrt{\mathrm{var} + ε}` (biased variance over the
m reduced entries) and :math:`y = γ\hat x + β`, the chain rule through μ and σ collapses to

.. math::
    dx = \frac{1}{mσ}\Big(m\,\hat g - \sum \hat g - \hat x \sum \hat g\,\hat x\Big),
    \qquad \hat g = γ g

(γ is constant along batch norm's reduced axes, so it factors out; for layer norm it does
not, hence ĝ). Statistics accumulate in float32 for 16-bit inputs. Derivation:
docs/derivations.md §8.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from handgrad import _checks
from handgrad._stats import BatchNormStats
from handgrad.ops._activations import accumulation_dtype


def _normalize(x, reduce_axes, eps):
    """x̂ and 1/σ (keepdims), computed in the accumulation dtype."""
    xf = x.astype(accumulation_dtype(x.dtype))
    mean = jnp.mean(xf, axis=reduce_axes, keepdims=True)
    centered = xf - mean
    inv_std = jax.lax.rsqrt(jnp.mean(centered * centered, axis=reduce_axes, keepdims=True) + eps)
    return centered * inv_std, inv_std


def _feature_shape(x, axis):
    return tuple(x.shape[axis] if i == axis else 1 for i in range(x.ndim))


def _reduce_axes(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis)


# --- batch norm, training mode (batch statistics) -------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, gamma, beta, axis, eps):
    x_hat, _ = _normalize(x, _reduce_axes(x, axis), eps)
    shape = _feature_shape(x, axis)
    return (gamma.reshape(shape) * x_hat + beta.reshape(shape)).astype(x.dtype)


def _batch_norm_train_fwd(x, gamma, beta, axis, eps):
    x_hat, inv_std = _normalize(x, _reduce_axes(x, axis), eps)
    # Residuals: x̂ (the normalized input), 1/σ per feature, and γ.
    return _batch_norm_train(x, gamma, beta, axis, eps), (x_hat, inv_std, gamma)


def _batch_norm_train_bwd(axis, eps, residuals, g):
    x_hat, inv_std, gamma = residuals
    reduce_axes = _reduce_axes(x_hat, axis)
    gf = g.astype(x_hat.dtype)
    m = x_hat.size // x_hat.shape[axis]
    sum_g = jnp.sum(gf, axis=reduce_axes, keepdims=True)  # = dβ
    sum_g_xhat = jnp.sum(gf * x_hat, axis=reduce_axes, keepdims=True)  # = dγ
    scale = gamma.reshape(_feature_shape(x_hat, axis)).astype(x_hat.dtype) * inv_std / m
    dx = scale * (m * gf - sum_g - x_hat * sum_g_xhat)
    return (dx.astype(g.dtype), sum_g_xhat.reshape(gamma.shape).astype(gamma.dtype),
            sum_g.reshape(gamma.shape).astype(gamma.dtype))


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


# --- batch norm, eval mode (running statistics): an affine map ------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _batch_norm_eval(x, gamma, beta, mean, var, axis, eps):
    shape = _feature_shape(x, axis)
    inv_std = jax.lax.rsqrt(var.reshape(shape) + eps)
    return (gamma.reshape(shape) * (x - mean.reshape(shape)) * inv_std
            + beta.reshape(shape)).astype(x.dtype)


def _batch_norm_eval_fwd(x, gamma, beta, mean, var, axis, eps):
    return _batch_norm_eval(x, gamma, beta, mean, var, axis, eps), (x, gamma, mean, var)


def _batch_norm_eval_bwd(axis, eps, residuals, g):
    x, gamma, mean, var = residuals
    shape = _feature_shape(x, axis)
    inv_std = jax.lax.rsqrt(var.reshape(shape) + eps)
    x_hat = (x - mean.reshape(shape)) * inv_std
    reduce_axes = _reduce_axes(x, axis)
    dx = g * gamma.reshape(shape) * inv_std  # fixed statistics: dy/dx = γ/σ_running
    dgamma = jnp.sum(g * x_hat, axis=reduce_axes)
    dbeta = jnp.sum(g, axis=reduce_axes)
    # The running statistics are buffers, not parameters: no gradient.
    return dx.astype(x.dtype), dgamma.astype(gamma.dtype), dbeta.astype(gamma.dtype), None, None


_batch_norm_eval.defvjp(_batch_norm_eval_fwd, _batch_norm_eval_bwd)


def batch_norm(x, gamma, beta, *, axis: int = 1, eps: float = 1e-5, momentum: float = 0.1,
               running_mean=None, running_var=None, training: bool = True):
    r"""Batch normalization over every axis but ``axis`` (the features/channels).

    Training mode normalizes with the batch's mean and biased variance; backward:

    .. math::
        dx = \frac{γ}{mσ}\big(m g - \textstyle\sum g - \hat x \sum g \hat x\big),\quad
        dγ = \textstyle\sum g\hat x,\quad dβ = \textstyle\sum g

    Eval mode (``training=False``) uses the running statistics: an affine map whose backward
    is ``dx = g·γ/σ_running``.

    Args:
      x: ``(N, F)`` or ``(N, C, H, W)`` (any rank ≥ 2).
      gamma, beta: ``(F,)``.
      axis: the feature axis (1 for both layouts above).
      eps: added to the variance.
      momentum: running ← (1 − momentum)·running + momentum·batch (unbiased batch variance
        for the running estimate, as PyTorch).
      running_mean, running_var: ``(F,)``; default zeros and ones.
      training: batch statistics (True) or running statistics (False).

    Returns:
      ``(y, BatchNormStats(mean, var))``: the output, same shape as ``x``, and the updated
      running statistics (unchanged in eval mode; not differentiated).

    Derivation: docs/derivations.md §8.1.
    """
    op = "batch_norm"
    x, gamma, beta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
    axis = _checks.check_norm_args(op, x, gamma, beta, axis)
    eps = _checks.check_scalar(op, "eps", eps)
    momentum = _checks.check_scalar(op, "momentum", momentum)
    features = x.shape[axis]
    stat_dtype = accumulation_dtype(x.dtype)
    mean = jnp.zeros((features,), stat_dtype) if running_mean is None else running_mean
    var = jnp.ones((features,), stat_dtype) if running_var is None else running_var
    for name, stat in (("running_mean", mean), ("running_var", var)):
        if tuple(jnp.shape(stat)) != (features,):
            raise ValueError(
                f"{op}: `{name}` must have shape ({features},), got {tuple(jnp.shape(stat))}."
            )
    if not training:
        return _batch_norm_eval(x, gamma, beta, mean, var, axis, eps), BatchNormStats(mean, var)
    y = _batch_norm_train(x, gamma, beta, axis, eps)
    reduce_axes = _reduce_axes(x, axis)
    xs = jax.lax.stop_gradient(x).astype(stat_dtype)  # statistics are buffers, not on the graph
    m = x.size // features
    batch_mean = jnp.mean(xs, axis=reduce_axes)
    batch_var = jnp.var(xs, axis=reduce_axes) * (m / max(m - 1, 1))
    new = BatchNormStats(
        ((1 - momentum) * mean + momentum * batch_mean).astype(jnp.result_type(mean)),
        ((1 - momentum) * var + momentum * batch_var).astype(jnp.result_type(var)),
    )
    return y, new


# --- layer norm ------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, gamma, beta, eps):
    x_hat, _ = _normalize(x, (-1,), eps)
    y = _broadcast_last(gamma, x.ndim) * x_hat + _broadcast_last(beta, x.ndim)
    return y.astype(x.dtype)


def _broadcast_last(p, ndim):
    return p.reshape((1,) * (ndim - 1) + p.shape)


def _layer_norm_fwd(x, gamma, beta, eps):
    x_hat, inv_std = _normalize(x, (-1,), eps)
    return _layer_norm(x, gamma, beta, eps), (x_hat, inv_std, gamma)


def _layer_norm_bwd(eps, residuals, g):
    x_hat, inv_std, gamma = residuals
    features = x_hat.shape[-1]
    gf = g.astype(x_hat.dtype)
    g_hat = gf * _broadcast_last(gamma.astype(x_hat.dtype), x_hat.ndim)  # ĝ = γ ⊙ g
    sum_g_hat = jnp.sum(g_hat, axis=-1, keepdims=True)
    sum_g_hat_xhat = jnp.sum(g_hat * x_hat, axis=-1, keepdims=True)
    dx = inv_std / features * (features * g_hat - sum_g_hat - x_hat * sum_g_hat_xhat)
    rows = tuple(range(x_hat.ndim - 1))
    dgamma = jnp.sum(gf * x_hat, axis=rows)
    dbeta = jnp.sum(gf, axis=rows)
    return dx.astype(g.dtype), dgamma.astype(gamma.dtype), dbeta.astype(gamma.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x, gamma, beta, eps: float = 1e-5):
    r"""Layer normalization over the last axis, per row.

    Backward, with :math:`\hat g = γ ⊙ g` and sums over the last axis (F entries):

    .. math::
        dx = \frac{1}{Fσ}\big(F\hat g - \textstyle\sum \hat g - \hat x \sum \hat g\hat x\big),
        \quad dγ = \textstyle\sum_{rows} g\hat x,\quad dβ = \textstyle\sum_{rows} g

    Args:
      x: ``(..., F)``, rank ≥ 2.
      gamma, beta: ``(F,)``.
      eps: added to the variance.

    Returns:
      same shape as ``x``.

    Derivation: docs/derivations.md §8.2.
    """
    op = "layer_norm"
    x, gamma, beta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
    _checks.check_norm_args(op, x, gamma, beta, -1, "x.shape[-1]")
    return _layer_norm(x, gamma, beta, _checks.check_scalar(op, "eps", eps))


# --- RMSNorm -------------------------------------------------------------------------------


def _rms_normalize(x, eps):
    """x̂ = x/rms and 1/rms (keepdims), rms = √(mean(x²) + ε) over the last axis."""
    xf = x.astype(accumulation_dtype(x.dtype))
    inv_rms = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return xf * inv_rms, inv_rms


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, gamma, eps):
    x_hat, _ = _rms_normalize(x, eps)
    return (_broadcast_last(gamma, x.ndim) * x_hat).astype(x.dtype)


def _rms_norm_fwd(x, gamma, eps):
    x_hat, inv_rms = _rms_normalize(x, eps)
    # Residuals: x̂ = x/rms, 1/rms per row, and γ.
    return _rms_norm(x, gamma, eps), (x_hat, inv_rms, gamma)


def _rms_norm_bwd(eps, residuals, g):
    x_hat, inv_rms, gamma = residuals
    gf = g.astype(x_hat.dtype)
    g_hat = gf * _broadcast_last(gamma.astype(x_hat.dtype), x_hat.ndim)  # ĝ = γ ⊙ g
    # Layer norm without the mean: only the 1/rms path remains, dx = (ĝ − x̂·mean(ĝ x̂))/rms.
    dx = inv_rms * (g_hat - x_hat * jnp.mean(g_hat * x_hat, axis=-1, keepdims=True))
    dgamma = jnp.sum(gf * x_hat, axis=tuple(range(x_hat.ndim - 1)))
    return dx.astype(g.dtype), dgamma.astype(gamma.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x, gamma, eps: float = 1e-6):
    r"""RMS normalization over the last axis (F entries): :math:`y = γ ⊙ x / \mathrm{rms}(x)`,
    :math:`\mathrm{rms} = \sqrt{\tfrac1F\sum_j x_j^2 + ε}` — layer norm without the centering
    and without β.

    Backward, with :math:`\hat x = x/\mathrm{rms}`, :math:`\hat g = γ ⊙ g`, per row:

    .. math::
        dx = \frac{1}{\mathrm{rms}}\Big(\hat g - \hat x\,\tfrac1F\textstyle\sum_j \hat g_j\hat x_j
        \Big),\qquad dγ = \textstyle\sum_{rows} g ⊙ \hat x

    Args:
      x: ``(..., F)``, rank ≥ 1.
      gamma: ``(F,)``.
      eps: added to the mean square.

    Returns:
      same shape and dtype as ``x``.

    Derivation: docs/derivations.md §8.4.
    """
    op = "rms_norm"
    x, gamma = jnp.asarray(x), jnp.asarray(gamma)
    _checks.check_floating(op, "x", x)
    _checks.check_floating(op, "gamma", gamma)
    _checks.check_min_rank(op, "x", x, 1, "(..., F)")
    if tuple(gamma.shape) != (x.shape[-1],):
        raise ValueError(f"{op}: `gamma` must have shape (x.shape[-1],) = ({x.shape[-1]},) for x "
                         f"{tuple(x.shape)}, got {tuple(gamma.shape)}.")
    return _rms_norm(x, gamma, _checks.check_scalar(op, "eps", eps))


# --- group norm ----------------------------------------------------------------------------


def _grouped(x, num_groups):
    """(N, C, ...) -> (N, G, C/G, ...): one statistic per (sample, group)."""
    return x.reshape(x.shape[0], num_groups, x.shape[1] // num_groups, *x.shape[2:])


def _group_axes(x_grouped):
    return tuple(range(2, x_grouped.ndim))


def _per_channel(p, ndim):
    """γ or β (C,) as (1, C, 1, …): the explicit broadcast over samples and positions."""
    return p.reshape((1, -1) + (1,) * (ndim - 2))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x, gamma, beta, num_groups, eps):
    xg = _grouped(x, num_groups)
    x_hat = _normalize(xg, _group_axes(xg), eps)[0].reshape(x.shape)
    return (_per_channel(gamma, x.ndim) * x_hat + _per_channel(beta, x.ndim)).astype(x.dtype)


def _group_norm_fwd(x, gamma, beta, num_groups, eps):
    xg = _grouped(x, num_groups)
    x_hat, inv_std = _normalize(xg, _group_axes(xg), eps)
    # Residuals: x̂ (grouped), 1/σ per (sample, group), and γ.
    return _group_norm(x, gamma, beta, num_groups, eps), (x_hat, inv_std, gamma)


def _group_norm_bwd(num_groups, eps, residuals, g):
    x_hat, inv_std, gamma = residuals  # x̂ (N, G, C/G, ...)
    axes = _group_axes(x_hat)
    gf = g.astype(x_hat.dtype)
    g_hat = _grouped(gf * _per_channel(gamma.astype(gf.dtype), g.ndim), num_groups)  # ĝ = γ ⊙ g
    m = x_hat[0, 0].size  # entries per group
    # Layer norm's compact form (§8.2) within each group: γ varies along it, so ĝ.
    sum_g_hat = jnp.sum(g_hat, axis=axes, keepdims=True)
    sum_g_hat_xhat = jnp.sum(g_hat * x_hat, axis=axes, keepdims=True)
    dx = inv_std / m * (m * g_hat - sum_g_hat - x_hat * sum_g_hat_xhat)
    per_channel_sum = (0, *range(2, g.ndim))  # over samples and positions
    dgamma = jnp.sum(gf * x_hat.reshape(g.shape), axis=per_channel_sum)
    dbeta = jnp.sum(gf, axis=per_channel_sum)
    return (dx.reshape(g.shape).astype(g.dtype), dgamma.astype(gamma.dtype),
            dbeta.astype(gamma.dtype))


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x, num_groups: int, gamma, beta, eps: float = 1e-5):
    r"""Group normalization: the C channels of ``x (N, C, ...)`` split into ``num_groups``
    groups of C/G; each (sample, group) is normalized over its channels and positions
    (m = C/G·H·W… entries), then :math:`y = γ_c\hat x + β_c` per channel.

    Backward, per (sample, group), with :math:`\hat g = γ ⊙ g`:

    .. math::
        dx = \frac{1}{mσ}\Big(m\,\hat g - \textstyle\sum \hat g - \hat x\sum \hat g\,\hat x\Big),
        \quad dγ_c = \textstyle\sum_{n,\,positions} g\,\hat x,\quad dβ_c = \sum_{n,\,positions} g

    ``num_groups = 1`` is layer norm over (C, ...) with per-channel γ, β; ``num_groups = C``
    is instance norm.

    Args:
      x: ``(N, C, ...)``, rank ≥ 2.
      num_groups: static int dividing C.
      gamma, beta: ``(C,)``.
      eps: added to the variance.

    Returns:
      same shape and dtype as ``x``.

    Derivation: docs/derivations.md §8.5.
    """
    op = "group_norm"
    x, gamma, beta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
    _checks.check_floating(op, "x", x)
    _checks.check_min_rank(op, "x", x, 2, "(N, C, ...)")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"{op}: `num_groups` must be a Python int (static), got {num_groups!r}.")
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"{op}: the channels of `x` (C={channels}, x {tuple(x.shape)}) must be "
                         f"divisible by `num_groups` (={num_groups}).")
    for name, p in (("gamma", gamma), ("beta", beta)):
        _checks.check_floating(op, name, p)
        if tuple(p.shape) != (channels,):
            raise ValueError(f"{op}: `{name}` must have shape (C,) = ({channels},) for x "
                             f"{tuple(x.shape)}, got {tuple(p.shape)}.")
    return _group_norm(x, gamma, beta, num_groups, _checks.check_scalar(op, "eps", eps))
