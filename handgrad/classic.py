r"""The notes' L-layer network, written literally: column-major, plain ``jax.numpy``.

Samples are **columns** here, exactly as in notes 000 and 002: ``X`` is ``(n0, m)``, ``W[l]`` is
``(n_l, n_{l-1})``, ``b[l]`` is ``(n_l, 1)``, ``A[l]`` and ``Z[l]`` are ``(n_l, m)``. Nothing here
is a ``custom_vjp`` and nothing calls ``jax.grad``: :func:`backward` is the notes' loop, line by
line. The batch-first ops (``hg.dense`` …) compute the same numbers with every formula transposed
and the ``1/m`` carried in the cotangent instead of applied at ``dW``/``db``;
tests/test_classic.py shows both equal.

    params = initialize((4, 5, 1), jax.random.PRNGKey(0))
    AL, caches = forward(X, params)                  # eqs. 33-34
    grads = backward(AL, Y, caches)                  # eqs. 77-84
    params = update(params, grads, learning_rate=0.1)  # eqs. 42-43

Derivation: docs/derivations.md §6.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

HIDDEN = ("relu", "tanh", "sigmoid")
OUTPUT = ("sigmoid", "softmax")


class Cache(NamedTuple):
    """What layer ``l``'s forward keeps for its backward (note 000's "cache")."""

    A_prev: jax.Array  # (n_{l-1}, m): for dW = dZ·A_prevᵀ/m
    W: jax.Array  # (n_l, n_{l-1}): for dA_prev = Wᵀ·dZ
    b: jax.Array  # (n_l, 1): kept as in the notes; backward does not need it
    Z: jax.Array  # (n_l, m): for g'(Z)


def _check_choice(arg: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"classic: `{arg}` must be one of {choices}, got {value!r}.")
    return value


def _num_layers(params: dict) -> int:
    return len(params) // 2


# --- activations g and their derivatives g' (note 002 eqs. 7-8; note 001) ---------------------


def sigmoid(Z):
    r"""σ(Z) = 1 / (1 + e^{−Z}), elementwise (note 002 eq. 7)."""
    return 1 / (1 + jnp.exp(-Z))


def relu(Z):
    """max(Z, 0). Written as a `where` on Z ≥ 0 so that autodiff of it also has relu'(0) = 1."""
    return jnp.where(Z >= 0, Z, jnp.zeros_like(Z))


def softmax(Z):
    r"""Column-wise softmax a_j = e^{z_j} / Σ_k e^{z_k}, over the class axis 0 (note 001)."""
    # Shifting each column by its max changes nothing mathematically and keeps exp() finite.
    e = jnp.exp(Z - jnp.max(Z, axis=0, keepdims=True))
    return e / jnp.sum(e, axis=0, keepdims=True)


_G = {"relu": relu, "tanh": jnp.tanh, "sigmoid": sigmoid, "softmax": softmax}


def activation_derivative(Z, hidden: str = "relu"):
    r"""g'(Z) for a hidden layer, elementwise.

    relu'(Z) = 1 for Z ≥ 0, else 0 (note 001: the derivative at exactly 0 is 1);
    tanh'(Z) = 1 − tanh²(Z); σ'(Z) = σ(Z)(1 − σ(Z)) (note 002 eq. 8).

    Derivation: docs/derivations.md §6.
    """
    _check_choice("hidden", hidden, HIDDEN)
    if hidden == "relu":
        return (Z >= 0).astype(Z.dtype)
    if hidden == "tanh":
        return 1 - jnp.tanh(Z) ** 2
    s = sigmoid(Z)
    return s * (1 - s)


# --- initialize, forward, cost ------------------------------------------------------------------


