"""Models as plain functions over parameter pytrees, written once against an ops namespace.

``mlp(params, x, ops=hg)`` runs the hand-written VJPs; ``mlp(params, x, ops=hg.reference)`` is
the same model differentiated by autodiff. Nothing else differs, so comparing the two isolates
the hand-written backward passes.

Parameters are dicts of arrays; weights are ``(out, in)`` for dense and ``(O, C, kh, kw)`` for
convolutions, as in the ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import jax
import jax.numpy as jnp

import handgrad

# He init for layers followed by ReLU, Glorot for the rest; in/out axes as the ops lay them out.
_HE = jax.nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal", in_axis=1,
                                           out_axis=0)
_GLOROT = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "truncated_normal", in_axis=1,
                                               out_axis=0)


def _init_weight(key, shape, activation, dtype):
    init = _HE if activation in ("relu", "leaky_relu") else _GLOROT
    return init(key, shape, dtype)


def dense_params(key, n_in: int, n_out: int, activation: str = "relu", dtype=jnp.float32):
    return {"w": _init_weight(key, (n_out, n_in), activation, dtype),
            "b": jnp.zeros((n_out,), dtype)}


def conv_params(key, c_in: int, c_out: int, kernel: int, activation="relu", dtype=jnp.float32):
    return {"w": _init_weight(key, (c_out, c_in, kernel, kernel), activation, dtype),
            "b": jnp.zeros((c_out,), dtype)}


# --- MLP -----------------------------------------------------------------------------------


def init_mlp(key, sizes: Sequence[int], activation: str = "relu", dtype=jnp.float32):
    """Parameters of an MLP with layer sizes ``sizes = (n_in, h1, …, n_out)``."""
    keys = jax.random.split(key, len(sizes) - 1)
    last = len(sizes) - 2
    return {"layers": [
        dense_params(k, n_in, n_out, activation if i < last else "linear", dtype)
        for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    ]}


def mlp(params, x, *, ops: ModuleType = handgrad, activation: str = "relu"):
    """Logits of an MLP: ``dense → g → … → dense``. ``x`` is ``(m, n_in)`` or images (flattened)."""
    g = getattr(ops, activation)
    a = ops.flatten(x) if x.ndim > 2 else x
    *hidden, last = params["layers"]
    for layer in hidden:
        a = g(ops.dense(a, layer["w"], layer["b"]))
    return ops.dense(a, last["w"], last["b"])


# --- a small CNN for 8×8 digits -------------------------------------------------------------


def init_cnn(key, in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
             dtype=jnp.float32):
    """conv3×3(16) → relu → maxpool2 → conv3×3(32) → relu → maxpool2 → dense(64) → dense."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    spatial = image_size // 4
    return {
        "conv1": conv_params(k1, in_channels, 16, 3, dtype=dtype),
        "conv2": conv_params(k2, 16, 32, 3, dtype=dtype),
        "fc1": dense_params(k3, 32 * spatial * spatial, 64, dtype=dtype),
        "fc2": dense_params(k4, 64, num_classes, "linear", dtype),
    }


def cnn(params, x, *, ops: ModuleType = handgrad):
    a = ops.max_pool2d(ops.relu(ops.conv2d(x, **params["conv1"], padding=1)), 2)
    a = ops.max_pool2d(ops.relu(ops.conv2d(a, **params["conv2"], padding=1)), 2)
    a = ops.relu(ops.dense(ops.flatten(a), **params["fc1"]))
    return ops.dense(a, **params["fc2"])


# --- LeNet-5 for 28×28 ----------------------------------------------------------------------


