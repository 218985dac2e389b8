"""Special values (JAX's autodiff tests keep these in their own table): kinks, saturation,
huge logits, probabilities at exactly 0 and 1 — in float32 and float64.

Each expected gradient is computed by hand in NumPy float64 from the closed form (the fused
``(softmax − y)/m``, ``(σ(z) − y)/m``, …), not by the op under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg
from handgrad import tolerances

DTYPES = ["float32", "float64"]


def rng(seed):
    return np.random.default_rng(seed)


def grad_of_sum(op, z, **kwargs):
    """d Σ op(z) / dz, through the hand backward."""
    return jax.grad(lambda z: jnp.sum(op(z, **kwargs)))(z)


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_sigmoid(z):
    z = np.asarray(z, np.float64)
    e = np.exp(-np.abs(z))  # never overflows
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def assert_finite(*arrays):
    for a in arrays:
        assert np.all(np.isfinite(np.asarray(a, np.float64))), a


def tol(dtype, rtol32=1e-6, atol32=1e-7):
    """float32: the bounds given (float32 inputs, sums and exp against NumPy float64);
    float64: the autodiff table of handgrad/tolerances.py (the same formula, a few ulps)."""
    if dtype == "float32":
        return {"rtol": rtol32, "atol": atol32}
    t = tolerances.autodiff_tolerance(dtype)
    return {"rtol": t.rtol, "atol": t.atol}


# --- ReLU kink: derivative 1 at exactly 0 (note 001), unlike jax.nn.relu -------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_derivative_at_exactly_zero_is_one(dtype):
    z = jnp.array([-1.5, -0.0, 0.0, 2.5], dtype)
    np.testing.assert_array_equal(grad_of_sum(hg.relu, z), [0.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(hg.relu(z), [0.0, 0.0, 0.0, 2.5])
    # The reference encodes the same convention, so autodiff agrees at the kink too…
    np.testing.assert_array_equal(grad_of_sum(hg.reference.relu, z), [0.0, 1.0, 1.0, 1.0])
    # …while jax.nn.relu takes 0 there: the documented difference, pinned.
    np.testing.assert_array_equal(grad_of_sum(jax.nn.relu, z), [0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_at_zero_passes_the_upstream_gradient_unchanged(dtype):
    z = jnp.zeros((3, 4), dtype)
    g = jnp.asarray(rng(1).standard_normal((3, 4)), dtype)
    _, pullback = jax.vjp(hg.relu, z)
    np.testing.assert_array_equal(pullback(g)[0], g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.01, 0.2])
def test_leaky_relu_derivative_at_exactly_zero_is_one(dtype, slope):
    z = jnp.array([-2.0, -0.0, 0.0, 3.0], dtype)
    grad = grad_of_sum(hg.leaky_relu, z, negative_slope=slope)
    np.testing.assert_allclose(grad, np.array([slope, 1.0, 1.0, 1.0], dtype),
                               **tol(dtype, 1e-7, 0))
    np.testing.assert_allclose(
        grad_of_sum(hg.reference.leaky_relu, z, negative_slope=slope), grad, **tol(dtype, 1e-7, 0))
    assert grad.dtype == jnp.dtype(dtype)


# --- softmax cross-entropy at logits ±1e4 ---------------------------------------------------


def _huge_logits(dtype):
    # Every row has entries at ±1e4; the softmax saturates to (near) one-hot.
    return jnp.asarray([[1e4, -1e4, 0.0, 5.0],
                        [-1e4, 1e4, 1e4, -3.0],
                        [-1e4, -1e4, -1e4, -1e4],
                        [3.0, -1e4, 1e4, -1e4]], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_huge_logits_int_labels(dtype):
    z = _huge_logits(dtype)
    labels = jnp.array([1, 2, 0, 3], jnp.int32)
    m = z.shape[0]
    loss, dz = jax.value_and_grad(hg.softmax_cross_entropy)(z, labels)
    assert_finite(loss, dz)
    a = np_softmax(z)
    y = np.eye(4)[np.asarray(labels)]
    np.testing.assert_allclose(loss, -_picked_logp(z, labels).mean(), **tol(dtype))
    np.testing.assert_allclose(dz, (a - y) / m, **tol(dtype))
    assert loss > 1e4  # the first row's label sits at −1e4: a loss of 2e4 / m, not inf
    assert dz.dtype == jnp.dtype(dtype)


def _picked_logp(z, labels):
    """log softmax(z)[i, labels[i]] in float64 by log-sum-exp."""
    z = np.asarray(z, np.float64)
    mx = z.max(axis=1, keepdims=True)
    logp = z - mx - np.log(np.exp(z - mx).sum(axis=1, keepdims=True))
    return logp[np.arange(len(labels)), np.asarray(labels)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_huge_logits_probability_labels(dtype):
    z = _huge_logits(dtype)
    y = jnp.asarray(np_softmax(rng(2).standard_normal((4, 4))), dtype)
    m = z.shape[0]
    loss, (dz, dy) = jax.value_and_grad(hg.softmax_cross_entropy, (0, 1))(z, y)
    assert_finite(loss, dz, dy)
    zf = np.asarray(z, np.float64)
    logp = zf - zf.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    yf = np.asarray(y, np.float64)
    np.testing.assert_allclose(loss, -(yf * logp).sum() / m, **tol(dtype))
    # rows of y sum to 1 (up to rounding in float32): (s·a − y)/m with s the row sum
    s = yf.sum(1, keepdims=True)
    np.testing.assert_allclose(dz, (s * np_softmax(z) - yf) / m, **tol(dtype))
    np.testing.assert_allclose(dz, (np_softmax(z) - yf) / m, **tol(dtype, 1e-5, 1e-6))
    np.testing.assert_allclose(dy, -logp / m, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_and_log_softmax_huge_logits_are_finite(dtype):
    z = _huge_logits(dtype)
    g = jnp.asarray(rng(3).standard_normal(z.shape), dtype)
    for op in (hg.softmax, hg.log_softmax):
        out, pullback = jax.vjp(op, z)
        (dz,) = pullback(g)
        assert_finite(out, dz)
    a = np_softmax(z)
    np.testing.assert_allclose(hg.softmax(z), a, **tol(dtype))
    # dz = a ⊙ (g − ⟨g, a⟩) for softmax; g − a·Σg for log-softmax
    gf = np.asarray(g, np.float64)
    np.testing.assert_allclose(jax.vjp(hg.softmax, z)[1](g)[0],
                               a * (gf - (gf * a).sum(1, keepdims=True)), **tol(dtype))
    np.testing.assert_allclose(jax.vjp(hg.log_softmax, z)[1](g)[0],
                               gf - a * gf.sum(1, keepdims=True), **tol(dtype, 1e-5, 1e-5))
    logp = hg.log_softmax(z)
    np.testing.assert_allclose(logp[0, :2], [0.0, -2e4], **tol(dtype, 1e-7, 0))
    np.testing.assert_allclose(logp[2], np.full(4, -np.log(4.0)), **tol(dtype))


# --- the fused sigmoid + BCE at logits ±1e3 -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_binary_cross_entropy_huge_logits(dtype):
    z = jnp.asarray([[1e3, -1e3, 1e3], [-1e3, 2.0, -1e3]], dtype)
    y = jnp.asarray([[1.0, 0.0, 0.0], [1.0, 0.3, 0.0]], dtype)
    m = z.shape[0]
    loss, (dz, dy) = jax.value_and_grad(hg.sigmoid_binary_cross_entropy, (0, 1))(z, y)
    assert_finite(loss, dz, dy)
    zf, yf = np.asarray(z, np.float64), np.asarray(y, np.float64)
    per = np.maximum(zf, 0) - zf * yf + np.log1p(np.exp(-np.abs(zf)))
    np.testing.assert_allclose(loss, per.sum() / m, **tol(dtype))
    np.testing.assert_allclose(loss, (1e3 + 1e3 + per[1, 1]) / m, **tol(dtype))
    np.testing.assert_allclose(dz, (np_sigmoid(zf) - yf) / m, **tol(dtype))
    np.testing.assert_allclose(dy, -zf / m, **tol(dtype, 1e-7, 0))


# --- binary cross-entropy on probabilities at exactly 0 and 1 -------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_at_exact_zero_and_one_with_matching_targets(dtype):
    p = jnp.asarray([[0.0, 1.0, 0.3], [1.0, 0.0, 0.8]], dtype)
    y = jnp.asarray([[0.0, 1.0, 0.6], [1.0, 0.0, 0.1]], dtype)
    m = p.shape[0]
    loss, (dp, dy) = jax.value_and_grad(hg.binary_cross_entropy, (0, 1))(p, y)
    assert_finite(loss, dp)
    pf, yf = np.asarray(p, np.float64), np.asarray(y, np.float64)
    # The matching 0/1 entries contribute exactly 0 (0·log 0 = 0), the others the log-loss.
    inner = [(0, 2), (1, 2)]
    want = -sum(yf[i] * np.log(pf[i]) + (1 - yf[i]) * np.log(1 - pf[i]) for i in inner) / m
    np.testing.assert_allclose(loss, want, **tol(dtype))
    # dp = (−y/p + (1−y)/(1−p))/m, each term 0 where its factor y or 1 − y is 0
    want_dp = np.zeros_like(pf)
    want_dp[0, 0] = want_dp[1, 1] = 1 / m  # p = 0, y = 0: (1 − y)/(1 − p) = 1
    want_dp[0, 1] = want_dp[1, 0] = -1 / m  # p = 1, y = 1: −y/p = −1
    for i in inner:
        want_dp[i] = (-yf[i] / pf[i] + (1 - yf[i]) / (1 - pf[i])) / m
    np.testing.assert_allclose(dp, want_dp, **tol(dtype))
    # d/dy = (log(1 − p) − log p)/m is ±inf at p ∈ {0, 1}: the loss really is infinitely
    # sensitive to the target there. Pinned so a change is deliberate.
    dyf = np.asarray(dy, np.float64)
    assert dyf[0, 0] == np.inf and dyf[1, 1] == np.inf
    assert dyf[0, 1] == -np.inf and dyf[1, 0] == -np.inf
    np.testing.assert_allclose(dyf[0, 2], np.log(0.7 / 0.3) / m, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_gradient_at_exact_zero_and_one_beats_autodiff(dtype):
    """The reference's autodiff gives NaN for d/dp at p ∈ {0, 1} (xlogy's derivative), the hand
    rule the finite limit; pinned so the documented advantage stays."""
    p = jnp.asarray([[0.0, 1.0]], dtype)
    y = jnp.asarray([[0.0, 1.0]], dtype)
    hand = jax.grad(hg.binary_cross_entropy)(p, y)
    ref = jax.grad(hg.reference.binary_cross_entropy)(p, y)
    np.testing.assert_array_equal(hand, [[1.0, -1.0]])
    assert np.all(np.isnan(np.asarray(ref)))


# --- saturated sigmoid and tanh -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, jax_op", [(hg.sigmoid, jax.nn.sigmoid), (hg.tanh, jnp.tanh)],
                         ids=["sigmoid", "tanh"])
def test_saturated_activation_gradient_is_zero_and_finite(op, jax_op, dtype):
    z = jnp.asarray([1e3, -1e3, 50.0, -50.0, 500.0, -500.0], dtype)
    out = op(z)
    grad = grad_of_sum(op, z)
    assert_finite(out, grad)
    np.testing.assert_array_equal(grad[:2], [0.0, 0.0])
    # σ'(±50) ≈ 1.9e-22 and tanh'(±50) ≈ 1.5e-43 are below any gradient tolerance; the hand
    # rule a(1 − a) rounds σ'(+50) to 0 (1 − a = 0) but keeps σ'(−50): absolute error 2e-22.
    np.testing.assert_allclose(grad, np.zeros(6), atol=1e-20)
    np.testing.assert_allclose(grad, grad_of_sum(jax_op, z), atol=1e-20)
    np.testing.assert_array_equal(out[:2], [1.0, 0.0 if op is hg.sigmoid else -1.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_sigmoid_gradient_is_finite_when_saturated(dtype):
    z = jnp.asarray([1e3, -1e3, -500.0], dtype)
    assert_finite(hg.reference.sigmoid(z), grad_of_sum(hg.reference.sigmoid, z))
    # Saturated: in float32 σ' underflows to exactly 0 at every entry, the true gradient there
    result = hg.check_vjp(hg.sigmoid, hg.reference.sigmoid, z, finite_differences=False,
                          allow_zero=True)
    assert result.ok, str(result)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_and_tanh_gradient_near_zero_is_the_textbook_value(dtype):
    # The control for the saturated table: at 0 the slopes are 1/4 and 1, not 0.
    z = jnp.asarray([0.0, 1e-8, -1e-8], dtype)
    np.testing.assert_allclose(grad_of_sum(hg.sigmoid, z), [0.25] * 3, **tol(dtype, 1e-7, 0))
    np.testing.assert_allclose(grad_of_sum(hg.tanh, z), [1.0] * 3, **tol(dtype, 1e-7, 0))
