"""The reference implementations: every op's forward in plain JAX, with no custom_vjp.

This is what ``jax.grad`` differentiates when handgrad checks a hand-written backward, and what
``models.mlp(params, x, ops=hg.reference)`` runs for autodiff training. Same names, same
signatures, same forward values (and the same input checks) as the ops in ``handgrad``.

Two conventions are built into the formulas so that autodiff agrees with the hand rules:
``relu``/``leaky_relu`` use ``where(z >= 0, …)``, whose derivative at exactly 0 is 1 (seed 001),
and the losses sum over features and average over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlog1py, xlogy

from handgrad import _checks
from handgrad._stats import BatchNormStats
from handgrad.ops import _conv, _pooling


def dense(x, w, b=None):
    x, w = jnp.asarray(x), jnp.asarray(w)
    b = None if b is None else jnp.asarray(b)
    _checks.check_dense_args("dense", x, w, b)
    z = jnp.matmul(x, w.T)
    return z if b is None else z + b.reshape((1,) * (z.ndim - 1) + b.shape)


def flatten(x):
    x = jnp.asarray(x)
    _checks.check_min_rank("flatten", "x", x, 1, "(N, ...)")
    return x.reshape(x.shape[0], -1)


def sigmoid(z):
    # lax.logistic: 1/(1 + e^{−z}) with a derivative that stays finite when saturated
    # (the literal formula's autodiff gives inf/inf = NaN at z = −1000).
    return jax.nn.sigmoid(jnp.asarray(z))


def tanh(z):
    return jnp.tanh(z)


def relu(z):
    z = jnp.asarray(z)
    return jnp.where(z >= 0, z, jnp.zeros_like(z))


def leaky_relu(z, negative_slope: float = 0.01):
    z = jnp.asarray(z)
    return jnp.where(z >= 0, z, negative_slope * z)


def _accumulation_dtype(dtype):
    """float32 for 16-bit floats, as the ops accumulate."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _acc(z):
    return z.astype(_accumulation_dtype(z.dtype))


def log_softmax(z, axis: int = -1):
    z = jnp.asarray(z)
    zf = _acc(z)
    return (zf - jax.nn.logsumexp(zf, axis=axis, keepdims=True)).astype(z.dtype)


def softmax(z, axis: int = -1):
    z = jnp.asarray(z)
    zf = _acc(z)
    e = jnp.exp(zf - jax.lax.stop_gradient(jnp.max(zf, axis=axis, keepdims=True)))
    return (e / jnp.sum(e, axis=axis, keepdims=True)).astype(z.dtype)


def softmax_cross_entropy(logits, labels):
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    m = logits.shape[0]
    logp = _acc(log_softmax(logits, axis=1))
    if jnp.issubdtype(labels.dtype, jnp.integer):
        picked = jnp.take_along_axis(logp, labels[:, None], axis=1, mode="clip")
        valid = ((labels >= 0) & (labels < logits.shape[1]))[:, None]
        picked = jnp.where(valid, picked, jnp.nan)
        return (-jnp.sum(picked) / m).astype(logits.dtype)
    return (-jnp.sum(_acc(labels) * logp) / m).astype(logits.dtype)


def binary_cross_entropy(probs, targets):
    p, y = _acc(jnp.asarray(probs)), _acc(jnp.asarray(targets))
    loss = -jnp.sum(xlogy(y, p) + xlog1py(1 - y, -p)) / p.shape[0]
    return loss.astype(jnp.result_type(probs))


def sigmoid_binary_cross_entropy(logits, targets):
    z, y = _acc(jnp.asarray(logits)), _acc(jnp.asarray(targets))
    loss = jnp.sum(jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))) / z.shape[0]
    return loss.astype(jnp.result_type(logits))


def squared_error(pred, target):
    p, t = _acc(jnp.asarray(pred)), _acc(jnp.asarray(target))
    return (0.5 * jnp.sum((p - t) ** 2) / p.shape[0]).astype(jnp.result_type(pred))



