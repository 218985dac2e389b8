"""The reference implementations: every op's forward in plain JAX, with no custom_vjp.

This is what ``jax.grad`` differentiates when handgrad checks a hand-written backward, and what
``models.mlp(params, x, ops=hg.reference)`` runs for autodiff training. Same names, same
signatures, same forward values (and the same input checks) as the ops in ``handgrad``.

Two conventions are built into the formulas so that autodiff agrees with the hand rules:
``relu``/``leaky_relu`` use ``where(z >= 0, …)``, whose derivative at exactly 0 is 1 (note 001),
and the losses sum over features and average over the batch.

It shares nothing with the ops but their argument checks (``handgrad._checks``, which raise
and compute nothing): padding, output sizes and windows come from JAX's own
``lax.padtype_to_pads``, ``lax.conv_general_dilated`` and ``lax.reduce_window``, so that a
mistake in the ops' window arithmetic would show in every comparison with this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlog1py, xlogy

from handgrad import _attention_checks, _checks
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
    axis = _checks.check_axis("log_softmax", z, axis)
    zf = _acc(z)
    return (zf - jax.nn.logsumexp(zf, axis=axis, keepdims=True)).astype(z.dtype)


def softmax(z, axis: int = -1):
    z = jnp.asarray(z)
    axis = _checks.check_axis("softmax", z, axis)
    zf = _acc(z)
    e = jnp.exp(zf - jax.lax.stop_gradient(jnp.max(zf, axis=axis, keepdims=True)))
    return (e / jnp.sum(e, axis=axis, keepdims=True)).astype(z.dtype)


def softmax_cross_entropy(logits, labels, mask=None):
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    positions = logits.shape[:-1]
    mask = jnp.ones(positions, bool) if mask is None else jnp.asarray(mask)
    logp = _acc(log_softmax(logits, axis=-1))
    if jnp.issubdtype(labels.dtype, jnp.integer):
        picked = jnp.take_along_axis(logp, labels[..., None], axis=-1, mode="clip")[..., 0]
        valid = (labels >= 0) & (labels < logits.shape[-1])
        per_position = jnp.where(valid | ~mask, -picked, jnp.nan)
    else:
        per_position = -jnp.sum(_acc(labels) * logp, axis=-1)
    count = jnp.maximum(jnp.sum(mask), 1)
    return (jnp.sum(jnp.where(mask, per_position, 0)) / count).astype(logits.dtype)


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
    if np.ndim(padding) == 0:
        return ((int(padding),) * 2,) * 2
    if np.ndim(padding) == 1:
        return ((int(padding[0]),) * 2, (int(padding[1]),) * 2)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


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
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=int(groups),
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
    rate = _checks.check_rate("dropout", rate)
    if not training:
        return x
    keep = jax.random.bernoulli(key, 1 - rate.astype(jnp.float32), x.shape)
    scale = 1 / (1 - rate.astype(jnp.promote_types(x.dtype, jnp.float32)))
    return jnp.where(keep, x * scale, 0).astype(x.dtype)


def attention(q, k, v, *, mask=None, causal=False, scale=None):
    args = _attention_checks.attention_args("attention", q, k, v, mask, causal, scale)
    acc = jnp.promote_types(args.q.dtype, jnp.float32)  # float32 scores for 16-bit inputs
    s = args.scale * jnp.einsum("nhqd,nhkd->nhqk", args.q.astype(acc), args.k.astype(acc))
    tq, tk = s.shape[2:]
    allowed = jnp.ones((1, 1, tq, tk), bool) if args.mask is None else args.mask
    if args.causal:
        allowed = allowed & (jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None])[None, None]
    s = jnp.where(allowed, s, -jnp.inf)
    # A row with no allowed key: shift by 0 and divide by 1, so that it is 0, not NaN.
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0))
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1)
    return jnp.einsum("nhqk,nhkd->nhqd", p, args.v.astype(acc)).astype(args.q.dtype)


def flash_attention(q, k, v, *, causal=False, scale=None, block_q=None, block_k=None):
    # The same function as attention: the block lengths change how it is evaluated, not what.
    _attention_checks.block_size("flash_attention", "block_q", block_q)
    _attention_checks.block_size("flash_attention", "block_k", block_k)
    return attention(q, k, v, causal=causal, scale=scale)
# --- sequence models: embedding and the recurrent layers --------------------------------------
# Written with no help from handgrad.ops: the step formula as the notes state it, and lax.scan
# over it for the sequence, which jax.grad differentiates through (BPTT by autodiff).


def _sequence_dtypes(*arrays):
    """(accumulation dtype, output dtype): 16-bit inputs run in float32, rounded at the end."""
    out = jnp.result_type(*arrays)
    return jnp.promote_types(out, jnp.float32), out


def embedding(ids, table):
    ids, table = jnp.asarray(ids), jnp.asarray(table)
    vocab = table.shape[0]
    rows = table[jnp.clip(ids, 0, vocab - 1)]
    valid = (ids >= 0) & (ids < vocab)
    return jnp.where(valid[..., None], rows, jnp.nan)  # out-of-range ids: NaN rows


def _rnn_cell(x_t, h_prev, w_x, w_h, b):
    return jnp.tanh(x_t @ w_x.T + h_prev @ w_h.T + b[None])


def _lstm_cell(x_t, h_prev, c_prev, w_x, w_h, b):
    z = x_t @ w_x.T + h_prev @ w_h.T + b[None]
    hidden = h_prev.shape[-1]
    i = jax.nn.sigmoid(z[:, :hidden])
    f = jax.nn.sigmoid(z[:, hidden:2 * hidden])
    g = jnp.tanh(z[:, 2 * hidden:3 * hidden])
    o = jax.nn.sigmoid(z[:, 3 * hidden:])
    c = f * c_prev + i * g
    return o * jnp.tanh(c), c


def _gru_cell(x_t, h_prev, w_x, w_h, b_x, b_h):
    zx = x_t @ w_x.T + b_x[None]
    zh = h_prev @ w_h.T + b_h[None]
    hidden = h_prev.shape[-1]
    r = jax.nn.sigmoid(zx[:, :hidden] + zh[:, :hidden])
    z = jax.nn.sigmoid(zx[:, hidden:2 * hidden] + zh[:, hidden:2 * hidden])
    n = jnp.tanh(zx[:, 2 * hidden:] + r * zh[:, 2 * hidden:])
    return (1 - z) * n + z * h_prev


def rnn_step(x, h_prev, w_x, w_h, b):
    acc, out = _sequence_dtypes(x, h_prev, w_x, w_h, b)
    args = (jnp.asarray(a).astype(acc) for a in (x, h_prev, w_x, w_h, b))
    return _rnn_cell(*args).astype(out)


def lstm_step(x, h_prev, c_prev, w_x, w_h, b):
    acc, out = _sequence_dtypes(x, h_prev, c_prev, w_x, w_h, b)
    h, c = _lstm_cell(*(jnp.asarray(a).astype(acc) for a in (x, h_prev, c_prev, w_x, w_h, b)))
    return h.astype(out), c.astype(out)


def gru_step(x, h_prev, w_x, w_h, b_x, b_h):
    acc, out = _sequence_dtypes(x, h_prev, w_x, w_h, b_x, b_h)
    args = (jnp.asarray(a).astype(acc) for a in (x, h_prev, w_x, w_h, b_x, b_h))
    return _gru_cell(*args).astype(out)


def rnn(x, h0, w_x, w_h, b):
    acc, out = _sequence_dtypes(x, h0, w_x, w_h, b)
    x, h0, w_x, w_h, b = (jnp.asarray(a).astype(acc) for a in (x, h0, w_x, w_h, b))

    def step(h, x_t):
        h = _rnn_cell(x_t, h, w_x, w_h, b)
        return h, h

    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1).astype(out)


def lstm(x, h0, c0, w_x, w_h, b):
    acc, out = _sequence_dtypes(x, h0, c0, w_x, w_h, b)
    x, h0, c0, w_x, w_h, b = (jnp.asarray(a).astype(acc) for a in (x, h0, c0, w_x, w_h, b))

    def step(state, x_t):
        h, c = _lstm_cell(x_t, *state, w_x, w_h, b)
        return (h, c), h

    (h, c), hs = jax.lax.scan(step, (h0, c0), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1).astype(out), (h.astype(out), c.astype(out))


def gru(x, h0, w_x, w_h, b_x, b_h):
    acc, out = _sequence_dtypes(x, h0, w_x, w_h, b_x, b_h)
    x, h0, w_x, w_h, b_x, b_h = (jnp.asarray(a).astype(acc) for a in (x, h0, w_x, w_h, b_x, b_h))

    def step(h, x_t):
        h = _gru_cell(x_t, h, w_x, w_h, b_x, b_h)
        return h, h

    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1).astype(out)


# --- GELU, SiLU, RMSNorm, group norm ---------------------------------------------------------


def gelu(x, approximate=False):
    x = jnp.asarray(x)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if approximate:
        y = 0.5 * xf * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (xf + 0.044715 * xf**3)))
    else:
        y = 0.5 * xf * jax.scipy.special.erfc(-xf / jnp.sqrt(2.0))  # x·Φ(x)
    return y.astype(x.dtype)


def silu(x):
    x = jnp.asarray(x)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (xf * jax.nn.sigmoid(xf)).astype(x.dtype)


def rms_norm(x, gamma, eps=1e-6):
    x, gamma = jnp.asarray(x), jnp.asarray(gamma)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    rms = jnp.sqrt(jnp.mean(xf**2, axis=-1, keepdims=True) + eps)
    return (gamma.reshape((1,) * (x.ndim - 1) + gamma.shape) * xf / rms).astype(x.dtype)


def group_norm(x, num_groups, gamma, beta, eps=1e-5):
    x, gamma, beta = jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta)
    n, c = x.shape[:2]
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    grouped = xf.reshape(n, num_groups, c // num_groups, *x.shape[2:])
    axes = tuple(range(2, grouped.ndim))
    mu = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.mean((grouped - mu) ** 2, axis=axes, keepdims=True)
    x_hat = ((grouped - mu) / jnp.sqrt(var + eps)).reshape(x.shape)
    channel = (1, c) + (1,) * (x.ndim - 2)
    return (gamma.reshape(channel) * x_hat + beta.reshape(channel)).astype(x.dtype)