def init_lenet5(key, in_channels: int = 1, num_classes: int = 10, dtype=jnp.float32):
    """LeNet-5 (ReLU and max pooling, as it is trained today) for 28×28 inputs:
    conv5×5(6, pad 2) → pool → conv5×5(16) → pool → dense 120 → dense 84 → dense."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    return {
        "conv1": conv_params(k1, in_channels, 6, 5, dtype=dtype),
        "conv2": conv_params(k2, 6, 16, 5, dtype=dtype),
        "fc1": dense_params(k3, 16 * 5 * 5, 120, dtype=dtype),
        "fc2": dense_params(k4, 120, 84, dtype=dtype),
        "fc3": dense_params(k5, 84, num_classes, "linear", dtype),
    }


def lenet5(params, x, *, ops: ModuleType = handgrad):
    a = ops.max_pool2d(ops.relu(ops.conv2d(x, **params["conv1"], padding=2)), 2)
    a = ops.max_pool2d(ops.relu(ops.conv2d(a, **params["conv2"])), 2)
    a = ops.relu(ops.dense(ops.flatten(a), **params["fc1"]))
    a = ops.relu(ops.dense(a, **params["fc2"]))
    return ops.dense(a, **params["fc3"])


# --- a CNN with batch norm and dropout (stateful) -------------------------------------------


def init_cnn_bn(key, in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
                dtype=jnp.float32):
    """conv3×3(16) → BN → relu → pool → conv3×3(32) → BN → relu → pool → dense(64) → relu →
    dropout → dense. The convolutions have no bias: batch norm's β takes its place."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    spatial = image_size // 4
    return {
        "conv1": {"w": conv_params(k1, in_channels, 16, 3, dtype=dtype)["w"]},
        "bn1": {"gamma": jnp.ones((16,), dtype), "beta": jnp.zeros((16,), dtype)},
        "conv2": {"w": conv_params(k2, 16, 32, 3, dtype=dtype)["w"]},
        "bn2": {"gamma": jnp.ones((32,), dtype), "beta": jnp.zeros((32,), dtype)},
        "fc1": dense_params(k3, 32 * spatial * spatial, 64, dtype=dtype),
        "fc2": dense_params(k4, 64, num_classes, "linear", dtype),
    }


def init_cnn_bn_state(params, key):
    """Running statistics (mean 0, variance 1, as PyTorch) and the dropout key."""
    stats = {name: handgrad.BatchNormStats(jnp.zeros_like(params[name]["gamma"], jnp.float32),
                                           jnp.ones_like(params[name]["gamma"], jnp.float32))
             for name in ("bn1", "bn2")}
    return {"bn": stats, "key": key}


def cnn_bn(params, x, *, ops: ModuleType = handgrad, state, training: bool,
           dropout_rate: float = 0.25):
    """Logits and the new state. Training: batch statistics, dropout on, a fresh key per
    call; evaluation: running statistics, no dropout, state unchanged."""
    key, next_key = jax.random.split(state["key"])
    new_stats = {}
    a = x
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        stats = state["bn"][bn]
        a, new_stats[bn] = ops.batch_norm(
            ops.conv2d(a, params[conv]["w"], padding=1), params[bn]["gamma"],
            params[bn]["beta"], running_mean=stats.mean, running_var=stats.var,
            training=training)
        a = ops.max_pool2d(ops.relu(a), 2)
    a = ops.relu(ops.dense(ops.flatten(a), **params["fc1"]))
    a = ops.dropout(a, dropout_rate, key, training=training)
    logits = ops.dense(a, **params["fc2"])
    if not training:
        return logits, state
    return logits, {"bn": new_stats, "key": next_key}


# --- a character-level LSTM language model --------------------------------------------------


def init_char_lstm(key, vocab_size: int, embed: int = 64, hidden: int = 256,
                   dtype=jnp.float32):
    """Embedding (V, E) → LSTM (E → H, gates i, f, g, o) → dense (V, H). The forget gate's
    bias starts at 1 (a common choice: remember by default)."""
    k_emb, k_x, k_h, k_out = jax.random.split(key, 4)
    bias = jnp.zeros((4 * hidden,), dtype).at[hidden:2 * hidden].set(1)
    return {
        "embed": {"table": (jax.random.normal(k_emb, (vocab_size, embed)) / 2).astype(dtype)},
        "lstm": {"w_x": _GLOROT(k_x, (4 * hidden, embed), dtype),
                 "w_h": _GLOROT(k_h, (4 * hidden, hidden), dtype), "b": bias},
        "out": dense_params(k_out, hidden, vocab_size, "linear", dtype),
    }


def char_lstm(params, ids, *, ops: ModuleType = handgrad):
    """Next-character logits ``(N, T, V)`` for character ids ``(N, T)``; the state starts at
    zero for every window."""
    x = ops.embedding(ids, params["embed"]["table"])
    hidden = params["lstm"]["w_h"].shape[1]
    zeros = jnp.zeros((ids.shape[0], hidden), x.dtype)
    hs, _ = ops.lstm(x, zeros, zeros, **params["lstm"])
    return ops.dense(hs, **params["out"])


# --- a small GPT: pre-LayerNorm transformer blocks with causal self-attention ---------------


def _norm_params(features, dtype):
    return {"gamma": jnp.ones((features,), dtype), "beta": jnp.zeros((features,), dtype)}