def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    x, w = jnp.asarray(x), jnp.asarray(w)
    b = None if b is None else jnp.asarray(b)
    stride, pads, dilation, groups, _ = _conv.conv2d_config(
        "conv2d", x, w, b, stride, padding, dilation, groups)
    z = jax.lax.conv_general_dilated(
        x, w, window_strides=stride, padding=pads, rhs_dilation=dilation,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=groups,
    )
    return z if b is None else z + b.reshape(1, -1, 1, 1)


def _reduce_window(x, init, reducer, window, stride, pads):
    # A Python-scalar identity lets JAX recognize the max/add monoid and pick the
    # differentiable reduce_window_max / reduce_window_sum primitives.
    return jax.lax.reduce_window(
        x, init, reducer, (1, 1, *window), (1, 1, *stride),
        ((0, 0), (0, 0), *pads),
    )


def max_pool2d(x, window, stride=None, padding=0):
    x = jnp.asarray(x)
    window, stride, pads, _, _ = _pooling.pool_config(
        "max_pool2d", x, window, stride, padding, pad_at_most_half_window=True)
    # What jax.grad differentiates: reduce_window max, whose VJP XLA runs as select-and-scatter.
    return _reduce_window(x, -jnp.inf, jax.lax.max, window, stride, pads)


def avg_pool2d(x, window, stride=None, padding=0):
    x = jnp.asarray(x)
    window, stride, pads, _, _ = _pooling.pool_config("avg_pool2d", x, window, stride, padding)
    return _reduce_window(x, 0.0, jax.lax.add, window, stride, pads) / (window[0] * window[1])


def batch_norm(x, gamma, beta, *, axis=1, eps=1e-5, momentum=0.1, running_mean=None,
               running_var=None, training=True):
    x, gamma, beta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
    axis = _checks.check_norm_args("batch_norm", x, gamma, beta, axis)
    shape = tuple(x.shape[axis] if i == axis else 1 for i in range(x.ndim))
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    stat_dtype = _accumulation_dtype(x.dtype)
    features = x.shape[axis]
    mean = jnp.zeros((features,), stat_dtype) if running_mean is None else running_mean
    var = jnp.ones((features,), stat_dtype) if running_var is None else running_var
    xf = _acc(x)
    if training:
        mu = jnp.mean(xf, axis=reduce_axes, keepdims=True)
        sigma2 = jnp.mean((xf - mu) ** 2, axis=reduce_axes, keepdims=True)
    else:
        mu, sigma2 = mean.reshape(shape), var.reshape(shape)
    y = gamma.reshape(shape) * (xf - mu) / jnp.sqrt(sigma2 + eps) + beta.reshape(shape)
    stats = BatchNormStats(mean, var)
    if training:
        m = x.size // features
        xs = jax.lax.stop_gradient(xf)
        stats = BatchNormStats(
            (1 - momentum) * mean + momentum * jnp.mean(xs, axis=reduce_axes),
            (1 - momentum) * var + momentum * jnp.var(xs, axis=reduce_axes) * m / max(m - 1, 1),
        )
    return y.astype(x.dtype), stats


def layer_norm(x, gamma, beta, eps=1e-5):
    x, gamma, beta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
    _checks.check_norm_args("layer_norm", x, gamma, beta, -1, "x.shape[-1]")
    xf = _acc(x)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    sigma2 = jnp.mean((xf - mu) ** 2, axis=-1, keepdims=True)
    lead = (1,) * (x.ndim - 1)
    y = gamma.reshape(lead + gamma.shape) * (xf - mu) / jnp.sqrt(sigma2 + eps)
    return (y + beta.reshape(lead + beta.shape)).astype(x.dtype)


def dropout(x, rate, key, *, training=True):
    x = jnp.asarray(x)
    if not training:
        return x
    rate = jnp.asarray(rate)
    keep = jax.random.bernoulli(key, 1 - rate.astype(jnp.float32), x.shape)
    scale = 1 / (1 - rate.astype(jnp.promote_types(x.dtype, jnp.float32)))
    return jnp.where(keep, x * scale, 0).astype(x.dtype)