def initialize(layer_dims, key, scale: str | float = "he") -> dict:
    r"""Random weights ``W[l]`` of shape ``(n_l, n_{l-1})`` and zero biases ``b[l]`` ``(n_l, 1)``.

    ``W[l] = N(0, 1)·s`` with ``s = sqrt(2/n_{l-1})`` for ``scale="he"`` (keeps the variance of
    relu layers), ``sqrt(1/n_{l-1})`` for ``"xavier"`` (tanh/sigmoid), or the given float
    (e.g. the course's 0.01). Biases start at 0, as in the course: random ``W`` already breaks
    the symmetry between units.

    Args:
      layer_dims: ``(n0, n1, …, nL)``, input size first.
      key: a ``jax.random`` key.
      scale: ``"he"``, ``"xavier"`` or a float.

    Returns:
      ``{"W1": (n1, n0), "b1": (n1, 1), …, "WL": (nL, n_{L-1}), "bL": (nL, 1)}``.

    Derivation: docs/derivations.md §6.
    """
    if len(layer_dims) < 2:
        raise ValueError(f"initialize: `layer_dims` needs at least (n0, n1), got {layer_dims}.")
    params = {}
    keys = jax.random.split(key, len(layer_dims) - 1)
    for l in range(1, len(layer_dims)):
        n_prev, n = layer_dims[l - 1], layer_dims[l]
        if scale == "he":
            s = (2 / n_prev) ** 0.5
        elif scale == "xavier":
            s = (1 / n_prev) ** 0.5
        else:
            s = float(scale)
        params[f"W{l}"] = s * jax.random.normal(keys[l - 1], (n, n_prev))
        params[f"b{l}"] = jnp.zeros((n, 1))
    return params


def forward(X, params: dict, hidden: str = "relu", output: str = "sigmoid"):
    r"""Forward pass, note 002 eqs. 33-34, for l = 1 … L with ``A[0] = X``:

    .. math:: Z^{[l]} = W^{[l]} A^{[l-1]} + b^{[l]}, \qquad A^{[l]} = g^{[l]}(Z^{[l]})

    ``g`` is ``hidden`` for l < L and ``output`` for l = L. ``b`` ``(n_l, 1)`` broadcasts over the
    m columns (rank-equal broadcast, no rank promotion).

    Args:
      X: ``(n0, m)``, one sample per column.
      params: from :func:`initialize`.
      hidden: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
      output: ``"sigmoid"`` or ``"softmax"``.

    Returns:
      ``(AL, caches)``: ``AL`` ``(nL, m)`` and one :class:`Cache` ``(A_prev, W, b, Z)`` per layer.

    Derivation: docs/derivations.md §6.
    """
    _check_choice("hidden", hidden, HIDDEN)
    _check_choice("output", output, OUTPUT)
    L = _num_layers(params)
    A = X
    caches = []
    for l in range(1, L + 1):
        A_prev, W, b = A, params[f"W{l}"], params[f"b{l}"]
        Z = W @ A_prev + b  # eq. 33
        A = _G[hidden if l < L else output](Z)  # eq. 34
        caches.append(Cache(A_prev, W, b, Z))
    return A, caches


def cost(AL, Y, output: str = "sigmoid"):
    r"""The mean cost :math:`J = \frac1m \sum_i L(y^{(i)}, \hat y^{(i)})` (note 002 eq. 76).

    sigmoid output, log-loss (eq. 1) summed over the ``k`` output rows:
    :math:`L = -\sum_j y_j \log a_j + (1-y_j)\log(1-a_j)`;
    softmax output, cross-entropy: :math:`L = -\sum_j y_j \log a_j`.

    Takes ``log`` of ``AL`` directly, with no clipping: fine for moderate pre-activations (as in
    the tests); an ``AL`` that rounds to exactly 0 or 1 gives ``inf``. The batch-first
    ``hg.sigmoid_binary_cross_entropy`` / ``hg.softmax_cross_entropy`` work on logits and are
    stable everywhere.

    Args:
      AL: ``(k, m)`` output of :func:`forward`.
      Y: ``(k, m)`` labels: 0/1 (or soft targets in [0, 1]) for sigmoid, one-hot columns for
        softmax.
      output: ``"sigmoid"`` or ``"softmax"``.

    Returns:
      scalar ``J``.

    Derivation: docs/derivations.md §6.
    """
    _check_choice("output", output, OUTPUT)
    m = Y.shape[1]
    if output == "sigmoid":
        losses = -(Y * jnp.log(AL) + (1 - Y) * jnp.log(1 - AL))  # eq. 1
    else:
        losses = -Y * jnp.log(AL)
    return jnp.sum(losses) / m  # eq. 76


# --- backward and update ------------------------------------------------------------------------


