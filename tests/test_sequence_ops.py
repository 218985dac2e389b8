"""Sequence ops beyond the registry's table: embedding's scatter-add and NaN rows, the recurrent
layers' final-state cotangents, step ops against sequence ops, the gate conventions against
flax's cells, jax.checkpoint, per-sequence gradients under vmap, a 500-step sequence, hand vs
autodiff training of small recurrent models, and 16-bit inputs.

The registry (tests/test_ops.py) already checks every op's VJP against autodiff of its reference
and finite differences, grad-of-grad, vmap and jit on small random cases. Seeds come from a
digest of each test's name (printed in failures), never from Python's ``hash()``.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import handgrad as hg
from handgrad import tolerances

RTOL, ATOL = 1e-12, 1e-14  # float64, the same formulas evaluated in a different order


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "big")


def _rng(*parts):
    return np.random.default_rng(_seed(*parts))


def _normal(rng, shape, scale=1.0, dtype=jnp.float64):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _assert_close(got, want, what, rtol=RTOL, atol=ATOL):
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves), what
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        scale = float(np.max(np.abs(w), initial=0.0))
        err = float(np.max(np.abs(g - w), initial=0.0))
        assert err <= atol + rtol * scale, (
            f"{what}, leaf {i}: max |err| {err:.3e}, max |ref| {scale:.3e}")


# --- inputs of the recurrent layers ------------------------------------------------------------

GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def recurrent_args(kind, n, t, d, h, seed, dtype=jnp.float64, scale=1.0):
    """(x, state(s), w_x, w_h, bias(es)) for `kind`, weights at PyTorch's 1/√H scale × `scale`."""
    rng = _rng(kind, n, t, d, h, seed)
    k = GATES[kind]
    w = scale / np.sqrt(h)
    x = _normal(rng, (n, t, d), dtype=dtype)
    states = tuple(_normal(rng, (n, h), 0.5, dtype) for _ in range(2 if kind == "lstm" else 1))
    weights = (_normal(rng, (k * h, d), w, dtype), _normal(rng, (k * h, h), w, dtype))
    biases = tuple(_normal(rng, (k * h,), 0.3, dtype) for _ in range(2 if kind == "gru" else 1))
    return (x, *states, *weights, *biases)


def weighted_sum(out, seed):
    """Σ c ⊙ out over every output array, fixed random c: a loss whose cotangents are random."""
    leaves = jax.tree_util.tree_leaves(out)
    rng = _rng("cotangent", seed)
    return sum(jnp.sum(_normal(rng, o.shape, dtype=o.dtype) * o) for o in leaves)


def _grads(op, args, seed):
    return jax.jit(jax.value_and_grad(lambda *a: weighted_sum(op(*a), seed),
                                      argnums=tuple(range(len(args)))))(*args)


# --- embedding -------------------------------------------------------------------------------


def test_embedding_repeated_ids_add():
    rng = _rng("embedding-repeats")
    table = _normal(rng, (6, 4))
    ids = jnp.asarray([[2, 0, 2], [5, 2, 0]], jnp.int32)  # 2 three times, 0 twice, 1, 3, 4 never
    g = _normal(rng, (2, 3, 4))
    out, pullback = jax.vjp(lambda t: hg.embedding(ids, t), table)
    np.testing.assert_array_equal(out, np.asarray(table)[np.asarray(ids)])
    (dtable,) = pullback(g)
    want = np.zeros((6, 4))
    for p, v in np.ndenumerate(np.asarray(ids)):
        want[v] += np.asarray(g)[p]  # note 003: gradients of branches add (+=, not =)
    np.testing.assert_allclose(dtable, want, rtol=1e-15, atol=0)
    np.testing.assert_allclose(dtable[2], g[0, 0] + g[0, 2] + g[1, 1], rtol=1e-15)
    assert np.all(np.asarray(dtable)[[1, 3, 4]] == 0)
    _assert_close(dtable, jax.vjp(lambda t: hg.reference.embedding(ids, t), table)[1](g)[0],
                  "dtable vs autodiff")


