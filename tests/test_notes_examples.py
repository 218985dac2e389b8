"""Every number printed in a worked example of docs/notes.md and docs/derivations.md, recomputed.

Each test computes one example with handgrad's ops and with ``jax.vjp`` of the plain-JAX
reference (float64), compares the result with the numbers hard-coded here, and checks that the
document prints exactly those numbers in the section named in the test: arrays are rendered as
the LaTeX ``pmatrix`` the documents use (``\\begin{pmatrix}1&-2\\\\0&3\\end{pmatrix}``) and looked
up in that section's text. Change a number in the docs and a test here fails; change an op so
that an example's result changes and a test fails too. The convolution and pooling examples run
with the faster evaluations allowed and with the textbook evaluation forced
(``handgrad.fast_paths(False)``).
"""

from __future__ import annotations

import hashlib
import math
import re
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg

DOCS = Path(__file__).resolve().parents[1] / "docs"
EXACT = dict(rtol=1e-13, atol=1e-13)  # float64; the examples are small integers and halves


# --- reading the docs -------------------------------------------------------------------------


def section(doc: str, heading: str) -> str:
    """The text of the section of ``docs/<doc>`` whose heading starts with ``heading`` (e.g.
    ``"### §4.3"``), up to the next heading of the same or a higher level."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    level = heading.split(" ", 1)[0]
    match = re.search(rf"^{re.escape(heading)}.*$", text, flags=re.M)
    assert match, f"docs/{doc} has no heading starting with {heading!r}"
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def num(v) -> str:
    """A number as the docs print it: integers without a decimal point, others shortest."""
    v = float(v)
    return str(int(v)) if v == int(v) else f"{v:g}"


def pmatrix(a) -> str:
    a = np.atleast_2d(np.asarray(a, dtype=float))
    rows = ("&".join(num(v) for v in row) for row in a)
    return r"\begin{pmatrix}" + r"\\".join(rows) + r"\end{pmatrix}"


def vector(values, decimals: int) -> str:
    """``[0.3932,\\ -0.5898]`` — a row of rounded numbers as the docs print it."""
    return "[" + r",\ ".join(f"{v:.{decimals}f}" for v in values) + "]"


def assert_printed(text: str, where: str, *snippets: str) -> None:
    for snippet in snippets:
        assert snippet in text, f"{where} does not print {snippet!r}"


# --- computing ---------------------------------------------------------------------------------


def value_and_vjp(fn, args, ct):
    out, pullback = jax.vjp(fn, *args)
    return np.asarray(out), [np.asarray(d) for d in pullback(jnp.asarray(ct))]


def hand_and_reference(hand, reference, args, ct):
    """(out, cotangents) of the hand op; asserts the reference's autodiff gives the same."""
    args = [jnp.asarray(a, jnp.float64) for a in args]
    got = value_and_vjp(hand, args, ct)
    want = value_and_vjp(reference, args, ct)
    np.testing.assert_allclose(got[0], want[0], **EXACT)
    for name, g, w in zip("0123456789", got[1], want[1]):
        np.testing.assert_allclose(g, w, **EXACT, err_msg=f"cotangent {name} vs autodiff")
    return got


