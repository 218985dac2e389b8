r"""Recurrent layers — RNN, LSTM, GRU — with backpropagation through time written out.

Batch-first like every op: ``x`` is ``(N, T, D)``, hidden states ``(N, H)``; weights are
``(out, in)`` with the gates stacked along ``out`` (PyTorch's order: LSTM ``i, f, g, o``,
GRU ``r, z, n``). For each layer

* the forward computes the input projection :math:`x_t W_x^\top` of **all** timesteps as one
  GEMM, then runs the recurrence as one ``lax.scan`` that keeps what the backward needs;
* the backward is a reverse ``lax.scan`` carrying :math:`dh` (and :math:`dc`) through the gate
  derivatives; it emits the pre-activation gradient :math:`dz_t` of every step, and the sums
  over time — :math:`dW_x = \sum_t dz_t^\top x_t`, :math:`dW_h = \sum_t dz_t^\top h_{t-1}`,
  :math:`db`, :math:`dx` — are each one GEMM (or sum) over the stacked :math:`dz` after the loop.
  Only :math:`dh_{t-1} = dz_t W_h` stays inside: it is what the recurrence needs.

The step ops (``rnn_step``, ``lstm_step``, ``gru_step``: one timestep, CS231n's
``*_step_forward/backward``) share each cell's forward and backward with the sequence ops.
16-bit inputs run in float32 (states, gates and sums) and are rounded once at the end.
Derivation: docs/derivations.md §10.2–§10.5.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from handgrad import _checks
from handgrad.ops._activations import accumulation_dtype

# --- shared pieces -------------------------------------------------------------------------


def _row(v):
    """A bias (k,) as (1, k): the explicit broadcast over the batch rows."""
    return v.reshape(1, -1)


def _time_major(a):
    return jnp.swapaxes(a, 0, 1)  # (N, T, ...) <-> (T, N, ...)


def _input_projection(x, w_x):
    """``x_t·W_xᵀ`` for every timestep at once: one GEMM over the N·T rows, time-major
    ``(T, N, kH)``. (x is put time-major first: a GEMM writing a permuted output is slower
    on CPU; the bias joins inside the step, where its add fuses with the step's elementwise
    work — docs/derivations.md §10.2.)"""
    return _time_major(x) @ w_x.T


def _previous(first, seq):
    """``(s_0, s_1, …, s_{T-1})`` from ``first = s_0`` and ``seq = (s_1, …, s_T)`` (time-major):
    the state each step started from."""
    return jnp.concatenate([first[None], seq[:-1]], axis=0)


def _sums_over_time(dz, inputs):
    """``Σ_t dz_tᵀ·in_t`` over all steps and rows, as one GEMM: dz ``(T, N, kH)``, inputs
    ``(T, N, I)`` -> ``(kH, I)``. The textbook sum of per-step outer products."""
    return jnp.einsum("tng,tni->gi", dz, inputs)


def _input_gradients(dz, x, w_x):
    """dx, dW_x, db from the stacked pre-activation gradients dz ``(T, N, kH)`` — the input
    side of every step at once (dense layer's rules, §1, with the rows being (t, n))."""
    dx = _time_major(dz @ w_x)  # dx_t = dz_t·W_x, back to batch-first
    dw_x = _sums_over_time(dz, _time_major(x))  # Σ_t dz_tᵀ·x_t
    db = jnp.sum(dz, axis=(0, 1))  # Σ_t Σ_rows dz_t
    return dx, dw_x, db


def _out_dtype(*arrays):
    return jnp.result_type(*arrays)


def _acc_dtype(*arrays):
    """float32 for 16-bit inputs: states, gates and every sum over time."""
    return accumulation_dtype(jnp.result_type(*arrays))


def _split(a, k):
    return jnp.split(a, k, axis=-1)


def _check_args(op, x, x_layout, states, w_x, w_h, biases, gates):
    """Dtypes and shapes of a recurrent op's arguments, every one named in the message.

    ``states``/``biases``: ``(name, array)`` pairs; ``gates``: how many blocks of H rows the
    weights stack (1 RNN, 4 LSTM, 3 GRU)."""
    named = (("x", x), *states, ("w_x", w_x), ("w_h", w_h), *biases)
    for name, a in named:
        _checks.check_floating(op, name, a)
    rank = len(x_layout.split(","))
    _checks.check_rank(op, "x", x, rank, x_layout)
    state_name, state = states[0]
    _checks.check_rank(op, state_name, state, 2, "(N, H)")
    if rank == 3 and x.shape[1] < 1:
        raise ValueError(f"{op}: `x` must have at least one timestep, got shape {x.shape}.")
    n, d, h = x.shape[0], x.shape[-1], state.shape[1]
    k = f"{gates}H" if gates > 1 else "H"
    expected = {name: ("(N, H)", (n, h)) for name, _ in states}
    expected |= {"w_x": (f"({k}, D)", (gates * h, d)), "w_h": (f"({k}, H)", (gates * h, h))}
    expected |= {name: (f"({k},)", (gates * h,)) for name, _ in biases}
    for name, a in named[1:]:
        layout, shape = expected[name]
        if tuple(a.shape) != shape:
            raise ValueError(
                f"{op}: `{name}` must have shape {layout} = {shape} for x {tuple(x.shape)} and "
                f"{state_name} {tuple(state.shape)} (N={n}, D={d}, H={h}), got {tuple(a.shape)}."
            )


# --- RNN -----------------------------------------------------------------------------------


def _rnn_cell(zx, h_prev, w_h_t, b):
    """h = tanh(zx + h_prev·W_hᵀ + b), with zx = x·W_xᵀ already computed and w_h_t = W_hᵀ."""
    return jnp.tanh(zx + h_prev @ w_h_t + _row(b))


def _rnn_cell_bwd(dh, h, w_h):
    """(dz, dh_prev) of one step from dh = ∂/∂h: tanh' = 1 − h², then through W_h."""
    dz = dh * (1 - h * h)
    return dz, dz @ w_h


class _RnnResiduals(NamedTuple):
    x: jax.Array  # (N, T, D), for dW_x
    h0: jax.Array  # (N, H), the state before step 1
    w_x: jax.Array  # for dx
    w_h: jax.Array  # for dh_prev
    b: jax.Array  # its dtype, for db
    hs: jax.Array  # (T, N, H) accumulation dtype: tanh' from the output, h_{t-1} for dW_h


def _rnn_forward(x, h0, w_x, w_h, b):
    acc = _acc_dtype(x, h0, w_x, w_h, b)
    x, h0, w_x, w_h, b = (a.astype(acc) for a in (x, h0, w_x, w_h, b))
    zx = _input_projection(x, w_x)  # (T, N, H): every step's x_t·W_xᵀ, one GEMM
    w_h_t = w_h.T  # transposed once, not at every step

    def step(h_prev, zx_t):
        h = _rnn_cell(zx_t, h_prev, w_h_t, b)
        return h, h

    _, hs = lax.scan(step, h0, zx)
    return hs


@jax.custom_vjp
def _rnn(x, h0, w_x, w_h, b):
    return _time_major(_rnn_forward(x, h0, w_x, w_h, b)).astype(_out_dtype(x, h0, w_x, w_h, b))


def _rnn_fwd(x, h0, w_x, w_h, b):
    hs = _rnn_forward(x, h0, w_x, w_h, b)
    out = _time_major(hs).astype(_out_dtype(x, h0, w_x, w_h, b))
    return out, _RnnResiduals(x, h0, w_x, w_h, b, hs)


def _rnn_bwd(res, g):
    hs = res.hs
    w_h = res.w_h.astype(hs.dtype)

    def step(dh_next, inputs):  # backward through step t: dh = g_t + (from step t+1)
        g_t, h_t = inputs
        dz, dh_prev = _rnn_cell_bwd(g_t + dh_next, h_t, w_h)
        return dh_prev, dz

    g_hs = _time_major(g).astype(hs.dtype)
    dh0, dz = lax.scan(step, jnp.zeros_like(hs[0]), (g_hs, hs), reverse=True)
    dx, dw_x, db = _input_gradients(dz, res.x.astype(hs.dtype), res.w_x.astype(hs.dtype))
    dw_h = _sums_over_time(dz, _previous(res.h0.astype(hs.dtype), hs))  # Σ_t dz_tᵀ·h_{t-1}
    return (dx.astype(res.x.dtype), dh0.astype(res.h0.dtype), dw_x.astype(res.w_x.dtype),
            dw_h.astype(res.w_h.dtype), db.astype(res.b.dtype))


_rnn.defvjp(_rnn_fwd, _rnn_bwd)


def rnn(x, h0, w_x, w_h, b):
    r"""Vanilla (Elman) RNN: :math:`h_t = \tanh(x_t W_x^\top + h_{t-1} W_h^\top + b)` for every t.

    Backward (BPTT), from :math:`dh_T = 0` back to :math:`t = 1`, with :math:`g_t` the
    cotangent of :math:`h_t`:

    .. math::
        dz_t = (g_t + dh_t) ⊙ (1 - h_t^2),\qquad dh_{t-1} = dz_t W_h,

        dW_x = \sum_t dz_t^\top x_t,\quad dW_h = \sum_t dz_t^\top h_{t-1},\quad
        db = \sum_t \textstyle\sum_{rows} dz_t,\quad dx_t = dz_t W_x

    (every sum over :math:`t` one GEMM after the loop; :math:`dh_0` is ``h0``'s cotangent).

    Args:
      x: ``(N, T, D)``, T ≥ 1.
      h0: ``(N, H)``, the initial hidden state.
      w_x: ``(H, D)``.
      w_h: ``(H, H)``.
      b: ``(H,)``.

    Returns:
      ``hs``, ``(N, T, H)``: the hidden state after every step (``hs[:, -1]`` is the last).

    Derivation: docs/derivations.md §10.3.
    """
    op = "rnn"
    x, h0, w_x, w_h, b = (jnp.asarray(a) for a in (x, h0, w_x, w_h, b))
    _check_args(op, x, "(N, T, D)", (("h0", h0),), w_x, w_h, (("b", b),), 1)
    return _rnn(x, h0, w_x, w_h, b)


def _rnn_step_h(x, h_prev, w_x, w_h, b):
    """h = tanh(x·W_xᵀ + h_prev·W_hᵀ + b), in the accumulation dtype."""
    acc = _acc_dtype(x, h_prev, w_x, w_h, b)
    zx = x.astype(acc) @ w_x.astype(acc).T
    return _rnn_cell(zx, h_prev.astype(acc), w_h.astype(acc).T, b.astype(acc))


@jax.custom_vjp
def _rnn_step(x, h_prev, w_x, w_h, b):
    return _rnn_step_fwd(x, h_prev, w_x, w_h, b)[0]


def _rnn_step_fwd(x, h_prev, w_x, w_h, b):
    h = _rnn_step_h(x, h_prev, w_x, w_h, b)
    # residuals: the inputs and h in the accumulation dtype — tanh' = 1 − h² from a 16-bit h
    # near ±1 would lose its digits to cancellation
    return h.astype(_out_dtype(x, h_prev, w_x, w_h, b)), (x, h_prev, w_x, w_h, b, h)


def _rnn_step_bwd(res, g):
    x, h_prev, w_x, w_h, b, h = res
    acc = _acc_dtype(x, h_prev, w_x, w_h, b)
    dz, dh_prev = _rnn_cell_bwd(g.astype(acc), h.astype(acc), w_h.astype(acc))
    dx = dz @ w_x.astype(acc)
    dw_x, dw_h = dz.T @ x.astype(acc), dz.T @ h_prev.astype(acc)
    db = jnp.sum(dz, axis=0)
    return (dx.astype(x.dtype), dh_prev.astype(h_prev.dtype), dw_x.astype(w_x.dtype),
            dw_h.astype(w_h.dtype), db.astype(b.dtype))


_rnn_step.defvjp(_rnn_step_fwd, _rnn_step_bwd)


def rnn_step(x, h_prev, w_x, w_h, b):
    r"""One RNN step: :math:`h = \tanh(x W_x^\top + h_{prev} W_h^\top + b)`.

    Backward: :math:`dz = g ⊙ (1 - h^2)`, :math:`dx = dz W_x`, :math:`dh_{prev} = dz W_h`,
    :math:`dW_x = dz^\top x`, :math:`dW_h = dz^\top h_{prev}`, :math:`db = \sum_{rows} dz`.

    Args:
      x: ``(N, D)``.
      h_prev: ``(N, H)``.
      w_x: ``(H, D)``.
      w_h: ``(H, H)``.
      b: ``(H,)``.

    Returns:
      ``h``, ``(N, H)``.

    Derivation: docs/derivations.md §10.3.
    """
    op = "rnn_step"
    x, h_prev, w_x, w_h, b = (jnp.asarray(a) for a in (x, h_prev, w_x, w_h, b))
    _check_args(op, x, "(N, D)", (("h_prev", h_prev),), w_x, w_h, (("b", b),), 1)
    return _rnn_step(x, h_prev, w_x, w_h, b)


# --- LSTM ----------------------------------------------------------------------------------


def _lstm_cell(zx, h_prev, c_prev, w_h_t, b):
    """One LSTM step from zx = x·W_xᵀ and w_h_t = W_hᵀ: (h, c, gates), gates =
    [σ(i), σ(f), tanh(g), σ(o)] stacked along the last axis like the weights' rows."""
    zi, zf, zg, zo = _split(zx + h_prev @ w_h_t + _row(b), 4)
    i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
    c = f * c_prev + i * g
    h = o * jnp.tanh(c)
    return h, c, jnp.concatenate([i, f, g, o], axis=-1)


def _lstm_cell_bwd(dh, dc_next, gates, c_prev, c, w_h):
    """(dz, dh_prev, dc_prev) of one step: dh = ∂/∂h_t, dc_next = ∂/∂c_t from step t+1."""
    i, f, g, o = _split(gates, 4)
    tanh_c = jnp.tanh(c)
    dc = dc_next + dh * o * (1 - tanh_c * tanh_c)  # c_t reaches the loss directly and via h_t
    di, df, dg, do = dc * g, dc * c_prev, dc * i, dh * tanh_c
    dz = jnp.concatenate(  # through σ' = σ(1 − σ) and tanh' = 1 − tanh²
        [di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], axis=-1)
    return dz, dz @ w_h, dc * f


class _LstmResiduals(NamedTuple):
    x: jax.Array  # (N, T, D), for dW_x
    h0: jax.Array  # (N, H), the states before step 1
    c0: jax.Array
    w_x: jax.Array  # for dx
    w_h: jax.Array  # for dh_prev
    b: jax.Array  # its dtype, for db
    hs: jax.Array  # (T, N, H) accumulation dtype: h_{t-1} for dW_h
    cs: jax.Array  # (T, N, H): c_t for tanh(c_t), c_{t-1} for df
    gates: jax.Array  # (T, N, 4H): σ(i), σ(f), tanh(g), σ(o)


def _lstm_forward(x, h0, c0, w_x, w_h, b):
    acc = _acc_dtype(x, h0, c0, w_x, w_h, b)
    x, h0, c0, w_x, w_h, b = (a.astype(acc) for a in (x, h0, c0, w_x, w_h, b))
    zx = _input_projection(x, w_x)  # (T, N, 4H): every step's x_t·W_xᵀ, one GEMM
    w_h_t = w_h.T  # transposed once, not at every step

    def step(carry, zx_t):
        h, c, gates = _lstm_cell(zx_t, *carry, w_h_t, b)
        return (h, c), (h, c, gates)

    _, (hs, cs, gates) = lax.scan(step, (h0, c0), zx)
    return hs, cs, gates


def _lstm_outputs(hs, cs, dtype):
    return _time_major(hs).astype(dtype), (hs[-1].astype(dtype), cs[-1].astype(dtype))


@jax.custom_vjp
def _lstm(x, h0, c0, w_x, w_h, b):
    hs, cs, _ = _lstm_forward(x, h0, c0, w_x, w_h, b)
    return _lstm_outputs(hs, cs, _out_dtype(x, h0, c0, w_x, w_h, b))


def _lstm_fwd(x, h0, c0, w_x, w_h, b):
    hs, cs, gates = _lstm_forward(x, h0, c0, w_x, w_h, b)
    out = _lstm_outputs(hs, cs, _out_dtype(x, h0, c0, w_x, w_h, b))
    return out, _LstmResiduals(x, h0, c0, w_x, w_h, b, hs, cs, gates)


def _lstm_bwd(res, cotangents):
    g, (g_h_last, g_c_last) = cotangents  # of hs, and of the returned (h_T, c_T)
    acc = res.hs.dtype
    w_h = res.w_h.astype(acc)

    def step(carry, inputs):  # backward through step t
        dh_next, dc_next = carry
        g_t, gates_t, c_prev_t, c_t = inputs
        dz, dh_prev, dc_prev = _lstm_cell_bwd(g_t + dh_next, dc_next, gates_t, c_prev_t, c_t, w_h)
        return (dh_prev, dc_prev), dz

    # The cotangents of h_T and c_T enter as the carry of the last step.
    carry = (g_h_last.astype(acc), g_c_last.astype(acc))
    inputs = (_time_major(g).astype(acc), res.gates, _previous(res.c0.astype(acc), res.cs), res.cs)
    (dh0, dc0), dz = lax.scan(step, carry, inputs, reverse=True)
    dx, dw_x, db = _input_gradients(dz, res.x.astype(acc), res.w_x.astype(acc))
    dw_h = _sums_over_time(dz, _previous(res.h0.astype(acc), res.hs))  # Σ_t dz_tᵀ·h_{t-1}
    return (dx.astype(res.x.dtype), dh0.astype(res.h0.dtype), dc0.astype(res.c0.dtype),
            dw_x.astype(res.w_x.dtype), dw_h.astype(res.w_h.dtype), db.astype(res.b.dtype))


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


def lstm(x, h0, c0, w_x, w_h, b):
    r"""LSTM over a sequence, gates in PyTorch's order **i, f, g, o**.

    .. math::
        [z_i, z_f, z_g, z_o] = x_t W_x^\top + h_{t-1} W_h^\top + b,\quad
        c_t = σ(z_f) ⊙ c_{t-1} + σ(z_i) ⊙ \tanh(z_g),\quad h_t = σ(z_o) ⊙ \tanh(c_t)

    Backward (BPTT), from :math:`dh_T = \bar h_T`, :math:`dc_T = \bar c_T` (the cotangents of
    the returned final states) back to :math:`t = 1`, with :math:`dh = g_t + dh_t`:

    .. math::
        dc = dc_t + dh ⊙ o ⊙ (1 - \tanh^2 c_t),\quad
        dz = [dc⊙g⊙i(1-i),\ dc⊙c_{t-1}⊙f(1-f),\ dc⊙i⊙(1-g^2),\ dh⊙\tanh c_t⊙o(1-o)],

        dh_{t-1} = dz W_h,\quad dc_{t-1} = dc ⊙ f,\quad
        dW_x = \sum_t dz_t^\top x_t,\quad dW_h = \sum_t dz_t^\top h_{t-1},\quad
        db = \sum_t \textstyle\sum_{rows} dz_t,\quad dx_t = dz_t W_x

    Args:
      x: ``(N, T, D)``, T ≥ 1.
      h0, c0: ``(N, H)``, the initial hidden and cell states.
      w_x: ``(4H, D)``, rows ``[W_xi; W_xf; W_xg; W_xo]``.
      w_h: ``(4H, H)``, same row blocks.
      b: ``(4H,)`` (PyTorch's ``b_ih + b_hh``).

    Returns:
      ``(hs, (h_T, c_T))``: ``hs`` ``(N, T, H)`` and the final states ``(N, H)``; all three
      are differentiable.

    Derivation: docs/derivations.md §10.4.
    """
    op = "lstm"
    x, h0, c0, w_x, w_h, b = (jnp.asarray(a) for a in (x, h0, c0, w_x, w_h, b))
    _check_args(op, x, "(N, T, D)", (("h0", h0), ("c0", c0)), w_x, w_h, (("b", b),), 4)
    return _lstm(x, h0, c0, w_x, w_h, b)


def _lstm_step_cell(x, h_prev, c_prev, w_x, w_h, b):
    """(h, c, gates) of one step, in the accumulation dtype."""
    acc = _acc_dtype(x, h_prev, c_prev, w_x, w_h, b)
    zx = x.astype(acc) @ w_x.astype(acc).T
    return _lstm_cell(zx, h_prev.astype(acc), c_prev.astype(acc), w_h.astype(acc).T,
                      b.astype(acc))


@jax.custom_vjp
def _lstm_step(x, h_prev, c_prev, w_x, w_h, b):
    h, c, _ = _lstm_step_cell(x, h_prev, c_prev, w_x, w_h, b)
    dtype = _out_dtype(x, h_prev, c_prev, w_x, w_h, b)
    return h.astype(dtype), c.astype(dtype)


def _lstm_step_fwd(x, h_prev, c_prev, w_x, w_h, b):
    _, c, gates = _lstm_step_cell(x, h_prev, c_prev, w_x, w_h, b)
    # Residuals: the inputs, the new cell state c and the gates [σ(i), σ(f), tanh(g), σ(o)].
    return _lstm_step(x, h_prev, c_prev, w_x, w_h, b), (x, h_prev, c_prev, w_x, w_h, b, c, gates)


def _lstm_step_bwd(res, cotangents):
    x, h_prev, c_prev, w_x, w_h, b, c, gates = res
    g_h, g_c = cotangents
    acc = c.dtype
    dz, dh_prev, dc_prev = _lstm_cell_bwd(g_h.astype(acc), g_c.astype(acc), gates,
                                          c_prev.astype(acc), c, w_h.astype(acc))
    dx = dz @ w_x.astype(acc)
    dw_x, dw_h = dz.T @ x.astype(acc), dz.T @ h_prev.astype(acc)
    db = jnp.sum(dz, axis=0)
    return (dx.astype(x.dtype), dh_prev.astype(h_prev.dtype), dc_prev.astype(c_prev.dtype),
            dw_x.astype(w_x.dtype), dw_h.astype(w_h.dtype), db.astype(b.dtype))


_lstm_step.defvjp(_lstm_step_fwd, _lstm_step_bwd)


def lstm_step(x, h_prev, c_prev, w_x, w_h, b):
    r"""One LSTM step (gates i, f, g, o): returns :math:`(h, c)`; see :func:`lstm`.

    Backward, with :math:`\bar h, \bar c` the cotangents of the outputs:
    :math:`dc = \bar c + \bar h ⊙ o ⊙ (1 - \tanh^2 c)`, :math:`dz` from the gate derivatives as
    in :func:`lstm`, :math:`dx = dz W_x`, :math:`dh_{prev} = dz W_h`,
    :math:`dc_{prev} = dc ⊙ f`, :math:`dW_x = dz^\top x`, :math:`dW_h = dz^\top h_{prev}`,
    :math:`db = \sum_{rows} dz`.

    Args:
      x: ``(N, D)``.
      h_prev, c_prev: ``(N, H)``.
      w_x: ``(4H, D)``.
      w_h: ``(4H, H)``.
      b: ``(4H,)``.

    Returns:
      ``(h, c)``, each ``(N, H)``.

    Derivation: docs/derivations.md §10.4.
    """
    op = "lstm_step"
    x, h_prev, c_prev, w_x, w_h, b = (jnp.asarray(a) for a in (x, h_prev, c_prev, w_x, w_h, b))
    _check_args(op, x, "(N, D)", (("h_prev", h_prev), ("c_prev", c_prev)), w_x, w_h,
                (("b", b),), 4)
    return _lstm_step(x, h_prev, c_prev, w_x, w_h, b)


# --- GRU -----------------------------------------------------------------------------------


def _gru_cell(zx, h_prev, w_h_t, b_x, b_h):
    """One GRU step (PyTorch's form) from zx = x·W_xᵀ and w_h_t = W_hᵀ: (h, gates [r, z, n],
    hn) with hn = h_prev·W_hnᵀ + b_hn, the part r scales."""
    xr, xz, xn = _split(zx + _row(b_x), 3)
    hr, hz, hn = _split(h_prev @ w_h_t + _row(b_h), 3)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    h = (1 - z) * n + z * h_prev
    return h, jnp.concatenate([r, z, n], axis=-1), hn


def _gru_cell_bwd(dh, h_prev, gates, hn, w_h):
    """(dzx, dzh, dh_prev) of one step: the gradients of x·W_xᵀ + b_x and h_prev·W_hᵀ + b_h
    (they differ only in the n block, which r scales on the hidden side)."""
    r, z, n = _split(gates, 3)
    dn = dh * (1 - z) * (1 - n * n)  # through n = tanh(a_n)
    dr = dn * hn * r * (1 - r)
    dz = dh * (h_prev - n) * z * (1 - z)
    dzx = jnp.concatenate([dr, dz, dn], axis=-1)
    dzh = jnp.concatenate([dr, dz, dn * r], axis=-1)
    return dzx, dzh, dh * z + dzh @ w_h  # h_prev reaches h directly (z ⊙ h_prev) and via W_h


class _GruResiduals(NamedTuple):
    x: jax.Array  # (N, T, D), for dW_x
    h0: jax.Array  # (N, H), the state before step 1
    w_x: jax.Array  # for dx
    w_h: jax.Array  # for dh_prev
    b_x: jax.Array  # their dtypes, for db_x and db_h
    b_h: jax.Array
    hs: jax.Array  # (T, N, H) accumulation dtype: h_{t-1} for dz and dW_h
    gates: jax.Array  # (T, N, 3H): r, z, n
    hn: jax.Array  # (T, N, H): h_{t-1}·W_hnᵀ + b_hn, for dr


def _gru_forward(x, h0, w_x, w_h, b_x, b_h):
    acc = _acc_dtype(x, h0, w_x, w_h, b_x, b_h)
    x, h0, w_x, w_h, b_x, b_h = (a.astype(acc) for a in (x, h0, w_x, w_h, b_x, b_h))
    zx = _input_projection(x, w_x)  # (T, N, 3H): every step's x_t·W_xᵀ, one GEMM
    w_h_t = w_h.T  # transposed once, not at every step

    def step(h_prev, zx_t):
        h, gates, hn = _gru_cell(zx_t, h_prev, w_h_t, b_x, b_h)
        return h, (h, gates, hn)

    _, (hs, gates, hn) = lax.scan(step, h0, zx)
    return hs, gates, hn


@jax.custom_vjp
def _gru(x, h0, w_x, w_h, b_x, b_h):
    hs, _, _ = _gru_forward(x, h0, w_x, w_h, b_x, b_h)
    return _time_major(hs).astype(_out_dtype(x, h0, w_x, w_h, b_x, b_h))


def _gru_fwd(x, h0, w_x, w_h, b_x, b_h):
    hs, gates, hn = _gru_forward(x, h0, w_x, w_h, b_x, b_h)
    out = _time_major(hs).astype(_out_dtype(x, h0, w_x, w_h, b_x, b_h))
    return out, _GruResiduals(x, h0, w_x, w_h, b_x, b_h, hs, gates, hn)


def _gru_bwd(res, g):
    acc = res.hs.dtype
    w_h = res.w_h.astype(acc)
    hs_prev = _previous(res.h0.astype(acc), res.hs)

    def step(dh_next, inputs):  # backward through step t
        g_t, h_prev_t, gates_t, hn_t = inputs
        dzx, dzh, dh_prev = _gru_cell_bwd(g_t + dh_next, h_prev_t, gates_t, hn_t, w_h)
        return dh_prev, (dzx, dzh)

    inputs = (_time_major(g).astype(acc), hs_prev, res.gates, res.hn)
    dh0, (dzx, dzh) = lax.scan(step, jnp.zeros_like(res.hs[0]), inputs, reverse=True)
    dx, dw_x, db_x = _input_gradients(dzx, res.x.astype(acc), res.w_x.astype(acc))
    dw_h = _sums_over_time(dzh, hs_prev)  # Σ_t dzh_tᵀ·h_{t-1}
    db_h = jnp.sum(dzh, axis=(0, 1))
    return (dx.astype(res.x.dtype), dh0.astype(res.h0.dtype), dw_x.astype(res.w_x.dtype),
            dw_h.astype(res.w_h.dtype), db_x.astype(res.b_x.dtype), db_h.astype(res.b_h.dtype))


_gru.defvjp(_gru_fwd, _gru_bwd)


def gru(x, h0, w_x, w_h, b_x, b_h):
    r"""GRU over a sequence, PyTorch's formulation, gates **r, z, n**.

    .. math::
        r = σ(x_t W_{xr}^\top + b_{xr} + h_{t-1} W_{hr}^\top + b_{hr}),\quad
        z = σ(x_t W_{xz}^\top + b_{xz} + h_{t-1} W_{hz}^\top + b_{hz}),

        n = \tanh\big(x_t W_{xn}^\top + b_{xn} + r ⊙ (h_{t-1} W_{hn}^\top + b_{hn})\big),\quad
        h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}

    Backward (BPTT), with :math:`dh = g_t + dh_t` and :math:`hn = h_{t-1} W_{hn}^\top + b_{hn}`:

    .. math::
        da_n = dh⊙(1-z)⊙(1-n^2),\quad da_r = da_n⊙hn⊙r(1-r),\quad
        da_z = dh⊙(h_{t-1} - n)⊙z(1-z),

        dz^x = [da_r, da_z, da_n],\quad dz^h = [da_r, da_z, da_n ⊙ r],\quad
        dh_{t-1} = dh ⊙ z + dz^h W_h,

        dW_x = \sum_t dz^{x\top}_t x_t,\quad dW_h = \sum_t dz^{h\top}_t h_{t-1},\quad
        db_x = \sum dz^x,\quad db_h = \sum dz^h,\quad dx_t = dz^x_t W_x

    Args:
      x: ``(N, T, D)``, T ≥ 1.
      h0: ``(N, H)``.
      w_x: ``(3H, D)``, rows ``[W_xr; W_xz; W_xn]`` (PyTorch's ``weight_ih``).
      w_h: ``(3H, H)`` (``weight_hh``).
      b_x, b_h: ``(3H,)`` (``bias_ih``, ``bias_hh``; ``b_hn`` sits inside ``r ⊙ (…)``).

    Returns:
      ``hs``, ``(N, T, H)``.

    Derivation: docs/derivations.md §10.5.
    """
    op = "gru"
    x, h0, w_x, w_h, b_x, b_h = (jnp.asarray(a) for a in (x, h0, w_x, w_h, b_x, b_h))
    _check_args(op, x, "(N, T, D)", (("h0", h0),), w_x, w_h, (("b_x", b_x), ("b_h", b_h)), 3)
    return _gru(x, h0, w_x, w_h, b_x, b_h)


def _gru_step_cell(x, h_prev, w_x, w_h, b_x, b_h):
    """(h, gates, hn) of one step, in the accumulation dtype."""
    acc = _acc_dtype(x, h_prev, w_x, w_h, b_x, b_h)
    zx = x.astype(acc) @ w_x.astype(acc).T
    return _gru_cell(zx, h_prev.astype(acc), w_h.astype(acc).T, b_x.astype(acc), b_h.astype(acc))


@jax.custom_vjp
def _gru_step(x, h_prev, w_x, w_h, b_x, b_h):
    h, _, _ = _gru_step_cell(x, h_prev, w_x, w_h, b_x, b_h)
    return h.astype(_out_dtype(x, h_prev, w_x, w_h, b_x, b_h))


def _gru_step_fwd(x, h_prev, w_x, w_h, b_x, b_h):
    _, gates, hn = _gru_step_cell(x, h_prev, w_x, w_h, b_x, b_h)
    # Residuals: the inputs, the gates [r, z, n] and hn = h_prev·W_hnᵀ + b_hn.
    return _gru_step(x, h_prev, w_x, w_h, b_x, b_h), (x, h_prev, w_x, w_h, b_x, b_h, gates, hn)


def _gru_step_bwd(res, g):
    x, h_prev, w_x, w_h, b_x, b_h, gates, hn = res
    acc = gates.dtype
    h_prev_acc = h_prev.astype(acc)
    dzx, dzh, dh_prev = _gru_cell_bwd(g.astype(acc), h_prev_acc, gates, hn, w_h.astype(acc))
    dx = dzx @ w_x.astype(acc)
    dw_x, dw_h = dzx.T @ x.astype(acc), dzh.T @ h_prev_acc
    db_x, db_h = jnp.sum(dzx, axis=0), jnp.sum(dzh, axis=0)
    return (dx.astype(x.dtype), dh_prev.astype(h_prev.dtype), dw_x.astype(w_x.dtype),
            dw_h.astype(w_h.dtype), db_x.astype(b_x.dtype), db_h.astype(b_h.dtype))


_gru_step.defvjp(_gru_step_fwd, _gru_step_bwd)


def gru_step(x, h_prev, w_x, w_h, b_x, b_h):
    r"""One GRU step (gates r, z, n, PyTorch's form): returns :math:`h`; see :func:`gru`.

    Backward: :math:`dz^x, dz^h, dh_{prev}` as in :func:`gru` with :math:`dh = g`, then
    :math:`dx = dz^x W_x`, :math:`dW_x = dz^{x\top} x`, :math:`dW_h = dz^{h\top} h_{prev}`,
    :math:`db_x = \sum_{rows} dz^x`, :math:`db_h = \sum_{rows} dz^h`.

    Args:
      x: ``(N, D)``.
      h_prev: ``(N, H)``.
      w_x: ``(3H, D)``.
      w_h: ``(3H, H)``.
      b_x, b_h: ``(3H,)``.

    Returns:
      ``h``, ``(N, H)``.

    Derivation: docs/derivations.md §10.5.
    """
    op = "gru_step"
    x, h_prev, w_x, w_h, b_x, b_h = (jnp.asarray(a) for a in (x, h_prev, w_x, w_h, b_x, b_h))
    _check_args(op, x, "(N, D)", (("h_prev", h_prev),), w_x, w_h, (("b_x", b_x), ("b_h", b_h)), 3)
    return _gru_step(x, h_prev, w_x, w_h, b_x, b_h)