def test_embedding_out_of_range_ids_give_nan_rows():
    rng = _rng("embedding-out-of-range")
    table = _normal(rng, (5, 3))
    ids = jnp.asarray([0, -1, 4, 5, 2, -7, 4], jnp.int32)
    bad = np.asarray([False, True, False, True, False, True, False])
    for op in (hg.embedding, hg.reference.embedding):
        out = np.asarray(jax.jit(op)(ids, table))
        assert np.isnan(out[bad]).all(), op  # no silent clamp to row 0 or V − 1
        np.testing.assert_array_equal(out[~bad], np.asarray(table)[np.asarray(ids)[~bad]])
    g = _normal(rng, (7, 3))
    (dtable,) = jax.vjp(lambda t: hg.embedding(ids, t), table)[1](g)
    want = np.zeros((5, 3))
    for p in np.flatnonzero(~bad):
        want[int(ids[p])] += np.asarray(g)[p]  # the NaN rows are constants: nothing flows back
    np.testing.assert_allclose(dtable, want, rtol=1e-15, atol=0)
    # ...and a loss over such rows is NaN, as it should be: a bad id is not hidden.
    assert np.isnan(float(jnp.sum(hg.embedding(ids, table))))


def test_embedding_ids_get_no_cotangent_and_any_integer_dtype():
    table = _normal(_rng("embedding-dtypes"), (7, 2))
    for dtype in (jnp.int8, jnp.uint8, jnp.int16, jnp.int32, jnp.int64):
        ids = jnp.asarray([[3, 6], [0, 3]], dtype)
        out, pullback = jax.vjp(hg.embedding, ids, table)
        d_ids, dtable = pullback(jnp.ones_like(out))
        assert d_ids.dtype == jax.dtypes.float0 and d_ids.shape == ids.shape
        np.testing.assert_array_equal(dtable[3], [2.0, 2.0])


# --- recurrent layers ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["h_T", "c_T", "both"])
def test_lstm_final_state_cotangents(which):
    """Cotangents of the returned h_T and c_T enter the reverse scan as its initial carry."""
    args = recurrent_args("lstm", 3, 6, 4, 5, which)

    def loss(op):
        def f(*a):
            hs, (h_last, c_last) = op(*a)
            picked = {"h_T": (h_last,), "c_T": (c_last,), "both": (h_last, c_last)}[which]
            return weighted_sum(picked, which) + 0.0 * jnp.sum(hs)
        return f

    argnums = tuple(range(len(args)))
    hand = jax.jit(jax.grad(loss(hg.lstm), argnums))(*args)
    auto = jax.jit(jax.grad(loss(hg.reference.lstm), argnums))(*args)
    _assert_close(hand, auto, f"lstm grads from {which} alone [seed {_seed('lstm', which)}]")
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in hand)  # every input gets a gradient
    hs, (h_last, _) = hg.lstm(*args)
    np.testing.assert_array_equal(h_last, hs[:, -1])


STEPS = {"rnn": hg.rnn_step, "lstm": hg.lstm_step, "gru": hg.gru_step}


def _unrolled(kind):
    """The sequence op as a Python loop over the step op (the CS231n way)."""

    def run(x, *rest):
        step = STEPS[kind]
        if kind == "lstm":
            h, c, *weights = rest
            hs = []
            for t in range(x.shape[1]):
                h, c = step(x[:, t], h, c, *weights)
                hs.append(h)
            return jnp.stack(hs, axis=1), (h, c)
        h, *weights = rest
        hs = []
        for t in range(x.shape[1]):
            h = step(x[:, t], h, *weights)
            hs.append(h)
        return jnp.stack(hs, axis=1)

    return run


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_step_ops_unrolled_equal_sequence_ops(kind):
    args = recurrent_args(kind, 2, 5, 3, 4, "steps")
    seq_value, seq_grads = _grads(getattr(hg, kind), args, kind)
    step_value, step_grads = _grads(_unrolled(kind), args, kind)
    _assert_close(step_value, seq_value, f"{kind}: loss, steps vs sequence")
    _assert_close(step_grads, seq_grads, f"{kind}: grads, steps vs sequence")


