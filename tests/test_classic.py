"""The notes' column-major L-layer network (handgrad.classic) against autodiff and the ops.

Three independent computations of the same gradients must agree in float64:
  1. classic.backward — the notes' loop, 1/m applied at dW and db;
  2. jax.grad of classic.cost(classic.forward(...)) — autodiff of the same network;
  3. jax.grad of the batch-first network built from the custom_vjp ops (hg.dense, hg.relu, …).
All of them, for one case, are computed by one jitted function (one compilation per case).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg
from handgrad import classic, tolerances

RTOL = tolerances.autodiff_tolerance("float64").rtol  # float64: the same formula up to a few ulps

# Per output: networks with L = 3, 2 and 1 layers; odd sizes; 1 or several output units.
DIMS = {
    "sigmoid": {"deep3": (6, 5, 3, 3), "deep2": (5, 4, 1), "shallow": (3, 1)},
    "softmax": {"deep3": (7, 5, 3, 4), "deep2": (5, 4, 3), "shallow": (3, 2)},
}
# Every (hidden, output) pair once; across the two outputs each hidden activation meets both
# depths and both m = 1 and m = 7 (odd). One compilation per case, so the table stays small.
_TABLE = [
    ("relu", "sigmoid", "shallow", 7),  # L = 1: no hidden layer, one hidden value suffices
    ("relu", "sigmoid", "deep3", 1),
    ("tanh", "sigmoid", "deep2", 1),
    ("sigmoid", "sigmoid", "deep3", 7),
    ("relu", "softmax", "shallow", 1),
    ("relu", "softmax", "deep2", 7),
    ("tanh", "softmax", "deep3", 7),
    ("sigmoid", "softmax", "deep2", 1),
]
CASES = [
    pytest.param(h, o, DIMS[o][d], m, id=f"{h}-{o}-{'x'.join(map(str, DIMS[o][d]))}-m{m}")
    for h, o, d, m in _TABLE
]


def rel_err(h, r):
    """max |h − r| / max |r|: the error relative to the largest reference entry."""
    return float(jnp.max(jnp.abs(h - r)) / jnp.maximum(jnp.max(jnp.abs(r)), 1e-300))


def make_problem(hidden, output, dims, m, seed=0):
    """Random params (random biases too), random X (n0, m), labels Y (k, m).

    Y: one-hot columns for softmax; for sigmoid 0/1 labels, or soft targets when k, m > 1.

    numpy draws them: no compilation per shape, which keeps the many small cases fast.
    """
    rng = np.random.default_rng(seed)
    gain = 2.0 if hidden == "relu" else 1.0  # He / Xavier scale, as classic.initialize
    params = {}
    for l in range(1, len(dims)):
        params[f"W{l}"] = rng.standard_normal((dims[l], dims[l - 1])) * np.sqrt(gain / dims[l - 1])
        params[f"b{l}"] = 0.5 * rng.standard_normal((dims[l], 1))
    X = rng.standard_normal((dims[0], m))
    k = dims[-1]
    if output == "softmax":
        Y = np.eye(k)[rng.integers(0, k, m)].T  # one-hot columns (k, m)
    elif k > 1 and m > 1:
        Y = rng.uniform(size=(k, m))  # soft targets: dZ = A − Y holds for any y in [0, 1]
    else:
        Y = rng.integers(0, 2, (k, m)).astype(np.float64)
    return jax.tree.map(jnp.asarray, params), jnp.asarray(X), jnp.asarray(Y)


# --- the three computations -----------------------------------------------------------------


def classic_grads(params, X, Y, hidden, output):
    AL, caches = classic.forward(X, params, hidden, output)
    return classic.backward(AL, Y, caches, hidden, output)


def classic_cost(params, X, Y, hidden, output):
    return classic.cost(classic.forward(X, params, hidden, output)[0], Y, output)


def autodiff_grads(params, X, Y, hidden, output):
    grads = jax.grad(classic_cost)(params, X, Y, hidden, output)
    return {f"d{name}": g for name, g in grads.items()}


_OPS_ACTIVATION = {"relu": hg.relu, "tanh": hg.tanh, "sigmoid": hg.sigmoid}


def ops_cost(weights, x, y, hidden, output):
    """The same network, batch-first, from the custom_vjp ops: x = Xᵀ (m, n0), y = Yᵀ or labels."""
    a = x
    for l, (w, b) in enumerate(weights, start=1):
        z = hg.dense(a, w, b)
        a = _OPS_ACTIVATION[hidden](z) if l < len(weights) else z  # last z: the logits
    if output == "softmax":
        return hg.softmax_cross_entropy(a, y)
    return hg.sigmoid_binary_cross_entropy(a, y)


def ops_grads(params, X, y, hidden, output):
    # Column-major -> batch-first: x = Xᵀ, w = W (n_out, n_in) as it is, b = b[:, 0].
    weights = [(params[f"W{l}"], params[f"b{l}"][:, 0]) for l in range(1, len(params) // 2 + 1)]
    g = jax.grad(ops_cost)(weights, X.T, y, hidden, output)
    grads = {}
    for l, (dw, db) in enumerate(g, start=1):
        grads[f"dW{l}"], grads[f"db{l}"] = dw, db[:, None]
    return grads, ops_cost(weights, X.T, y, hidden, output)


def backward_without_one_over_m(params, X, Y, hidden, output):
    """The notes' loop with dW = dZ·A_prevᵀ and db = Σ dZ: the single-sample eqs. 68-73 summed."""
    AL, caches = classic.forward(X, params, hidden, output)
    grads = {}
    dZ = AL - Y
    for l in range(len(caches), 0, -1):
        A_prev, W, _, _ = caches[l - 1]
        grads[f"dW{l}"] = dZ @ A_prev.T
        grads[f"db{l}"] = jnp.sum(dZ, axis=1, keepdims=True)
        if l > 1:
            dZ = (W.T @ dZ) * classic.activation_derivative(caches[l - 2].Z, hidden)
    return grads


