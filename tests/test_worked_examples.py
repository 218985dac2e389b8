"""The notes' worked examples, number for number, through the hand-written ops.

Note 003 (CS231n's backprop notes): the sigmoid neuron and the staged computation with its
stage-by-stage backward. Note 001: the softmax + cross-entropy gradient ``a − y`` and the
two-output network whose ``∂E/∂w1`` sums the paths through O1 and O2.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg

NOTE = 5e-5  # the notes print 4 significant digits


def sig(v):
    return 1.0 / (1 + math.exp(-v))


# --- note 003, example 1: the sigmoid neuron ------------------------------------------------


def test_seed003_sigmoid_neuron_with_hand_ops():
    x = jnp.array([[-1.0, -2.0]])  # one sample, two features
    w = jnp.array([[2.0, -3.0]])  # (n_out=1, n_in=2): w0, w1
    b = jnp.array([-3.0])  # w2, the bias

    def f(x, w, b):
        return hg.sigmoid(hg.dense(x, w, b))[0, 0]

    value, (dx, dw, db) = jax.value_and_grad(f, (0, 1, 2))(x, w, b)
    assert value == pytest.approx(0.7311, abs=NOTE)
    np.testing.assert_allclose(dx[0], [0.3932, -0.5898], atol=NOTE)
    np.testing.assert_allclose([*dw[0], db[0]], [-0.1966, -0.3932, 0.1966], atol=NOTE)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape


def test_seed003_sigmoid_neuron_equals_the_notes_code():
    # The note's code, in Python floats.
    w = [2, -3, -3]
    x = [-1, -2]
    dot = w[0] * x[0] + w[1] * x[1] + w[2]
    f = 1.0 / (1 + math.exp(-dot))
    ddot = (1 - f) * f
    dx = [w[0] * ddot, w[1] * ddot]
    dw = [x[0] * ddot, x[1] * ddot, 1.0 * ddot]

    def neuron(x, w, b):
        return hg.sigmoid(hg.dense(x, w, b))[0, 0]

    args = (jnp.array([x], float), jnp.array([w[:2]], float), jnp.array([w[2]], float))
    value, (gx, gw, gb) = jax.value_and_grad(neuron, (0, 1, 2))(*args)
    assert float(value) == pytest.approx(f, rel=1e-14)
    np.testing.assert_allclose(gx[0], dx, rtol=1e-14)
    np.testing.assert_allclose([*gw[0], gb[0]], dw, rtol=1e-14)


# --- note 003, example 2: the staged computation --------------------------------------------


def staged_f(x, y):
    """f(x, y) = (x + σ(y)) / (σ(x) + (x + y)²), with the hand sigmoid."""
    return (x + hg.sigmoid(y)) / (hg.sigmoid(x) + jnp.square(x + y))


def staged_by_hand(x, y, accumulate=True):
    """The note's forward and backward, stage by stage, in Python floats."""
    sigy = 1.0 / (1 + math.exp(-y))  # (1)
    num = x + sigy  # (2)
    sigx = 1.0 / (1 + math.exp(-x))  # (3)
    xpy = x + y  # (4)
    xpysqr = xpy**2  # (5)
    den = sigx + xpysqr  # (6)
    invden = 1.0 / den  # (7)
    f = num * invden  # (8)
    # backward
    dnum = invden  # (8)
    dinvden = num  # (8)
    dden = (-1.0 / (den**2)) * dinvden  # (7)
    dsigx = (1) * dden  # (6)
    dxpysqr = (1) * dden  # (6)
    dxpy = (2 * xpy) * dxpysqr  # (5)
    dx = (1) * dxpy  # (4)
    dy = (1) * dxpy  # (4)
    if accumulate:
        dx += ((1 - sigx) * sigx) * dsigx  # (3)  "Notice += !!"
        dx += (1) * dnum  # (2)
    else:  # the bug the note warns about: = overwrites the earlier branches
        dx = ((1 - sigx) * sigx) * dsigx  # (3)
        dx = (1) * dnum  # (2)
    dsigy = (1) * dnum  # (2)
    if accumulate:
        dy += ((1 - sigy) * sigy) * dsigy  # (1)
    else:
        dy = ((1 - sigy) * sigy) * dsigy  # (1)
    return f, dx, dy


def test_seed003_staged_computation_notes_numbers():
    x, y = jnp.float64(3.0), jnp.float64(-4.0)
    value, (dx, dy) = jax.value_and_grad(staged_f, (0, 1))(x, y)
    assert float(value) == pytest.approx(1.5456, abs=NOTE)
    assert float(dx) == pytest.approx(2.0596, abs=NOTE)
    assert float(dy) == pytest.approx(1.5922, abs=NOTE)