def _flax_params(kind, w_x, w_h, b_x, b_h=None):
    """handgrad's stacked (out, in) weights as flax's per-gate Dense kernels (in, out)."""
    names = {"lstm": "ifgo", "gru": "rzn"}[kind]
    h = w_h.shape[1]
    params = {}
    for j, gate in enumerate(names):
        rows = slice(j * h, (j + 1) * h)
        params[f"i{gate}"] = {"kernel": w_x[rows].T}
        params[f"h{gate}"] = {"kernel": w_h[rows].T}
        if kind == "lstm":  # flax puts the (summed) bias on the hidden side
            params[f"h{gate}"]["bias"] = b_x[rows]
        else:  # the GRU's input side has r, z, n biases; the hidden side only n's
            params[f"i{gate}"]["bias"] = b_x[rows]
            if gate == "n":
                params["hn"]["bias"] = b_h[rows]
    return {"params": params}


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gate_order_and_formulation_match_flax_cells(kind):
    """flax.linen's LSTMCell and GRUCell document PyTorch's equations (gates i, f, g, o and
    r, z, n with b_hn inside r ⊙ (…)): an independent implementation of the conventions."""
    import flax.linen as nn  # a declared test dependency (handgrad[interop])

    args = recurrent_args(kind, 3, 4, 5, 2, "flax")
    if kind == "lstm":
        x, h0, c0, w_x, w_h, b = args
        hs, (_, c_last) = hg.lstm(*args)
        cell, carry, params = nn.LSTMCell(2, param_dtype=jnp.float64), (c0, h0), _flax_params(
            kind, w_x, w_h, b)
    else:
        x, h0, w_x, w_h, b_x, b_h = args
        b_h = b_h.at[:4].set(0.0)  # flax's GRU has no hidden-side bias for r and z
        hs = hg.gru(x, h0, w_x, w_h, b_x, b_h)
        cell, carry, params = nn.GRUCell(2, param_dtype=jnp.float64), h0, _flax_params(
            kind, w_x, w_h, b_x, b_h)
    for t in range(x.shape[1]):
        carry, out = cell.apply(params, carry, x[:, t])
        np.testing.assert_allclose(hs[:, t], out, rtol=1e-13, atol=1e-15)
    if kind == "lstm":
        np.testing.assert_allclose(c_last, carry[0], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("policy", [None, pytest.param("nothing_saveable", marks=pytest.mark.slow),
                                    pytest.param("everything_saveable", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_checkpoint_gives_the_same_gradients(kind, policy):
    args = recurrent_args(kind, 2, 7, 3, 4, "remat")
    op = getattr(hg, kind)
    wrapped = jax.checkpoint(op, policy=getattr(jax.checkpoint_policies, policy or "", None))
    _assert_close(_grads(wrapped, args, kind), _grads(op, args, kind), f"{kind} [{policy}]")
    _assert_close(_grads(wrapped, args, kind), _grads(getattr(hg.reference, kind), args, kind),
                  f"{kind} [{policy}] vs autodiff")


@pytest.mark.parametrize("kind", [pytest.param("rnn", marks=pytest.mark.slow), "lstm",
                                  pytest.param("gru", marks=pytest.mark.slow)])
def test_vmap_gives_per_sequence_gradients(kind):
    """Each sequence of a batch of 5 as its own batch of one, under vmap: the weight gradients
    of every sequence, equal to autodiff's, to a Python loop, and summing to the batch's."""
    args = recurrent_args(kind, 5, 6, 3, 4, "vmap")
    n_states = 2 if kind == "lstm" else 1
    per_seq_args = tuple(a[:, None] for a in args[:1 + n_states])  # (5, 1, ...) each
    weights = args[1 + n_states:]

    def per_sequence(op):
        def loss(weights, *seq):
            return weighted_sum(op(*seq, *weights), kind)
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, *(0,) * len(per_seq_args))))

    hand = per_sequence(getattr(hg, kind))(weights, *per_seq_args)
    auto = per_sequence(getattr(hg.reference, kind))(weights, *per_seq_args)
    _assert_close(hand, auto, f"{kind}: per-sequence grads vs autodiff")
    assert hand[0].shape == (5, *weights[0].shape)
    one = jax.grad(lambda w: weighted_sum(getattr(hg, kind)(*(a[3] for a in per_seq_args), *w),
                                          kind))(weights)
    _assert_close(tuple(g[3] for g in hand), one, f"{kind}: sequence 3 vs alone")
    assert not np.allclose(hand[1][0], hand[1][1])  # they differ from sequence to sequence


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_long_sequence_of_500_steps(kind):
    """T = 500: gradients finite, not vanished to zero at the first step, and equal to
    autodiff's (float64, rel 1e-10: 500 steps of rounding)."""
    args = recurrent_args(kind, 2, 500, 3, 4, "long", scale=1.5)
    (value, hand) = _grads(getattr(hg, kind), args, kind)
    (ref_value, auto) = _grads(getattr(hg.reference, kind), args, kind)
    assert all(np.isfinite(np.asarray(g)).all() for g in hand)
    _assert_close(value, ref_value, f"{kind} T=500 loss", rtol=1e-10)
    _assert_close(hand, auto, f"{kind} T=500 grads [seed {_seed(kind, 'long')}]", rtol=1e-10)
    dx = np.asarray(hand[0])
    assert np.abs(dx[:, -1]).max() > 1e-3 and np.isfinite(dx[:, 0]).all()


# --- training: hand vs autodiff ----------------------------------------------------------------

VOCAB, EMBED, HIDDEN, BATCH, LENGTH = 11, 5, 6, 4, 9


def _init_model(kind, seed):
    rng = _rng("model", kind, seed)
    k = GATES[kind]
    w = 1 / np.sqrt(HIDDEN)
    params = {"table": _normal(rng, (VOCAB, EMBED), 0.5),
              "w_x": _normal(rng, (k * HIDDEN, EMBED), w),
              "w_h": _normal(rng, (k * HIDDEN, HIDDEN), w),
              "b": _normal(rng, (k * HIDDEN,), 0.1),
              "w_out": _normal(rng, (VOCAB, HIDDEN), w), "b_out": jnp.zeros((VOCAB,))}
    if kind == "gru":
        params["b_h"] = _normal(rng, (k * HIDDEN,), 0.1)
    return params


def _language_model_loss(kind, ops):
    """Next-token cross-entropy of embedding → recurrent layer → dense, all from `ops`."""

    def loss(params, tokens):
        x = ops.embedding(tokens[:, :-1], params["table"])
        h0 = jnp.zeros((tokens.shape[0], HIDDEN))
        if kind == "lstm":
            hs, _ = ops.lstm(x, h0, h0, params["w_x"], params["w_h"], params["b"])
        elif kind == "gru":
            hs = ops.gru(x, h0, params["w_x"], params["w_h"], params["b"], params["b_h"])
        else:
            hs = ops.rnn(x, h0, params["w_x"], params["w_h"], params["b"])
        logits = ops.dense(hs, params["w_out"], params["b_out"])
        return ops.softmax_cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    return loss


@pytest.mark.parametrize("kind", [pytest.param("rnn", marks=pytest.mark.slow), "lstm",
                                  pytest.param("gru", marks=pytest.mark.slow)])
def test_training_hand_equals_autodiff_over_60_steps(kind):
    """60 Adam steps on next-token prediction of a fixed random token stream with a repeating
    pattern: the parameters trained with hand VJPs equal those trained with autodiff (float64,
    rel 1e-10), and the loss falls."""
    rng = _rng("tokens", kind)
    pattern = rng.integers(0, VOCAB, 7)
    starts = rng.integers(0, 7, BATCH)
    tokens = jnp.asarray(np.stack([np.roll(np.tile(pattern, 3), -s)[:LENGTH + 1]
                                   for s in starts]), jnp.int32)
    optimizer = optax.adam(3e-2)

    def train(ops):
        loss_fn = _language_model_loss(kind, ops)

        @jax.jit
        def step(params, state):
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        params = _init_model(kind, 0)
        state = optimizer.init(params)
        losses = []
        for _ in range(60):
            params, state, loss = step(params, state)
            losses.append(float(loss))
        return params, np.asarray(losses)

    hand_params, hand_losses = train(hg)
    auto_params, auto_losses = train(hg.reference)
    np.testing.assert_allclose(hand_losses, auto_losses, rtol=1e-10)
    _assert_close(hand_params, auto_params, f"{kind}: parameters after 60 steps", rtol=1e-10)
    assert hand_losses[-1] < 0.5 * hand_losses[0], hand_losses[[0, -1]]


# --- 16-bit inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_16_bit_sequences_stay_within_the_float32_tolerance(kind, dtype):
    """T = 64, H = 32 in 16 bits against float32 on the same (rounded) inputs: the states,
    gates and sums over time run in float32, so only the final rounding differs —
    within tolerances.LOW_PRECISION_VS_FLOAT32. Outputs and cotangents keep the 16-bit dtype."""
    low = jnp.dtype(dtype)
    args_low = tuple(a.astype(low) for a in recurrent_args(kind, 4, 64, 16, 32, "16bit",
                                                           jnp.float32))
    args_32 = tuple(a.astype(jnp.float32) for a in args_low)
    op = getattr(hg, kind)

    def value_and_vjp(args):
        out, pullback = jax.vjp(op, *args)
        ct = jax.tree_util.tree_map(
            lambda o: _normal(_rng("ct", kind), o.shape, dtype=jnp.float32).astype(o.dtype), out)
        return out, pullback(ct)

    (out_low, grads_low), (out_32, grads_32) = jax.jit(value_and_vjp)(args_low), jax.jit(
        value_and_vjp)(args_32)
    tol = tolerances.LOW_PRECISION_VS_FLOAT32[dtype]
    pairs = [*zip(jax.tree_util.tree_leaves(out_low), jax.tree_util.tree_leaves(out_32)),
             *zip(grads_low, grads_32)]
    for i, (got, want) in enumerate(pairs):
        assert got.dtype == low, (i, got.dtype)
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.isfinite(got).all(), i
        err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
        assert tol.allows(err, scale), f"{kind} {dtype} leaf {i}: err {err:.2e}, scale {scale:.2e}"


# --- GELU, SiLU, RMSNorm, group norm against independent implementations --------------------


def test_gelu_and_silu_equal_jax_nn():
    x = _normal(_rng("gelu"), (7, 9), 3.0)
    # atol: the tanh form's 1 + tanh(u) cancels in the left tail in either implementation
    np.testing.assert_allclose(hg.gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-14)
    np.testing.assert_allclose(hg.gelu(x, approximate=True), jax.nn.gelu(x, approximate=True),
                               rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(hg.silu(x), jax.nn.silu(x), rtol=1e-14, atol=1e-15)
    for approximate in (False, True):  # the derivatives, too, against jax.nn's autodiff
        hand = jax.grad(lambda x, a=approximate: jnp.sum(jnp.sin(hg.gelu(x, a))))(x)
        auto = jax.grad(lambda x, a=approximate: jnp.sum(jnp.sin(jax.nn.gelu(x, a))))(x)
        np.testing.assert_allclose(hand, auto, rtol=1e-12, atol=1e-14)
    assert float(jnp.max(jnp.abs(hg.gelu(x) - hg.gelu(x, approximate=True)))) < 1e-3


def test_group_norm_special_cases_and_rms_norm_scale_invariance():
    rng = _rng("norms")
    x = _normal(rng, (2, 6, 3, 4), 2.0)
    gamma, beta = 1 + _normal(rng, (6,), 0.3), _normal(rng, (6,))
    # one group: layer norm over (C, H, W) with per-channel γ, β
    flat = hg.layer_norm(x.reshape(2, -1), jnp.ones(72), jnp.zeros(72), eps=1e-5).reshape(x.shape)
    want = gamma.reshape(1, 6, 1, 1) * flat + beta.reshape(1, 6, 1, 1)
    np.testing.assert_allclose(hg.group_norm(x, 1, gamma, beta), want, rtol=1e-12, atol=1e-13)
    # a group per channel: instance norm, each (n, c) normalized over its positions
    y = np.asarray(hg.group_norm(x, 6, jnp.ones(6), jnp.zeros(6)))
    np.testing.assert_allclose(y.mean(axis=(2, 3)), 0, atol=1e-14)
    np.testing.assert_allclose(y.var(axis=(2, 3)), 1, rtol=1e-4)
    # RMSNorm without ε ignores the scale of each row, so ⟨dx, x⟩ = 0 row by row
    z = _normal(rng, (3, 5))
    g = jax.grad(lambda z: jnp.sum(jnp.sin(hg.rms_norm(z, gamma[:5], eps=0.0))))(z)
    np.testing.assert_allclose(np.sum(np.asarray(g) * np.asarray(z), axis=1), 0, atol=1e-14)
    np.testing.assert_allclose(hg.rms_norm(3.7 * z, gamma[:5], eps=0.0),
                               hg.rms_norm(z, gamma[:5], eps=0.0), rtol=1e-14)