def correlate(a, k):
    """Valid 2-D cross-correlation in NumPy loops (the ⋆ of the docs)."""
    a, k = np.asarray(a, float), np.asarray(k, float)
    out = np.zeros((a.shape[0] - k.shape[0] + 1, a.shape[1] - k.shape[1] + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = np.sum(a[i:i + k.shape[0], j:j + k.shape[1]] * k)
    return out


def error_map_for_dx(g, k, stride, pad_lo, pad_hi, size):
    """g̃ of derivations §4.3: g dilated by the stride, padded k − 1 − p_lo before and
    k − 1 − p_hi + r after (d = 1), on both axes."""
    ho = g.shape[0]
    r = (size + pad_lo + pad_hi - k) % stride
    dilated = np.zeros(((ho - 1) * stride + 1,) * 2)
    dilated[::stride, ::stride] = g
    lo, hi = k - 1 - pad_lo, k - 1 - pad_hi + r
    return np.pad(dilated, ((lo, hi), (lo, hi)))


FAST_AND_TEXTBOOK = pytest.mark.parametrize("fast", [True, False], ids=["fast", "textbook"])


def conv_single(x, w, g, fast, **kwargs):
    """hg.conv2d on one image, one input and one output channel: (z, dx, dw, db)."""
    def hand(x, w, b):
        return hg.conv2d(x[None, None], w[None, None], b, **kwargs)[0, 0]

    def reference(x, w, b):
        return hg.reference.conv2d(x[None, None], w[None, None], b, **kwargs)[0, 0]

    with hg.fast_paths(fast):
        z, (dx, dw, db) = hand_and_reference(hand, reference, (x, w, np.zeros(1)), g)
    return z, dx, dw, db


# --- docs/notes.md, note 003, and derivations §7: the sigmoid neuron ---------------------------


def test_note003_sigmoid_neuron():
    # notes.md "Note 003" [003.2]; derivations.md §7, Example 1.
    x, w, b = np.array([[-1.0, -2.0]]), np.array([[2.0, -3.0]]), np.array([-3.0])

    def neuron(dense, sigmoid):
        return lambda x, w, b: sigmoid(dense(x, w, b))[0, 0]

    f, (dx, dw, db) = hand_and_reference(
        neuron(hg.dense, hg.sigmoid), neuron(hg.reference.dense, hg.reference.sigmoid),
        (x, w, b), 1.0)
    ddot = float(f) * (1 - float(f))
    # The note's code, line by line, in Python floats.
    dot = 2 * -1 + -3 * -2 + -3
    assert dot == 1 and float(f) == pytest.approx(1 / (1 + math.exp(-dot)), rel=1e-15)
    np.testing.assert_allclose(dx[0], [2 * ddot, -3 * ddot], rtol=1e-14)
    np.testing.assert_allclose([*dw[0], *db], [-1 * ddot, -2 * ddot, 1.0 * ddot], rtol=1e-14)
    # The note's own rounding: output 0.73, local gradient (1 − 0.73)·0.73 ≈ 0.2.
    assert round(float(f), 2) == 0.73 and round((1 - 0.73) * 0.73, 1) == 0.2

    notes = section("notes.md", "## Note 003")
    derivations = section("derivations.md", "## §7")
    printed = [f"{float(f):.4f}", vector(dx[0], 4), vector([*dw[0], *db], 4)]
    assert printed == ["0.7311", r"[0.3932,\ -0.5898]", r"[-0.1966,\ -0.3932,\ 0.1966]"]
    assert_printed(notes, "notes.md, note 003", *printed, f"{ddot:.4f}")
    assert_printed(derivations, "derivations.md §7", *printed, f"{ddot:.5f}")


# --- note 003's staged computation -------------------------------------------------------------


def staged_stages(x, y):
    """The note's stages (1)-(8), forward and backward, in Python floats; returns the values
    derivations §7's table prints, by stage."""
    sig = lambda t: 1.0 / (1 + math.exp(-t))  # noqa: E731
    sigy = sig(y)
    num_ = x + sigy
    sigx = sig(x)
    xpy = x + y
    xpysqr = xpy**2
    den = sigx + xpysqr
    invden = 1.0 / den
    f = num_ * invden
    dnum, dinvden = invden, num_
    dden = (-1.0 / den**2) * dinvden
    dsigx = dxpysqr = dden
    dxpy = 2 * xpy * dxpysqr
    dx = dy = dxpy
    dx_sigx = (1 - sigx) * sigx * dsigx
    dx += dx_sigx
    dx += dnum
    dsigy = dnum
    dy_sigy = (1 - sigy) * sigy * dsigy
    dy += dy_sigy
    forward = [sigy, num_, sigx, xpy, xpysqr, den, invden, f]
    backward = [dy_sigy, dsigy, dx_sigx, dxpy, dxpy, dden, dden, dnum, dinvden]
    return f, dx, dy, forward, backward


def test_note003_staged_computation():
    # notes.md "Note 003" [003.3]; derivations.md §7, Example 2 (the stage table).
    def staged(sigmoid):
        return lambda x, y: (x + sigmoid(y)) / (sigmoid(x) + jnp.square(x + y))

    f, (dfdx, dfdy) = hand_and_reference(
        staged(hg.sigmoid), staged(hg.reference.sigmoid), (3.0, -4.0), 1.0)
    f_stages, dx_stages, dy_stages, forward, backward = staged_stages(3.0, -4.0)
    assert (float(f), float(dfdx), float(dfdy)) == pytest.approx(
        (f_stages, dx_stages, dy_stages), rel=1e-13)
    assert [f"{v:.4f}" for v in (f, dfdx, dfdy)] == ["1.5456", "2.0596", "1.5922"]

    notes = section("notes.md", "## Note 003")
    assert_printed(notes, "notes.md, note 003", "$f = 1.5456$",
                   r"$\partial f/\partial x = 2.0596$", r"$\partial f/\partial y = 1.5922$")
    table = section("derivations.md", "## §7")
    for v in [*forward, *backward]:
        if v != int(v):
            assert_printed(table, "derivations.md §7", f"{v:.6f}")
    assert_printed(table, "derivations.md §7", f"({float(dfdx):.6f}, {float(dfdy):.6f})",
                   "= 2.0596", "= 1.5922", "$f = 1.5456$")


# --- note 001 §7 and derivations §3.1: softmax + cross-entropy ---------------------------------


def test_note001_softmax_cross_entropy_example():
    # notes.md "Note 001" §7; derivations.md §3.1, "Worked example (note 001 §7)".
    a = np.array([0.0903, 0.2447, 0.665])  # the note's softmax output; the note gives no logits
    z = np.log(a)[None, :]  # softmax(log a) = a / Σa = a, since Σa = 1
    labels = jnp.array([1])  # the true class: the second of three
    _, (dz,) = hand_and_reference(
        lambda z: hg.softmax_cross_entropy(z, labels),
        lambda z: hg.reference.softmax_cross_entropy(z, labels), (z,), 1.0)
    np.testing.assert_allclose(hg.softmax(jnp.asarray(z))[0], a, rtol=1e-12)
    np.testing.assert_allclose(dz[0], [0.0903, -0.7553, 0.665], atol=1e-12)  # m = 1: a − y
    printed = tuple("[" + r",\ ".join(num(round(float(v), 4)) for v in row) + "]"
                    for row in (a, dz[0]))
    assert printed[1] == r"[0.0903,\ -0.7553,\ 0.665]"
    assert_printed(section("derivations.md", "### §3.1"), "derivations.md §3.1", *printed)
    assert_printed(section("notes.md", "## Note 001"), "notes.md, note 001", *printed)


# --- derivations §1.3: the dense layer with m = 2 ----------------------------------------------

DENSE = dict(  # derivations.md §1.3, "Worked example (m = 2 samples ...)"
    x=np.array([[1.0, 2.0], [3.0, -1.0]]),
    w=np.array([[1.0, 0.0], [2.0, -1.0]]),
    b=np.array([0.5, -1.0]),
    y=np.array([[1.0, 0.0], [2.0, 5.0]]),
)


def test_dense_m2_example_notes_dZ_and_code_g_give_the_same_dW_db():
    x, w, b, y = (DENSE[k] for k in ("x", "w", "b", "y"))
    m = x.shape[0]

    def loss(dense, squared_error):
        return lambda x, w, b: squared_error(dense(x, w, b), jnp.asarray(y))

    J, (dx, dw, db) = hand_and_reference(
        loss(hg.dense, hg.squared_error),
        loss(hg.reference.dense, hg.reference.squared_error), (x, w, b), 1.0)
    z = hg.dense(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    _, pullback = jax.vjp(lambda z: hg.squared_error(z, jnp.asarray(y)), z)
    (g,) = pullback(jnp.asarray(1.0))  # the cotangent the dense layer receives
    # The notes' way, in columns (note 000 [000.2], [000.3]; note 002 eqs. 79-80 with
    # per-sample dZ): dZ = Z − Y, dW = dZ·A_prevᵀ/m, db = Σ_cols dZ/m, dA_prev = Wᵀ·dZ.
    A_prev, Z, Y = x.T, np.asarray(z).T, y.T
    dZ = Z - Y
    dW_notes = dZ @ A_prev.T / m
    db_notes = dZ.sum(axis=1, keepdims=True) / m
    dA_prev = w.T @ dZ
    np.testing.assert_allclose(g, dZ.T / m, **EXACT)  # g = dZᵀ/m
    np.testing.assert_allclose(dw, dW_notes, **EXACT)  # the same dW ...
    np.testing.assert_allclose(db, db_notes[:, 0], **EXACT)  # ... and db
    np.testing.assert_allclose(dx, dA_prev.T / m, **EXACT)  # dx = dA_prevᵀ/m
    # Note 002 eq. 77 read literally (dA = ∂J/∂A, 1/m inside) and eq. 79's 1/m again: half.
    dW_slip = (dZ / m) @ A_prev.T / m
    np.testing.assert_allclose(dW_slip, dw / 2, **EXACT)

    want = dict(
        z=[[1.5, -1], [3.5, 6]], dZ=[[0.5, 1.5], [-1, 1]], dW=[[2.5, -0.25], [1, -1.5]],
        db=[[1], [0]], dA_prev=[[-1.5, 3.5], [1, -1]], g=[[0.25, -0.5], [0.75, 0.5]],
        dx=[[-0.75, 0.5], [1.75, -0.5]], slip=[[1.25, -0.125], [0.5, -0.75]])
    got = dict(z=z, dZ=dZ, dW=dw, db=db_notes, dA_prev=dA_prev, g=g, dx=dx, slip=dW_slip)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], **EXACT, err_msg=name)
    assert float(J) == 1.125

    text = section("derivations.md", "### §1.3")
    assert_printed(text, "derivations.md §1.3", *(pmatrix(want[k]) for k in want),
                   pmatrix(x), pmatrix(w), pmatrix(y), "= 1.125",
                   r"b = (0.5,\ -1)", r"= (1,\ 0)")


# --- derivations §4.2: the stride-1 convolution example -----------------------------------------

CONV_X = np.array([[1, 2, 0, 1], [0, 1, 3, 1], [2, 1, 0, 2], [1, 0, 1, 3]], float)  # §4.2
CONV_W = np.array([[1, 2], [-1, 0]], float)


@FAST_AND_TEXTBOOK
def test_conv_stride1_example(fast):
    # derivations.md §4.2 "Worked example", §4.4 (dw) and §4.5 (db).
    g = np.array([[1, 0, -1], [2, 1, 0], [0, -1, 1]], float)
    z, dx, dw, db = conv_single(CONV_X, CONV_W, g, fast)
    g_full = np.pad(g, 1)
    np.testing.assert_array_equal(z, [[5, 1, -1], [0, 6, 5], [3, 1, 3]])
    np.testing.assert_array_equal(
        dx, [[1, 2, -1, -2], [1, 5, 3, 0], [-2, -2, -1, 2], [0, 1, -1, 0]])
    np.testing.assert_array_equal(correlate(g_full, np.rot90(CONV_W, 2)), dx)  # the rot180 rule
    # the table: x[1,1] is read by outputs (1,1), (1,0), (0,1), (0,0) through w[0,0] … w[1,1]
    assert g[1, 1] * CONV_W[0, 0] + g[1, 0] * CONV_W[0, 1] + g[0, 1] * CONV_W[1, 0] \
        + g[0, 0] * CONV_W[1, 1] == dx[1, 1] == 5
    assert dx[0, 0] == g[0, 0] * CONV_W[0, 0] == 1
    np.testing.assert_array_equal(dw, [[1, 8], [3, 4]])
    np.testing.assert_array_equal(db, [3])
    assert sum(g[i, j] * CONV_X[i, j + 1] for i in range(3) for j in range(3)) == 8

    text = section("derivations.md", "### §4.2")
    assert_printed(text, "derivations.md §4.2", pmatrix(CONV_X), pmatrix(CONV_W), pmatrix(z),
                   pmatrix(g), pmatrix(g_full), pmatrix(np.rot90(CONV_W, 2)), pmatrix(dx),
                   pmatrix(g_full[1:3, 1:3]))
    assert_printed(section("derivations.md", "### §4.4"), "derivations.md §4.4", pmatrix(dw),
                   "= 8")
    assert_printed(section("derivations.md", "### §4.5"), "derivations.md §4.5", "= 3$")


# --- derivations §4.2: two channels, the in/out swap --------------------------------------------

TWO_X = np.array([[[1, 2, 0], [0, 1, 3], [2, 1, 1]],
                  [[0, 1, 1], [2, 0, 1], [1, 3, 0]]], float)  # x[c]
TWO_W = np.array([[[[1, 2], [0, 1]], [[0, -1], [1, 0]]],
                  [[[2, 0], [1, -1]], [[1, 1], [0, 2]]]], float)  # w[o, c]
TWO_G = np.array([[[1, -1], [0, 2]], [[2, 1], [-1, 1]]], float)  # g[o]


@FAST_AND_TEXTBOOK
def test_conv_two_channel_example_swaps_in_and_out(fast):
    # derivations.md §4.2, "Worked example with two channels: the in/out swap".
    with hg.fast_paths(fast):
        z, (dx, _) = hand_and_reference(
            lambda x, w: hg.conv2d(x[None], w)[0],
            lambda x, w: hg.reference.conv2d(x[None], w)[0], (TWO_X, TWO_W), TWO_G)
    np.testing.assert_array_equal(z, [[[7, 4], [4, 10]], [[2, 6], [9, 3]]])
    # z[o] = Σ_c x[c] ⋆ w[o, c]: along row o of the table
    for o in range(2):
        np.testing.assert_array_equal(z[o], sum(correlate(TWO_X[c], TWO_W[o, c]) for c in range(2)))
    # dx[c] = Σ_o g̃[o] ⋆ rot180(w[o, c]): down column c
    part = {(o, c): correlate(np.pad(TWO_G[o], 1), np.rot90(TWO_W[o, c], 2))
            for o in range(2) for c in range(2)}
    want_parts = {(0, 0): [[1, 1, -2], [0, 3, 3], [0, 0, 2]],
                  (1, 0): [[4, 2, 0], [0, 1, -1], [-1, 2, -1]],
                  (0, 1): [[0, -1, 1], [1, -1, -2], [0, 2, 0]],
                  (1, 1): [[2, 3, 1], [-1, 4, 3], [0, -2, 2]]}
    for key, want in want_parts.items():
        np.testing.assert_array_equal(part[key], want, err_msg=str(key))
    want_dx = [[[5, 3, -2], [0, 4, 2], [-1, 2, 1]], [[2, 2, 2], [0, 3, 1], [0, 0, 2]]]
    np.testing.assert_array_equal(dx, want_dx)
    for c in range(2):
        np.testing.assert_array_equal(dx[c], part[0, c] + part[1, c])
    # Without the swap — rot180(w[c, o]) — channel 0 comes out wrong.
    wrong = sum(correlate(np.pad(TWO_G[o], 1), np.rot90(TWO_W[0, o], 2)) for o in range(2))
    np.testing.assert_array_equal(wrong, [[1, -1, -3], [2, 5, 2], [-1, 1, 2]])
    assert not np.array_equal(wrong, dx[0])

    text = section("derivations.md", "### §4.2")
    snippets = [pmatrix(a) for a in (*TWO_X, *TWO_G, *z, *dx, wrong, *want_parts.values())]
    snippets += [pmatrix(TWO_W[o, c]) for o in range(2) for c in range(2)]
    snippets += [pmatrix(np.rot90(TWO_W[o, c], 2)) for o in range(2) for c in range(2)]
    assert_printed(text, "derivations.md §4.2", *snippets)


# --- derivations §4.3: stride 2, windows that tile ----------------------------------------------


@FAST_AND_TEXTBOOK
def test_conv_stride2_example(fast):
    # derivations.md §4.3, "Worked example with stride 2".
    g = np.array([[1, -1], [2, 3]], float)
    z, dx, _, _ = conv_single(CONV_X, CONV_W, g, fast, stride=2)
    g_full = error_map_for_dx(g, 2, 2, 0, 0, 4)
    np.testing.assert_array_equal(z, [[5, -1], [3, 3]])
    np.testing.assert_array_equal(g_full, [[0, 0, 0, 0, 0], [0, 1, 0, -1, 0], [0, 0, 0, 0, 0],
                                           [0, 2, 0, 3, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        dx, [[1, 2, -1, -2], [-1, 0, 1, 0], [2, 4, 3, 6], [-2, 0, -3, 0]])
    np.testing.assert_array_equal(correlate(g_full, np.rot90(CONV_W, 2)), dx)
    np.testing.assert_array_equal(dx[2:, 2:], 3 * CONV_W)  # windows tile: each block is g[i,j]·w
    # H = W = 5: r = 1, the high padding becomes 2 and the fifth row and column are zero.
    x5 = np.pad(CONV_X, ((0, 1), (0, 1)), constant_values=7.0)
    z5, dx5, _, _ = conv_single(x5, CONV_W, g, fast, stride=2)
    np.testing.assert_array_equal(z5, z)
    np.testing.assert_array_equal(dx5[:4, :4], dx)
    assert not dx5[4, :].any() and not dx5[:, 4].any()
    assert error_map_for_dx(g, 2, 2, 0, 0, 5).shape == (6, 6)  # low 1, high 1 + r = 2

    text = section("derivations.md", "### §4.3")
    assert_printed(text, "derivations.md §4.3", pmatrix(z), pmatrix(g), pmatrix(g_full),
                   pmatrix(dx))


# --- derivations §4.3-§4.5: k = 3, s = 2, padding 1 — overlapping windows ------------------------

OVERLAP_X = np.array([[1, 0, 2, 1, 0], [2, 1, 0, 1, 3], [0, 1, 1, 2, 1], [1, 3, 0, 1, 2],
                      [2, 0, 1, 0, 1]], float)
OVERLAP_W = np.array([[1, 0, -1], [2, 1, 0], [1, -1, 2]], float)
OVERLAP_G = np.array([[2, -1, 1], [1, 3, 0], [0, 1, -2]], float)


@FAST_AND_TEXTBOOK
def test_conv_overlapping_strided_padded_example(fast):
    # derivations.md §4.3 "Worked example with overlapping strided windows and padding",
    # its dw in §4.4 and db in §4.5.
    x, w, g = OVERLAP_X, OVERLAP_W, OVERLAP_G
    z, dx, dw, db = conv_single(x, w, g, fast, stride=2, padding=1)
    x_pad = np.pad(x, 1)
    g_full = error_map_for_dx(g, 3, 2, 1, 1, 5)
    np.testing.assert_array_equal(z, [[1, 5, 0], [4, 8, 5], [-1, 3, 2]])
    assert np.sum(x_pad[:3, :3] * w) == z[0, 0] == 1
    np.testing.assert_array_equal(g_full.shape, (7, 7))
    np.testing.assert_array_equal(g_full[1::2, 1::2], g)  # dilated by 2, padded 1 and 1
    assert not g_full[::2, :].any() and not g_full[:, ::2].any()
    want_dx = [[2, -2, -1, 2, 1], [-2, 5, 1, -4, -1], [1, 6, 3, 0, 0], [-1, 6, -3, 3, 0],
               [0, 2, 1, -4, -2]]
    np.testing.assert_array_equal(dx, want_dx)
    np.testing.assert_array_equal(correlate(g_full, np.rot90(w, 2)), dx)  # the rule of §4.3
    # The table: x[1,1] = x_pad[2,2] is read by four windows; gradients add.
    terms = [g[0, 0] * w[2, 2], g[0, 1] * w[2, 0], g[1, 0] * w[0, 2], g[1, 1] * w[0, 0]]
    assert terms == [4, -1, -1, 3] and sum(terms) == dx[1, 1] == 5
    assert dx[0, 0] == g[0, 0] * w[1, 1] == 2
    assert dx[0, 1] == g[0, 0] * w[1, 2] + g[0, 1] * w[1, 0] == -2
    # dw[a, b] = Σ g[i, j]·x_pad[2i + a, 2j + b]; db = Σ g.
    np.testing.assert_array_equal(dw, [[4, -2, 5], [4, 2, 6], [9, 8, 7]])
    products = [g[1, 1] * x_pad[2, 2], g[1, 2] * x_pad[2, 4], g[2, 1] * x_pad[4, 2],
                g[2, 2] * x_pad[4, 4]]
    assert products == [3, 0, 3, -2] and sum(products) == dw[0, 0] == 4
    np.testing.assert_array_equal(db, [5])

    text = section("derivations.md", "### §4.3")
    assert_printed(text, "derivations.md §4.3", pmatrix(x), pmatrix(x_pad), pmatrix(w),
                   pmatrix(z), pmatrix(g), pmatrix(g_full), pmatrix(np.rot90(w, 2)),
                   pmatrix(dx), pmatrix(x_pad[:3, :3]), "dx[1,1] = 5", "= 2$", "= -2$")
    assert_printed(section("derivations.md", "### §4.4"), "derivations.md §4.4", pmatrix(dw),
                   "= 3 + 0 + 3 - 2 = 4")
    assert_printed(section("derivations.md", "### §4.5"), "derivations.md §4.5",
                   "2 - 1 + 1 + 1 + 3 + 0 + 0 + 1 - 2 = 5")


# --- derivations §5.1-§5.2: pooling ---------------------------------------------------------------

POOL_X = np.array([[1, 3, 2, 1], [4, 2, 0, 1], [5, 1, 2, 2], [0, 6, 2, 1]], float)
POOL_G = np.array([[1, 2], [3, 4]], float)


def pool_single(pool, reference, g, fast, **kwargs):
    with hg.fast_paths(fast):
        z, (dx,) = hand_and_reference(
            lambda x: pool(x[None, None], **kwargs)[0, 0],
            lambda x: reference(x[None, None], **kwargs)[0, 0], (POOL_X,), g)
    return z, dx


@FAST_AND_TEXTBOOK
def test_max_pool_example(fast):
    # derivations.md §5.1, "Worked example (2×2 window, stride 2)" and its stride-1 variant.
    z, dx = pool_single(hg.max_pool2d, hg.reference.max_pool2d, POOL_G, fast, window=2)
    np.testing.assert_array_equal(z, [[4, 2], [6, 2]])
    np.testing.assert_array_equal(dx, [[0, 0, 2, 0], [1, 0, 0, 0], [0, 0, 4, 0], [0, 3, 0, 0]])
    # idx: the row-major offset a·k_w + b of each window's first maximum
    idx = [[int(np.argmax(POOL_X[2 * i:2 * i + 2, 2 * j:2 * j + 2])) for j in range(2)]
           for i in range(2)]
    assert idx == [[2, 0], [3, 0]]
    ones = np.ones((3, 3))
    z1, dx1 = pool_single(hg.max_pool2d, hg.reference.max_pool2d, ones, fast, window=2, stride=1)
    np.testing.assert_array_equal(z1, [[4, 3, 2], [5, 2, 2], [6, 6, 2]])
    np.testing.assert_array_equal(dx1, [[0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 2, 0], [0, 2, 0, 0]])
    assert dx1[2, 2] == dx1[3, 1] == 2 and dx1.sum() == 9

    text = section("derivations.md", "### §5.1")
    assert_printed(text, "derivations.md §5.1", pmatrix(POOL_X), pmatrix(z), pmatrix(idx),
                   pmatrix(POOL_G), pmatrix(dx), pmatrix(z1), pmatrix(dx1), "sum 9")


@FAST_AND_TEXTBOOK
def test_mean_pool_example(fast):
    # derivations.md §5.2: each input gets g/K; the sum is preserved; copying would give 4×.
    z, dx = pool_single(hg.avg_pool2d, hg.reference.avg_pool2d, POOL_G, fast, window=2)
    np.testing.assert_array_equal(z, [[2.5, 1], [3, 1.75]])
    want = [[0.25, 0.25, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 1, 1], [0.75, 0.75, 1, 1]]
    np.testing.assert_array_equal(dx, want)
    assert dx.sum() == POOL_G.sum() == 10 and 4 * POOL_G.sum() == 40

    text = section("derivations.md", "### §5.2")
    assert_printed(text, "derivations.md §5.2", pmatrix(POOL_G), pmatrix(dx), "sum $10",
                   "would give 40")


# --- derivations §8.1: the substitution that gives batch norm's compact dx ----------------------


def stable_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


@pytest.mark.parametrize("shape, axis", [((7, 3), 1), ((1, 5), 1), ((4, 2, 3, 5), 1)],
                         ids=["(7,3)", "batch1-(1,5)", "nchw-(4,2,3,5)"])
def test_batch_norm_node_by_node_equals_compact_dx(shape, axis):
    # derivations.md §8.1: dx = ĝ/ρ + dvar·2(x − μ)/n_R + dμ/n_R (three paths), and after the
    # substitution dx = (1/(n_R ρ))(n_R ĝ − Σĝ − x̂ Σĝx̂); both equal handgrad's and autodiff's.
    seed = stable_seed(f"batch_norm_substitution-{shape}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 1.7 + 0.4
    gamma = rng.uniform(0.5, 2.0, shape[axis])
    beta = rng.standard_normal(shape[axis])
    g = rng.standard_normal(shape)
    eps = 1e-5
    _, (dx, dgamma, dbeta) = hand_and_reference(
        lambda x, gm, bt: hg.batch_norm(x, gm, bt, axis=axis, eps=eps)[0],
        lambda x, gm, bt: hg.reference.batch_norm(x, gm, bt, axis=axis, eps=eps)[0],
        (x, gamma, beta), g)

    reduce = tuple(i for i in range(len(shape)) if i != axis)
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    n_r = x.size // shape[axis]
    mu = x.mean(axis=reduce, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=reduce, keepdims=True)
    rho = np.sqrt(var + eps)
    x_hat = (x - mu) / rho
    g_hat = gamma.reshape(bshape) * g
    total = partial(np.sum, axis=reduce, keepdims=True)
    d_rho = -total(g_hat * x_hat) / rho
    d_var = d_rho / (2 * rho)
    d_mu = -total(g_hat) / rho + d_var * (-2 / n_r) * total(x - mu)
    three_paths = g_hat / rho + d_var * 2 * (x - mu) / n_r + d_mu / n_r
    # the two substituted terms, as §8.1 writes them
    np.testing.assert_allclose(d_var * 2 * (x - mu) / n_r,
                               -x_hat / (n_r * rho) * total(g_hat * x_hat), rtol=1e-12,
                               atol=1e-14, err_msg=f"seed {seed}")
    np.testing.assert_allclose(d_mu / n_r, -total(g_hat) / (n_r * rho), rtol=1e-12, atol=1e-14,
                               err_msg=f"seed {seed}")
    compact = (n_r * g_hat - total(g_hat) - x_hat * total(g_hat * x_hat)) / (n_r * rho)
    for name, got in (("three paths", three_paths), ("compact", compact)):
        np.testing.assert_allclose(got, dx, rtol=1e-10, atol=1e-12, err_msg=f"{name}, seed {seed}")
    np.testing.assert_allclose(dgamma, total(g * x_hat).reshape(-1), rtol=1e-12,
                               err_msg=f"seed {seed}")
    np.testing.assert_allclose(dbeta, total(g).reshape(-1), rtol=1e-12, err_msg=f"seed {seed}")
    np.testing.assert_allclose(total(dx), 0, atol=1e-10, err_msg=f"Σ_R dx, seed {seed}")


# --- derivations §9: the Hessian-vector product through a saved residual -------------------------


def test_hvp_through_the_sigmoid_residual_and_with_it_stopped():
    # derivations.md §9: hvp of Σσ(x)² at x = [0.3, −1.2, 2.0], v = [1, 2, −1].
    x = jnp.array([0.3, -1.2, 2.0])
    v = jnp.array([1.0, 2.0, -1.0])
    hv = hg.hvp(lambda x: jnp.sum(hg.sigmoid(x) ** 2), x, v)
    want = jax.hessian(lambda x: jnp.sum(hg.reference.sigmoid(x) ** 2))(x) @ v
    np.testing.assert_allclose(hv, want, rtol=1e-12)

    @jax.custom_vjp
    def stopped_sigmoid(z):
        return jax.nn.sigmoid(z)

    def stopped_fwd(z):
        a = jax.nn.sigmoid(z)
        return a, jax.lax.stop_gradient(a)  # the mistake §9 warns about

    stopped_sigmoid.defvjp(stopped_fwd, lambda a, g: (g * a * (1 - a),))
    wrong = hg.hvp(lambda x: jnp.sum(stopped_sigmoid(x) ** 2), x, v)
    printed = [f"[{', '.join(f'{t:.4f}' for t in np.asarray(r))}]" for r in (hv, wrong)]
    assert printed == ["[0.0777, 0.2150, 0.1188]", "[0.1195, 0.1266, -0.0220]"]
    assert_printed(section("derivations.md", "## §9"), "derivations.md §9", *printed,
                   "[0.3, -1.2, 2.0]", "[1, 2, -1]")
