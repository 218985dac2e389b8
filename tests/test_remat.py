"""Rematerialization (jax.checkpoint) around hand-written VJPs.

Under ``jax.checkpoint`` the backward pass re-runs the forward — each op's ``_fwd`` — from the
saved inputs instead of keeping the residuals. The hand backward must then see exactly the
residuals it would have seen without remat: dropout must draw the same mask from its key,
max-pool must find the same argmax, batch norm the same statistics.

For small compositions that together use every op family, the gradients (w.r.t. parameters and
input, float64) with remat — whole-function checkpoint with the default policy,
``nothing_saveable`` and ``everything_saveable``, and a checkpoint around every single op — equal
the gradients without remat (rel 1e-12) and those of autodiff through ``hg.reference``.
"""

import functools
from types import SimpleNamespace

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg
from handgrad import registry

RTOL = 1e-12
ATOL = 1e-15
DROPOUT_KEY = jax.random.PRNGKey(42)
# A strongly typed array rate: a Python-float rate hits the dropout bug pinned at the end.
DROPOUT_RATE = jnp.float32(0.4)


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float64)


# --- compositions: (init(key) -> (params, x, extra), loss(params, x, extra, ops), families) ---


def _init_conv(key):
    k = jax.random.split(key, 6)
    params = {"conv_w": _normal(k[0], (4, 2, 3, 3), 0.4), "conv_b": _normal(k[1], (4,), 0.1),
              "fc_w": _normal(k[2], (3, 4 * 3 * 3), 0.3), "fc_b": _normal(k[3], (3,), 0.1)}
    return params, _normal(k[4], (2, 2, 6, 6)), jax.random.randint(k[5], (2,), 0, 3)


def _conv_relu_pool(p, x, labels, ops):
    a = ops.conv2d(x, p["conv_w"], p["conv_b"], padding=1)  # (2, 4, 6, 6)
    a = ops.max_pool2d(ops.relu(a), 2)  # (2, 4, 3, 3)
    return ops.softmax_cross_entropy(ops.dense(ops.flatten(a), p["fc_w"], p["fc_b"]), labels)


def _init_conv_avg(key):
    k = jax.random.split(key, 6)
    params = {"conv_w": _normal(k[0], (3, 2, 2, 2), 0.5), "fc_w": _normal(k[1], (4, 3 * 2 * 2)),
              "fc_b": _normal(k[2], (4,), 0.1)}
    labels = jax.nn.softmax(_normal(k[3], (2, 4)), axis=-1)
    return params, _normal(k[4], (2, 2, 5, 5)), labels


def _conv_sigmoid_avg(p, x, labels, ops):
    a = ops.sigmoid(ops.conv2d(x, p["conv_w"], stride=1))  # no bias: (2, 3, 4, 4)
    a = ops.avg_pool2d(a, 3, stride=2, padding=1)  # (2, 3, 2, 2)
    return ops.softmax_cross_entropy(ops.dense(ops.flatten(a), p["fc_w"], p["fc_b"]), labels)


def _init_dense_bn(key):
    k = jax.random.split(key, 7)
    params = {"w1": _normal(k[0], (5, 4), 0.5), "b1": _normal(k[1], (5,), 0.1),
              "gamma": 1 + _normal(k[2], (5,), 0.2), "beta": _normal(k[3], (5,), 0.1),
              "w2": _normal(k[4], (2, 5), 0.5)}
    return params, _normal(k[5], (6, 4)), _normal(k[6], (6, 2))


def _dense_bn_tanh(p, x, target, ops):
    a = ops.dense(x, p["w1"], p["b1"])
    a, _ = ops.batch_norm(a, p["gamma"], p["beta"])
    a = ops.tanh(a)
    return ops.squared_error(ops.dense(a, p["w2"]), target)


def _init_ln_dropout(key):
    k = jax.random.split(key, 6)
    params = {"gamma": 1 + _normal(k[0], (6,), 0.2), "beta": _normal(k[1], (6,), 0.1),
              "w": _normal(k[2], (3, 6), 0.5), "b": _normal(k[3], (3,), 0.1)}
    targets = jax.random.uniform(k[4], (4, 3), jnp.float64)
    return params, _normal(k[5], (4, 6), 2.0), targets