def init_transformer_block(key, width: int, heads: int, dtype=jnp.float32):
    """LayerNorm → q, k, v, o projections (width × width) → LayerNorm → dense 4·width, GELU,
    dense back. The output projections start scaled down (GPT-2's residual init)."""
    if width % heads:
        raise ValueError(f"init_transformer_block: `width` (={width}) must be divisible by "
                         f"`heads` (={heads})")
    k = jax.random.split(key, 6)
    return {
        "ln1": _norm_params(width, dtype), "ln2": _norm_params(width, dtype),
        "q": dense_params(k[0], width, width, "linear", dtype),
        "k": dense_params(k[1], width, width, "linear", dtype),
        "v": dense_params(k[2], width, width, "linear", dtype),
        "o": dense_params(k[3], width, width, "linear", dtype),
        "up": dense_params(k[4], width, 4 * width, "linear", dtype),
        "down": dense_params(k[5], 4 * width, width, "linear", dtype),
    }


def _split_heads(a, heads):  # (N, T, D) -> (N, H, T, D/H)
    n, t, d = a.shape
    return a.reshape(n, t, heads, d // heads).transpose(0, 2, 1, 3)


def _merge_heads(a):  # (N, H, T, D/H) -> (N, T, D)
    n, h, t, dh = a.shape
    return a.transpose(0, 2, 1, 3).reshape(n, t, h * dh)


def transformer_block(params, x, *, heads: int, ops: ModuleType = handgrad,
                      attention: str = "textbook"):
    """One pre-LayerNorm block on ``x (N, T, D)``: ``x + attn(LN(x))``, then ``+ mlp(LN(·))``,
    with causal multi-head self-attention (``attention``: "textbook" or "flash")."""
    attend = {"textbook": ops.attention, "flash": ops.flash_attention}[attention]
    a = ops.layer_norm(x, **params["ln1"])
    q, k, v = (_split_heads(ops.dense(a, **params[name]), heads) for name in "qkv")
    x = x + ops.dense(_merge_heads(attend(q, k, v, causal=True)), **params["o"])
    a = ops.layer_norm(x, **params["ln2"])
    return x + ops.dense(ops.gelu(ops.dense(a, **params["up"])), **params["down"])


def init_gpt(key, vocab_size: int, context: int = 64, width: int = 128, heads: int = 4,
             layers: int = 2, tied: bool = False, dtype=jnp.float32):
    """Token and learned position embeddings, ``layers`` blocks, a final LayerNorm and the
    output projection (``tied``: the token table itself, transposed)."""
    keys = jax.random.split(key, layers + 3)
    params = {
        "tokens": {"table": (0.02 * jax.random.normal(keys[0], (vocab_size, width))).astype(dtype)},
        "positions": {"table": (0.02 * jax.random.normal(keys[1], (context, width))).astype(dtype)},
        "blocks": [init_transformer_block(k, width, heads, dtype) for k in keys[3:]],
        "ln_f": _norm_params(width, dtype),
    }
    if not tied:
        params["out"] = dense_params(keys[2], width, vocab_size, "linear", dtype)
    return params


def gpt(params, ids, *, ops: ModuleType = handgrad, heads: int = 4,
        attention: str = "textbook"):
    """Next-token logits ``(N, T, V)`` for ids ``(N, T)``, T at most the position table's."""
    t = ids.shape[1]
    if t > params["positions"]["table"].shape[0]:
        raise ValueError(f"gpt: {t} tokens, but the position table has "
                         f"{params['positions']['table'].shape[0]}")
    x = ops.embedding(ids, params["tokens"]["table"])
    x = x + ops.embedding(jnp.arange(t), params["positions"]["table"])[None]
    for block in params["blocks"]:
        x = transformer_block(block, x, heads=heads, ops=ops, attention=attention)
    x = ops.layer_norm(x, **params["ln_f"])
    if "out" in params:
        return ops.dense(x, **params["out"])
    return ops.dense(x, params["tokens"]["table"])  # tied: logits = x·Eᵀ


def sample_text(apply: Callable, params, prompt, steps: int, key, *,
                temperature: float = 0.8):
    """Extend ``prompt`` (int ids, length T) by ``steps`` sampled ids, each from the logits
    at the last position of the previous T ids (one compiled forward, reused). Returns the
    ``steps`` new ids."""
    window = jnp.asarray(prompt, jnp.int32)[None]

    @jax.jit
    def next_id(window, key):
        logits = apply(params, window)[0, -1].astype(jnp.float32)
        return jax.random.categorical(key, logits / temperature)

    out = []
    for k in jax.random.split(key, steps):
        new = next_id(window, k)
        out.append(int(new))
        window = jnp.concatenate([window[:, 1:], new.reshape(1, 1).astype(jnp.int32)], axis=1)
    return out


# --- the table the scripts choose from ------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    init: Callable  # (key, image_shape (C, H, W), num_classes, dtype) -> params
    apply: Callable  # (params, x, *, ops) -> logits; stateful: (…, state, training) -> (…)
    description: str
    init_state: Callable | None = None  # (params, key) -> state, for stateful models
    task: str = "classification"  # a row of handgrad.jobs.tasks.TASKS

    @property
    def stateful(self) -> bool:
        return self.init_state is not None


def _init_mlp_for(key, image_shape, num_classes, dtype=jnp.float32):
    n_in = 1
    for s in image_shape:
        n_in *= s
    return init_mlp(key, (n_in, 128, 64, num_classes), dtype=dtype)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", _init_mlp_for, mlp, "MLP n_in-128-64-classes, ReLU"),
    "cnn": ModelSpec(
        "cnn",
        lambda key, shape, k, dtype=jnp.float32: init_cnn(key, shape[0], k, shape[1], dtype),
        cnn,
        "conv3×3(16)-pool-conv3×3(32)-pool-dense(64)-dense, ReLU, for 8×8 digits",
    ),
    "lenet": ModelSpec(
        "lenet",
        lambda key, shape, k, dtype=jnp.float32: init_lenet5(key, shape[0], k, dtype),
        lenet5,
        "LeNet-5 (ReLU, max pooling) for 28×28 images",
    ),
    "cnn-bn": ModelSpec(
        "cnn-bn",
        lambda key, shape, k, dtype=jnp.float32: init_cnn_bn(key, shape[0], k, shape[1], dtype),
        cnn_bn,
        "conv-BN-relu-pool ×2, dense(64), dropout 0.25, dense — batch norm and dropout",
        init_state=init_cnn_bn_state,
    ),
    "lstm": ModelSpec(
        "lstm",
        lambda key, shape, vocab, dtype=jnp.float32: init_char_lstm(key, vocab, dtype=dtype),
        char_lstm,
        "character LSTM: embedding(64) → LSTM(256) → dense to the vocabulary",
        task="language",
    ),
    "gpt": ModelSpec(
        "gpt",
        lambda key, shape, vocab, dtype=jnp.float32: init_gpt(key, vocab, context=shape[0],
                                                              dtype=dtype),
        gpt,
        "character GPT: token + position embeddings (128), 2 pre-LayerNorm blocks with "
        "4-head causal attention and a GELU MLP, LayerNorm, dense to the vocabulary",
        task="language",
    ),
}