def test_seed003_stage_by_stage_backward_equals_jax_grad():
    x, y = 3.0, -4.0
    f, dx, dy = staged_by_hand(x, y)
    value, (gx, gy) = jax.value_and_grad(staged_f, (0, 1))(jnp.float64(x), jnp.float64(y))
    assert float(value) == pytest.approx(f, rel=1e-14)
    assert float(gx) == pytest.approx(dx, rel=1e-12)
    assert float(gy) == pytest.approx(dy, rel=1e-12)
    # Overwriting (=) instead of accumulating (+=) loses branches: a different, wrong answer.
    _, dx_wrong, dy_wrong = staged_by_hand(x, y, accumulate=False)
    assert abs(dx_wrong - float(gx)) > 0.1 and abs(dy_wrong - float(gy)) > 0.1


@pytest.mark.parametrize("x, y", [(0.7, 1.3), (-2.1, 0.4), (1.5, -0.2)])
def test_seed003_stage_by_stage_backward_at_other_points(x, y):
    f, dx, dy = staged_by_hand(x, y)
    value, (gx, gy) = jax.value_and_grad(staged_f, (0, 1))(jnp.float64(x), jnp.float64(y))
    assert (float(value), float(gx), float(gy)) == pytest.approx((f, dx, dy), rel=1e-12)


# --- note 001: softmax + cross-entropy, dz = a − y ------------------------------------------

NOTE_A = np.array([0.0903, 0.2447, 0.665])  # the note's softmax output (it sums to 1)


def test_seed001_softmax_example_dz_is_a_minus_y():
    # The note gives only a; logits z = log a reproduce it exactly (softmax(log a) = a / Σa).
    z = jnp.log(jnp.asarray(NOTE_A))[None, :]
    np.testing.assert_allclose(hg.softmax(z)[0], NOTE_A, rtol=1e-12)
    labels = jnp.array([1])  # the true class: the second of three
    dz = jax.grad(hg.softmax_cross_entropy)(z, labels)  # m = 1: no 1/m to speak of
    np.testing.assert_allclose(dz[0], [0.0903, -0.7553, 0.665], atol=1e-12)
    # …and with probability (one-hot) labels: the same dz.
    onehot = jnp.array([[0.0, 1.0, 0.0]])
    np.testing.assert_allclose(jax.grad(hg.softmax_cross_entropy)(z, onehot), dz, atol=1e-12)


def test_seed001_softmax_example_from_logits_1_2_3():
    # The usual logits for this example; the note rounds a₀ = 0.09003 to 0.0903.
    z = jnp.array([[1.0, 2.0, 3.0]])
    dz = jax.grad(hg.softmax_cross_entropy)(z, jnp.array([1]))
    np.testing.assert_allclose(dz[0], [0.0903, -0.7553, 0.665], atol=5e-4)
    np.testing.assert_allclose(dz[0], [0.09003, -0.75527, 0.66524], atol=NOTE)


def test_seed001_softmax_jacobian():
    """∂a_j/∂z_i = a_j(1 − a_j) if i = j, −a_j·a_i otherwise (note 001), via the hand VJP."""
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4)))
    a = np.asarray(hg.softmax(z)[0])
    jac = np.asarray(jax.jacrev(lambda z: hg.softmax(z)[0])(z))[:, 0, :]  # [j, i]
    np.testing.assert_allclose(jac, np.diag(a) - np.outer(a, a), rtol=1e-12, atol=1e-15)


def test_seed001_batch_mean_carries_1_over_m():
    # m = 3 copies of the example: each row of dz is (a − y)/3.
    z = jnp.tile(jnp.log(jnp.asarray(NOTE_A))[None, :], (3, 1))
    dz = jax.grad(hg.softmax_cross_entropy)(z, jnp.array([1, 1, 1]))
    np.testing.assert_allclose(dz, np.tile([[0.0903, -0.7553, 0.665]], (3, 1)) / 3, atol=1e-12)


# --- note 001: the two-output network, ∂E/∂w1 sums two paths --------------------------------


def two_output_net(x, w, target):
    """H = (w1 x, w2 x); O1 = w3 f(H1) + w4 f(H2); O2 = w5 f(H1) + w6 f(H2); f = σ;
    E = ½ Σ (f(O) − y)² (the note's E with its sign slip corrected), from hand ops."""
    w1, w2, w3, w4, w5, w6 = w
    hidden = hg.sigmoid(hg.dense(x, jnp.stack([w1, w2])[:, None]))  # (1, 2): f(H1), f(H2)
    out = hg.sigmoid(hg.dense(hidden, jnp.array([[w3, w4], [w5, w6]])))  # f(O1), f(O2)
    return hg.squared_error(out, target)  # m = 1