@functools.partial(jax.jit, static_argnums=(3, 4))
def everything(params, X, Y, hidden, output):
    out = {
        "classic": classic_grads(params, X, Y, hidden, output),
        "autodiff": autodiff_grads(params, X, Y, hidden, output),
        "no_one_over_m": backward_without_one_over_m(params, X, Y, hidden, output),
        "J_classic": classic_cost(params, X, Y, hidden, output),
    }
    out["ops"], out["J_ops"] = ops_grads(params, X, Y.T, hidden, output)
    if output == "softmax":  # integer labels take another path through the loss
        out["ops_int"], _ = ops_grads(params, X, jnp.argmax(Y, axis=0), hidden, output)
    return out


@functools.cache
def results(hidden, output, dims, m):
    return everything(*make_problem(hidden, output, dims, m), hidden, output)


def assert_grads_equal(h, r):
    assert h.keys() == r.keys()
    for name in r:
        assert h[name].shape == r[name].shape, name
        assert rel_err(h[name], r[name]) <= RTOL, (name, rel_err(h[name], r[name]))


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden, output, dims, m", CASES)
def test_backward_equals_autodiff(hidden, output, dims, m):
    res = results(hidden, output, dims, m)
    assert_grads_equal(res["classic"], res["autodiff"])


@pytest.mark.parametrize("hidden, output, dims, m", CASES)
def test_backward_equals_custom_vjp_ops(hidden, output, dims, m):
    # The two forms of the 1/m are equal: the notes apply 1/m at dW = dZ·A_prevᵀ/m and
    # db = Σ dZ/m (dZ = per-sample derivatives), while the custom_vjp ops carry it in the
    # cotangent (the loss's backward sends ∂J/∂Z = dZ/m, and hg.dense computes dW = gᵀ·x with no
    # further division). Same numbers, so dW_classic == dW_ops and db_classic == db_ops.
    res = results(hidden, output, dims, m)
    assert_grads_equal(res["classic"], res["ops"])
    if output == "softmax":
        assert_grads_equal(res["classic"], res["ops_int"])
    assert rel_err(res["J_classic"], res["J_ops"]) <= RTOL  # and the same cost J


@pytest.mark.parametrize("hidden, output, dims, m", [c for c in CASES if c.values[3] > 1])
def test_dropping_one_over_m_is_caught(hidden, output, dims, m):
    res = results(hidden, output, dims, m)
    for reference in (res["autodiff"], res["ops"]):
        for name in reference:
            # Off by exactly the factor m, far outside the tolerance: the comparison can fail.
            assert rel_err(res["no_one_over_m"][name], reference[name]) > 1.0, name
            assert rel_err(res["no_one_over_m"][name] / m, reference[name]) <= RTOL, name


