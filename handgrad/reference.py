"""The reference implementations: every op's forward in plain JAX, with no custom_vjp.

This is what ``jax.grad`` differentiates when handgrad checks a hand-written backward, and what
``models.mlp(params, x, ops=hg.reference)`` runs for autodiff training. Same names, same
signatures, same forward values (and the same input checks) as the ops in ``handgrad``.

Two conventions are built into the formulas so that autodiff agrees with the hand rules:
``relu``/``leaky_relu`` use ``where(z >= 0, …)``, whose derivative at exactly 0 is 1 (seed 001),
and the losses sum over features and average over the batch.

It shares nothing with the ops but their argument checks (``handgrad._checks``, which raise
and compute nothing): padding, output sizes and windows come from JAX's own
``lax.padtype_to_pads``, ``lax.conv_general_dilated`` and ``lax.reduce_window``, so that a
mistake in the ops' window arithmetic would show in every comparison with this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlog1py, xlogy

from handgrad import _checks
from handgrad._stats import BatchNormStats


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



def _pads(op, padding, in_hw, reach, stride):
    """((top, bottom), (left, right)): "SAME"/"VALID" by lax.padtype_to_pads, the rest as given."""
    _checks.check_padding(op, padding)
    if isinstance(padding, str):
        return tuple(jax.lax.padtype_to_pads(in_hw, reach, stride, padding.upper()))
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    x, w = jnp.asarray(x), jnp.asarray(w)
    b = None if b is None else jnp.asarray(b)
    _checks.check_conv2d_args("conv2d", x, w, b, groups)
    stride = _checks.pair("conv2d", "stride", stride)
    dilation = _checks.pair("conv2d", "dilation", dilation)
    reach = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilation)]
    pads = _pads("conv2d", padding, x.shape[2:], reach, stride)
    _checks.check_window_fits("conv2d", x, reach, pads, "kernel")
    z = jax.lax.conv_general_dilated(
        x, w, window_strides=stride, padding=pads, rhs_dilation=dilation,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=groups,
    )
    return z if b is None else z + b.reshape(1, -1, 1, 1)


def _pool(op, x, init, reducer, window, stride, padding, at_most_half_window=False):
    x = jnp.asarray(x)
    _checks.check_nchw(op, x)
    window = _checks.pair(op, "window", window)
    stride = window if stride is None else _checks.pair(op, "stride", stride)
    pads = _pads(op, padding, x.shape[2:], window, stride)
    if at_most_half_window:
        _checks.check_pool_padding(op, x, window, pads)
    _checks.check_window_fits(op, x, window, pads, "window")
    # A Python-scalar identity lets JAX recognize the max/add monoid and pick the
    # differentiable reduce_window_max / reduce_window_sum primitives.
    out = jax.lax.reduce_window(x, init, reducer, (1, 1, *window), (1, 1, *stride),
                                ((0, 0), (0, 0), *pads))
    return out, window


def max_pool2d(x, window, stride=None, padding=0):
    # What jax.grad differentiates: reduce_window max, whose VJP XLA runs as select-and-scatter.
    out, _ = _pool("max_pool2d", x, -jnp.inf, jax.lax.max, window, stride, padding,
                   at_most_half_window=True)
    return out


def avg_pool2d(x, window, stride=None, padding=0):
    total, (kh, kw) = _pool("avg_pool2d", x, 0.0, jax.lax.add, window, stride, padding)
    return total / (kh * kw)


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