def _values():
    x = jnp.array([[0.8]])
    w = jnp.array([0.6, -1.1, 1.4, 0.5, -0.9, 1.2])  # w1 … w6
    target = jnp.array([[0.1, 0.9]])  # y_O1, y_O2
    return x, w, target


def _forward_by_hand(x, w, target):
    x = float(x[0, 0])
    w1, w2, w3, w4, w5, w6 = (float(v) for v in w)
    y1, y2 = (float(v) for v in target[0])
    fh1, fh2 = sig(w1 * x), sig(w2 * x)
    fo1, fo2 = sig(w3 * fh1 + w4 * fh2), sig(w5 * fh1 + w6 * fh2)
    delta_o1 = (fo1 - y1) * fo1 * (1 - fo1)  # ∂E/∂O1
    delta_o2 = (fo2 - y2) * fo2 * (1 - fo2)  # ∂E/∂O2
    return x, (w1, w2, w3, w4, w5, w6), (y1, y2), (fh1, fh2), (fo1, fo2), (delta_o1, delta_o2)


def test_seed001_two_output_network_dE_dw1_sums_both_paths():
    x, w, target = _values()
    grad = jax.grad(two_output_net, 1)(x, w, target)
    xs, (_, _, w3, w4, w5, w6), _, (fh1, fh2), _, (d1, d2) = _forward_by_hand(x, w, target)
    # ∂E/∂w1 = (∂E/∂O1·∂O1/∂f(H1) + ∂E/∂O2·∂O2/∂f(H1)) · ∂f(H1)/∂H1 · ∂H1/∂w1
    through_o1 = d1 * w3 * fh1 * (1 - fh1) * xs
    through_o2 = d2 * w5 * fh1 * (1 - fh1) * xs
    assert float(grad[0]) == pytest.approx(through_o1 + through_o2, rel=1e-12)
    # Each path alone is not enough: both carry a real share of the gradient.
    assert abs(through_o1) > 1e-3 and abs(through_o2) > 1e-3
    for one_path in (through_o1, through_o2):
        assert abs(float(grad[0]) - one_path) > 1e-3
    # The same for w2, through f(H2), with w4 and w6.
    dw2 = (d1 * w4 + d2 * w6) * fh2 * (1 - fh2) * xs
    assert float(grad[1]) == pytest.approx(dw2, rel=1e-12)


def test_seed001_two_output_network_output_weights():
    x, w, target = _values()
    grad = jax.grad(two_output_net, 1)(x, w, target)
    _, _, (y1, _), (fh1, fh2), (fo1, _), (d1, d2) = _forward_by_hand(x, w, target)
    # ∂E/∂w3 = ∂E/∂f(O1)·∂f(O1)/∂O1·∂O1/∂w3 = (f(O1) − y)·f(O1)(1 − f(O1))·f(H1)
    assert float(grad[2]) == pytest.approx((fo1 - y1) * fo1 * (1 - fo1) * fh1, rel=1e-12)
    np.testing.assert_allclose(grad[2:], [d1 * fh1, d1 * fh2, d2 * fh1, d2 * fh2], rtol=1e-12)
    # The note writes (y − f(O1))·…: the derivative of its E = −½Σ(…)², i.e. minus ours.
    note_dw3 = (y1 - fo1) * fo1 * (1 - fo1) * fh1
    assert float(grad[2]) == pytest.approx(-note_dw3, rel=1e-12)


def test_seed001_two_output_network_matches_reference_and_descends():
    x, w, target = _values()

    def ref_net(x, w, target):
        w1, w2, w3, w4, w5, w6 = w
        r = hg.reference
        hidden = r.sigmoid(r.dense(x, jnp.stack([w1, w2])[:, None]))
        out = r.sigmoid(r.dense(hidden, jnp.array([[w3, w4], [w5, w6]])))
        return r.squared_error(out, target)

    loss, grad = jax.value_and_grad(two_output_net, 1)(x, w, target)
    np.testing.assert_allclose(grad, jax.grad(ref_net, 1)(x, w, target), rtol=1e-12)
    # The note's update w ← w − η·∂E/∂w lowers the (sign-corrected) E.
    assert two_output_net(x, w - 0.5 * grad, target) < loss