@pytest.mark.parametrize("hidden, output, dims, m", [c for c in CASES if c.values[3] == 1])
def test_one_over_m_is_invisible_at_m_1(hidden, output, dims, m):
    # Why the cases above need m > 1: with one sample the missing 1/m cannot show.
    res = results(hidden, output, dims, m)
    assert_grads_equal(res["no_one_over_m"], res["classic"])


def test_relu_derivative_is_one_at_exactly_zero():
    # Small integers make every product exact, so Z[1] hits exactly 0 in both layouts; Z[2] stays
    # moderate (|Z| < 1.5), where autodiff through the clip-free log(1 − AL) is still accurate.
    X = np.array([[1.0, -2.0, 3.0], [2.0, 1.0, -1.0]])
    W1, b1 = np.array([[1.0, -1.0], [2.0, 1.0], [-1.0, 3.0]]), np.array([[1.0], [-1.0], [2.0]])
    assert np.any(W1 @ X + b1 == 0), "the case must reach the kink"
    params = {"W1": W1, "b1": b1, "W2": np.array([[0.25, -0.5, 0.125]]), "b2": np.array([[0.25]])}
    Y = np.array([[1.0, 0.0, 1.0]])

    def run(shift):
        shifted = dict(params, b1=b1 + shift)  # moves only the zero entry across the kink
        return everything(jax.tree.map(jnp.asarray, shifted), jnp.asarray(X), jnp.asarray(Y),
                          "relu", "sigmoid")

    res = run(0.0)
    assert_grads_equal(res["classic"], res["ops"])  # hg.relu: relu'(0) = 1 too
    assert_grads_equal(res["classic"], res["autodiff"])  # classic.relu is a where(Z ≥ 0, …)
    # relu'(0) = 1 is the slope from the right: Z = +1e-9 gives (nearly) the same dW1, while
    # Z = −1e-9 — relu'(0) = 0, JAX's and PyTorch's convention — gives a different one.
    assert rel_err(run(1e-9)["classic"]["dW1"], res["classic"]["dW1"]) < 1e-6
    assert rel_err(run(-1e-9)["classic"]["dW1"], res["classic"]["dW1"]) > 1e-3


@pytest.mark.parametrize("hidden, output, k", [("relu", "sigmoid", 1), ("tanh", "softmax", 3)])
def test_train_decreases_cost(hidden, output, k):
    rng = np.random.default_rng(3)
    X = jnp.asarray(rng.standard_normal((4, 40)))
    scores = jnp.asarray(rng.standard_normal((k, 4))) @ X  # a linear teacher: separable labels
    if output == "sigmoid":
        Y = (scores > 0).astype(X.dtype)
    else:
        Y = jax.nn.one_hot(jnp.argmax(scores, axis=0), k, dtype=X.dtype).T
    # Each step is forward, backward, update() — eqs. 33-34, 77-84, 42-43.
    _, costs = classic.train(X, Y, (4, 6, k), jax.random.PRNGKey(0), hidden=hidden,
                             output=output, learning_rate=0.1, num_iterations=15)
    assert all(b < a for a, b in itertools.pairwise(costs)), costs
    assert costs[-1] < 0.9 * costs[0], costs


def test_update_is_a_gradient_step():
    # W ← W − α·dW, b ← b − α·db on every parameter (eqs. 42-43), into a new dict.
    case = ("tanh", "sigmoid", DIMS["sigmoid"]["deep2"], 1)  # in the table: already compiled
    params, grads = make_problem(*case)[0], results(*case)["classic"]
    stepped = classic.update(params, grads, 0.1)
    assert stepped.keys() == params.keys() and stepped is not params
    for name in params:
        assert jnp.array_equal(stepped[name], params[name] - 0.1 * grads[f"d{name}"]), name


def test_shapes_and_bad_names():
    params = classic.initialize((5, 4, 3), jax.random.PRNGKey(1))
    assert {k: v.shape for k, v in params.items()} == {
        "W1": (4, 5), "b1": (4, 1), "W2": (3, 4), "b2": (3, 1)}
    X = jnp.asarray(np.random.default_rng(2).standard_normal((5, 6)))
    AL, caches = jax.eval_shape(classic.forward, X, params)  # shapes only, nothing compiled
    assert AL.shape == (3, 6) and [c.Z.shape for c in caches] == [(4, 6), (3, 6)]
    with pytest.raises(ValueError, match="`hidden`"):
        classic.forward(X, params, hidden="gelu")
    with pytest.raises(ValueError, match="`output`"):
        classic.cost(AL, AL, output="linear")