def _layer_norm_dropout(p, x, targets, ops):
    a = ops.layer_norm(x, p["gamma"], p["beta"])
    a = ops.dropout(a, DROPOUT_RATE, DROPOUT_KEY)
    a = ops.leaky_relu(a, 0.1)
    z = ops.log_softmax(ops.dense(a, p["w"], p["b"]))
    probs = ops.softmax(z)  # softmax of log-probabilities: the same probabilities
    return (ops.binary_cross_entropy(probs, targets)
            + ops.sigmoid_binary_cross_entropy(z, targets))


def _init_attention(key):
    k = jax.random.split(key, 4)
    params = {"w_qkv": _normal(k[0], (12, 4), 0.5), "w_out": _normal(k[1], (2, 4), 0.5)}
    return params, _normal(k[2], (2, 5, 4)), _normal(k[3], (2, 5, 2))


def _attention_dense_mse(p, x, target, ops):
    n, t, f = x.shape  # 2 heads of 2 features: q, k, v as (N, H, T, d)
    q, k, v = ops.dense(x, p["w_qkv"]).reshape(n, t, 3, 2, f // 2).transpose(2, 0, 3, 1, 4)
    a = ops.attention(q, k, v, causal=True)
    a = ops.flash_attention(a, k, v, causal=True, block_q=2, block_k=3)
    return ops.squared_error(ops.dense(a.transpose(0, 2, 1, 3).reshape(n, t, f), p["w_out"]),
                             target)
def _init_sequence(key):
    k = jax.random.split(key, 12)
    vocab, d, h = 7, 4, 3
    params = {"table": _normal(k[0], (vocab, d)), "gamma": 1 + _normal(k[1], (d,), 0.2),
              "lstm_wx": _normal(k[2], (4 * h, d), 0.5), "lstm_wh": _normal(k[3], (4 * h, h), 0.5),
              "lstm_b": _normal(k[4], (4 * h,), 0.1), "gru_wx": _normal(k[5], (3 * h, h), 0.5),
              "gru_wh": _normal(k[6], (3 * h, h), 0.5), "gru_bx": _normal(k[7], (3 * h,), 0.1),
              "gru_bh": _normal(k[8], (3 * h,), 0.1), "fc_w": _normal(k[9], (vocab, h), 0.5)}
    tokens = jax.random.randint(k[10], (2, 6), 0, vocab)  # inputs tokens[:, :-1], targets [:, 1:]
    return params, _normal(k[11], (2, h), 0.5), tokens  # x: the initial hidden state


def _embedding_lstm_gru(p, h0, tokens, ops):
    e = ops.rms_norm(ops.embedding(tokens[:, :-1], p["table"]), p["gamma"])  # (2, 5, 4)
    hs, (h_last, c_last) = ops.lstm(e, h0, ops.silu(h0), p["lstm_wx"], p["lstm_wh"], p["lstm_b"])
    hs = ops.gelu(ops.gru(hs, h_last, p["gru_wx"], p["gru_wh"], p["gru_bx"], p["gru_bh"]))
    logits = ops.dense(hs, p["fc_w"])  # (2, 5, 7)
    return (ops.softmax_cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      tokens[:, 1:].reshape(-1))
            + ops.squared_error(c_last, h_last))  # the final states' cotangents too


COMPOSITIONS = {
    "conv-relu-maxpool-dense-ce": (_init_conv, _conv_relu_pool,
                                   {"conv", "activations", "pooling", "dense", "losses"}),
    "conv-sigmoid-avgpool-dense-ce": (_init_conv_avg, _conv_sigmoid_avg,
                                      {"conv", "activations", "pooling", "dense", "losses"}),
    "dense-batchnorm-tanh-mse": (_init_dense_bn, _dense_bn_tanh,
                                 {"dense", "norm", "activations", "losses"}),
    "layernorm-dropout-leakyrelu-bce": (_init_ln_dropout, _layer_norm_dropout,
                                        {"norm", "dropout", "activations", "dense", "losses"}),
    "dense-attention-flash-mse": (_init_attention, _attention_dense_mse,
                                  {"dense", "attention", "losses"}),
    "embedding-rmsnorm-lstm-gru-gelu-ce": (_init_sequence, _embedding_lstm_gru,
                                           {"embedding", "norm", "recurrent", "activations",
                                            "dense", "losses"}),
}