def linear_backward(dZ, cache: Cache):
    r"""The linear part of layer l's backward (note 000; note 002 eqs. 79-81, 83-84).

    .. math::
        dW = \tfrac1m\, dZ\, A_{prev}^\top, \quad
        db = \tfrac1m \textstyle\sum_{axis=1} dZ, \quad
        dA_{prev} = W^\top dZ

    ``dZ`` holds per-sample derivatives (one column per sample); the ``1/m`` of the mean cost is
    applied here, once, and not carried into ``dA_prev``.

    Returns:
      ``(dA_prev, dW, db)`` of shapes ``(n_{l-1}, m)``, ``(n_l, n_{l-1})``, ``(n_l, 1)``.

    Derivation: docs/derivations.md §6.
    """
    m = dZ.shape[1]
    dW = dZ @ cache.A_prev.T / m  # eq. 79/83
    db = jnp.sum(dZ, axis=1, keepdims=True) / m  # eq. 80/84 (bias broadcast ↔ sum over columns)
    dA_prev = cache.W.T @ dZ  # eq. 81 (65: the transpose makes the shapes fit)
    return dA_prev, dW, db


def backward(AL, Y, caches, hidden: str = "relu", output: str = "sigmoid") -> dict:
    r"""Backward pass, note 000 and note 002 eqs. 77-84.

    Output layer (sigmoid + log-loss, or softmax + cross-entropy): :math:`dZ^{[L]} = A^{[L]} - Y`.
    Then for l = L … 1: ``dA_prev, dW[l], db[l] = linear_backward(dZ[l])`` and, for the hidden
    layer below, :math:`dZ^{[l-1]} = dA^{[l-1]} \odot g'(Z^{[l-1]})` (eq. 82).

    Args:
      AL: ``(k, m)`` from :func:`forward`.
      Y: ``(k, m)`` labels, as for :func:`cost`.
      caches: from :func:`forward`.
      hidden, output: the activations used in :func:`forward`.

    Returns:
      ``{"dW1": (n1, n0), "db1": (n1, 1), …}`` — the gradients of :func:`cost`.

    Derivation: docs/derivations.md §6.
    """
    _check_choice("hidden", hidden, HIDDEN)
    # dZ = A − Y holds for exactly these two pairs; `output` only has to be one of them.
    _check_choice("output", output, OUTPUT)
    grads = {}
    dZ = AL - Y  # note 000: dZ[L] = A[L] − Y (the loss and output derivative fused)
    for l in range(len(caches), 0, -1):
        dA_prev, grads[f"dW{l}"], grads[f"db{l}"] = linear_backward(dZ, caches[l - 1])
        if l > 1:
            dZ = dA_prev * activation_derivative(caches[l - 2].Z, hidden)  # eq. 82: dA ⊙ g'(Z)
    return grads


def update(params: dict, grads: dict, learning_rate: float) -> dict:
    r"""One gradient-descent step, note 002 eqs. 42-43: ``W ← W − α·dW``, ``b ← b − α·db``.

    Returns a new dict; ``params`` is left as it was.

    Derivation: docs/derivations.md §6.
    """
    return {name: p - learning_rate * grads[f"d{name}"] for name, p in params.items()}


@partial(jax.jit, static_argnames=("hidden", "output"))
def _step(params, X, Y, learning_rate, hidden, output):
    """forward, cost, backward, update — one iteration, compiled once per network shape."""
    AL, caches = forward(X, params, hidden, output)
    grads = backward(AL, Y, caches, hidden, output)
    return update(params, grads, learning_rate), cost(AL, Y, output)


def train(X, Y, layer_dims, key, *, hidden="relu", output="sigmoid", learning_rate=0.1,
          num_iterations=100):
    """Plain gradient descent: forward, cost, backward, update, ``num_iterations`` times.

    Weights start He-scaled for relu hidden layers, Xavier-scaled otherwise.

    Returns:
      ``(params, costs)`` with the cost before each step.

    Derivation: docs/derivations.md §6.
    """
    params = initialize(layer_dims, key, scale="he" if hidden == "relu" else "xavier")
    costs = []
    for _ in range(num_iterations):
        params, J = _step(params, X, Y, learning_rate, hidden=hidden, output=output)
        costs.append(float(J))
    return params, costs