def language_model_loss(apply: Callable, *, ops: ModuleType = handgrad, compute_dtype=None,
                        stateful: bool = False, training: bool = True) -> Callable:
    """``loss_fn(params, (ids, targets)) -> (mean cross-entropy per character, metrics)``.

    ``ids`` and ``targets`` are ``(N, T)`` character ids, ``targets`` the next characters;
    the loss is the mean over all N·T positions in nats; ``metrics`` holds ``bits_per_char``
    (the same loss in bits) and ``accuracy`` (of the most likely next character). With
    ``compute_dtype`` the parameters are cast (the ids stay integers)."""
    if stateful:
        raise ValueError("language_model_loss: the language models here have no state")
    del training  # no dropout or batch statistics: the same in training and evaluation

    def forward(params, batch):
        ids, targets = batch
        if compute_dtype is not None:
            params = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)
        logits = apply(params, ids, ops=ops)
        loss = ops.softmax_cross_entropy(logits, targets)
        loss = loss.astype(jnp.promote_types(loss.dtype, jnp.float32))
        return loss, {"bits_per_char": loss / jnp.log(2.0).astype(loss.dtype),
                      "accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == targets)}

    return forward


def classification_loss(apply: Callable, *, ops: ModuleType = handgrad,
                        compute_dtype=None, stateful: bool = False,
                        training: bool = True) -> Callable:
    """``loss_fn(params, (x, y)) -> (mean softmax cross-entropy, {"accuracy": …})``.

    With ``compute_dtype`` (e.g. ``jnp.bfloat16``) the parameters and inputs are cast for the
    forward and backward passes while the optimizer keeps float32 master weights: the cast's
    VJP returns float32 gradients.

    With ``stateful`` (models such as ``cnn_bn``): ``loss_fn(params, (x, y), state) ->
    (loss, ({"accuracy": …}, new_state))``, in training or evaluation mode (``training``).
    """

    def forward(params, batch, *state):
        x, y = batch
        if compute_dtype is not None:
            params = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)
            x = x.astype(compute_dtype)
        if stateful:
            logits, new_state = apply(params, x, ops=ops, state=state[0], training=training)
        else:
            logits, new_state = apply(params, x, ops=ops), None
        loss = ops.softmax_cross_entropy(logits, y)
        loss = loss.astype(jnp.promote_types(loss.dtype, jnp.float32))  # bf16 -> f32; f64 stays
        metrics = {"accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == y)}
        return loss, ((metrics, new_state) if stateful else metrics)

    return forward