def test_compositions_cover_every_family():
    covered = set().union(*(families for _, _, families in COMPOSITIONS.values()))
    assert covered == {spec.family for spec in registry.specs()}


# --- remat modes ----------------------------------------------------------------------------


def _per_op(ops):
    """An ops namespace whose every op is its own jax.checkpoint. Arrays are its arguments;
    everything else (window sizes, slopes, keyword options) is bound statically first."""

    def wrap(fn):
        def call(*args, **kwargs):
            dynamic = [i for i, a in enumerate(args) if isinstance(a, jax.Array | np.ndarray)]

            def inner(*arrays):
                full = list(args)
                for i, a in zip(dynamic, arrays, strict=True):
                    full[i] = a
                return fn(*full, **kwargs)

            return jax.checkpoint(inner)(*(args[i] for i in dynamic))

        return call

    return SimpleNamespace(**{name: wrap(getattr(ops, name)) for name in registry.REGISTRY})


POLICIES = jax.checkpoint_policies
MODES = ("checkpoint", "nothing_saveable", "everything_saveable", "per_op")
# Between them every family; the other compositions run under `-m slow`.
REMAT_QUICK = {"conv-relu-maxpool-dense-ce", "layernorm-dropout-leakyrelu-bce",
               "dense-attention-flash-mse", "embedding-rmsnorm-lstm-gru-gelu-ce"}


def _loss(name, mode, ops):
    _, loss, _ = COMPOSITIONS[name]
    if mode == "per_op":
        return lambda p, x, extra: loss(p, x, extra, _per_op(ops))
    f = lambda p, x, extra: loss(p, x, extra, ops)  # noqa: E731
    if mode is None:
        return f
    if mode == "checkpoint":
        return jax.checkpoint(f)
    return jax.checkpoint(f, policy=getattr(POLICIES, mode))


def _grad_fn(name, mode, ops):
    return jax.jit(jax.value_and_grad(_loss(name, mode, ops), argnums=(0, 1)))


def _data(name):
    init, _, _ = COMPOSITIONS[name]
    return init(jax.random.PRNGKey(sum(map(ord, name))))


@functools.cache
def _baseline(name):
    """(value, grads) without remat: hand VJPs, and autodiff through the reference."""
    data = _data(name)
    return _grad_fn(name, None, hg)(*data), _grad_fn(name, None, hg.reference)(*data)


def _assert_close(got, want, what):
    got_leaves, want_tree = jax.tree_util.tree_flatten(got)
    want_leaves = jax.tree_util.tree_leaves(want)
    assert jax.tree_util.tree_structure(want) == want_tree, what
    for path_index, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype == np.float64 and g.shape == w.shape, what
        scale = float(np.max(np.abs(w), initial=0.0))
        err = float(np.max(np.abs(g - w), initial=0.0))
        assert err <= ATOL + RTOL * scale, (
            f"{what}, leaf {path_index}: max |err| {err:.3e}, max |ref| {scale:.3e}")


def _remat_eqns(jaxpr):
    """Every remat (checkpoint) equation in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_remat_eqns(sub))
    return found


def _count_custom_vjp_calls(jaxpr):
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name.startswith("custom_vjp_call")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_custom_vjp_calls(sub)
    return count


@pytest.mark.parametrize("mode", [  # quick: jax.checkpoint of the whole loss; `-m slow`: all
    pytest.param(m, marks=() if m == "checkpoint" else (pytest.mark.slow,)) for m in MODES])
@pytest.mark.parametrize("name", [  # quick: three compositions that cover every family
    pytest.param(n, marks=() if n in REMAT_QUICK else (pytest.mark.slow,)) for n in COMPOSITIONS])
def test_remat_gradients_equal_no_remat_and_reference(name, mode):
    data = _data(name)
    (value, grads), (ref_value, ref_grads) = _baseline(name)
    got_value, got_grads = _grad_fn(name, mode, hg)(*data)
    assert np.isfinite(float(got_value)) and abs(float(got_value)) > 0
    _assert_close(got_value, value, f"{name} [{mode}] loss vs no remat")
    _assert_close(value, ref_value, f"{name} loss vs reference")
    _assert_close(got_grads, grads, f"{name} [{mode}] grads vs no remat")
    _assert_close(got_grads, ref_grads, f"{name} [{mode}] grads vs reference autodiff")
    _assert_close(grads, ref_grads, f"{name} grads (no remat) vs reference autodiff")
    # Not all gradients vanish (the comparison means something).
    assert max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(grads)) > 1e-3

    # The remat is really there: the gradient's jaxpr holds differentiated checkpoint
    # equations (one per op for per_op), and a whole-function checkpoint that saves nothing
    # recomputes hand ops (custom_vjp calls) in the backward.
    jaxpr = jax.make_jaxpr(jax.grad(_loss(name, mode, hg), argnums=(0, 1)))(*data).jaxpr
    remats = [e for e in _remat_eqns(jaxpr) if e.params.get("differentiated")]
    assert remats, f"no checkpoint in the gradient's jaxpr ({name}, {mode})"
    if mode in ("checkpoint", "nothing_saveable"):
        assert sum(_count_custom_vjp_calls(e.params["jaxpr"]) for e in remats) > 0


def test_remat_of_dropout_reuses_the_forward_mask():
    """The recomputed forward and the backward draw the mask from the same key: the gradient
    is zero exactly where the forward output was dropped."""
    x = _normal(jax.random.PRNGKey(0), (8, 16)) + 3.0  # no zero entries before dropout
    rate = jnp.float32(0.5)
    f = jax.checkpoint(lambda x: jnp.sum(hg.dropout(x, rate, DROPOUT_KEY) ** 2),
                       policy=POLICIES.nothing_saveable)
    y = hg.dropout(x, rate, DROPOUT_KEY)
    g = jax.jit(jax.grad(f))(x)
    np.testing.assert_array_equal(np.asarray(g) == 0, np.asarray(y) == 0)
    np.testing.assert_allclose(g, 2 * y * 2.0, rtol=1e-15)  # d/dx (x·M/(1-p))² = 2y·M/(1-p)
    assert 0 < int(jnp.sum(y == 0)) < y.size


# --- bug: dropout with a Python-float rate under remat or grad-of-jit ---------------------------

# Called inside the traced function: a weak-typed scalar made while tracing becomes a literal.
RATES = {"python-float": lambda: 0.4, "weak-array-in-trace": lambda: jnp.asarray(0.4)}


@pytest.mark.parametrize("rate", list(RATES))
@pytest.mark.parametrize("transform", ["checkpoint",
                                       pytest.param("nothing_saveable", marks=pytest.mark.slow),
                                       "grad_of_jit"])
def test_dropout_python_float_rate_under_remat_and_grad_of_jit(transform, rate):
    x = _normal(jax.random.PRNGKey(1), (4, 6))
    r = RATES[rate]
    f = lambda x: jnp.sum(hg.dropout(x, r(), DROPOUT_KEY) ** 2)  # noqa: E731
    ref = lambda x: jnp.sum(hg.reference.dropout(x, r(), DROPOUT_KEY) ** 2)  # noqa: E731
    wrapped = {"checkpoint": jax.checkpoint(f),
               "nothing_saveable": jax.checkpoint(f, policy=POLICIES.nothing_saveable),
               "grad_of_jit": jax.jit(f)}[transform]
    np.testing.assert_allclose(jax.grad(wrapped)(x), jax.grad(ref)(x), rtol=1e-14)


def test_dropout_strongly_typed_rate_under_grad_of_jit():
    """The workarounds: a strongly typed rate (what the compositions above use), or a weak
    scalar made outside the traced function (a constant, not a literal) — both work."""
    x = _normal(jax.random.PRNGKey(1), (4, 6))
    for rate in (jnp.float32(0.4), jnp.asarray(0.4)):
        f = lambda x, r=rate: jnp.sum(hg.dropout(x, r, DROPOUT_KEY) ** 2)  # noqa: E731
        ref = lambda x, r=rate: jnp.sum(hg.reference.dropout(x, r, DROPOUT_KEY) ** 2)  # noqa: E731
        np.testing.assert_allclose(jax.grad(jax.jit(f))(x), jax.grad(ref)(x), rtol=1e-14)
        np.testing.assert_allclose(jax.grad(jax.checkpoint(f))(x), jax.grad(ref)(x), rtol=1e-14)
