"""check_vjp must catch wrong backward passes, and say what is wrong.

Each test builds a small, deliberately broken ``jax.custom_vjp`` (a dropped ``1/m``, a missing
transpose, a sign error, a float32 cotangent, a ``stop_gradient`` on a residual, a rule that is
wrong only when batched) and asserts that ``hg.check_vjp`` reports it — and, as controls, that
the correct rules on the same random inputs pass.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import custom_batching

import handgrad as hg


def _normal(seed, shape, dtype=jnp.float64):
    # numpy, not jax.random: eager jax.random compiles a program per shape (slow)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _failed(result, prefix):
    """The names of the failing comparisons whose name starts with `prefix`."""
    return [c.what for c in result.comparisons if c.what.startswith(prefix) and not c.ok]


# --- a mean loss whose backward mishandles 1/m ---------------------------------------------


def _mean_sq_ref(x):
    return jnp.sum(x * x) / x.shape[0]


def _mean_sq_with(scale_of_m):
    """J = Σ x² / m, with a backward that scales 2x by scale_of_m(m) instead of 1/m."""

    @jax.custom_vjp
    def mean_sq(x):
        return _mean_sq_ref(x)

    def bwd(x, g):
        return (g * 2 * x * scale_of_m(x.shape[0]),)

    mean_sq.defvjp(lambda x: (mean_sq(x), x), bwd)
    return mean_sq


def test_correct_mean_loss_passes():
    result = hg.check_vjp(_mean_sq_with(lambda m: 1 / m), _mean_sq_ref, _normal(0, (5, 3)))
    assert result.ok, str(result)


@pytest.mark.parametrize("scale_of_m", [lambda m: 1.0, lambda m: 1 / m**2, lambda m: 2 / m],
                         ids=["drops-1/m", "applies-1/m-twice", "doubles"])
def test_mean_loss_with_wrong_1_over_m_is_caught(scale_of_m):
    result = hg.check_vjp(_mean_sq_with(scale_of_m), _mean_sq_ref, _normal(1, (5, 3)))
    assert not result.ok
    assert _failed(result, "vjp arg 0 vs autodiff"), str(result)
    assert _failed(result, "vjp arg 0 vs finite diff"), str(result)
    assert "FAIL" in str(result)


# --- a dense layer with a missing transpose ------------------------------------------------


def _dense_with(bwd):
    @jax.custom_vjp
    def dense(x, w):
        return x @ w.T

    dense.defvjp(lambda x, w: (dense(x, w), (x, w)), bwd)
    return dense


def _dense_bwd_right(res, g):
    x, w = res
    return g @ w, g.T @ x


def _dense_bwd_dw_transposed(res, g):
    x, w = res
    return g @ w, x.T @ g  # (n_in, n_out): the transpose of dW


def _dense_bwd_dx_untransposed(res, g):
    x, w = res
    return g @ w.T, g.T @ x  # W instead of Wᵀ (notes: dA_prev = Wᵀ·dZ); computes if W is square


def _dense_bwd_dx_columns(res, g):
    x, w = res
    return w.T @ g.T, g.T @ x  # the notes' column layout Wᵀ·dZ, not transposed back: (n_in, m)


def test_correct_dense_passes_non_square():
    x, w = _normal(2, (4, 3)), _normal(3, (2, 3))
    result = hg.check_vjp(_dense_with(_dense_bwd_right), hg.reference.dense, x, w)
    assert result.ok, str(result)


@pytest.mark.parametrize("bwd", [_dense_bwd_dw_transposed, _dense_bwd_dx_untransposed],
                         ids=["dW", "dx"])
def test_missing_transpose_is_caught_on_values_with_square_weights(bwd):
    # Square W: the wrong cotangent has the right shape, so only its values can give it away.
    x, w = _normal(4, (5, 3)), _normal(5, (3, 3))
    result = hg.check_vjp(_dense_with(bwd), hg.reference.dense, x, w)
    assert not result.ok
    wrong_arg = 1 if bwd is _dense_bwd_dw_transposed else 0
    assert _failed(result, f"vjp arg {wrong_arg} vs autodiff"), str(result)
    assert _failed(result, f"vjp arg {wrong_arg} vs finite diff"), str(result)
    assert not _failed(result, f"vjp arg {1 - wrong_arg}"), str(result)


def test_bias_gradient_averaged_instead_of_summed_is_caught():
    # db = mean over rows: the 1/m applied a second time (the loss's cotangent already has it).
    @jax.custom_vjp
    def dense(x, w, b):
        return hg.reference.dense(x, w, b)

    def bwd(res, g):
        x, w = res
        return g @ w, g.T @ x, jnp.mean(g, axis=0)

    dense.defvjp(lambda x, w, b: (dense(x, w, b), (x, w)), bwd)
    x, w, b = _normal(14, (6, 3)), _normal(15, (2, 3)), _normal(16, (2,))
    result = hg.check_vjp(dense, hg.reference.dense, x, w, b)
    assert [c.what for c in result.comparisons if not c.ok] == [
        "vjp arg 2 vs autodiff", "vjp arg 2 vs finite diff"], str(result)


@pytest.mark.parametrize("bwd", [_dense_bwd_dw_transposed, _dense_bwd_dx_columns],
                         ids=["dW", "dx"])
def test_missing_transpose_non_square_is_reported_not_raised(bwd):
    x, w = _normal(6, (4, 3)), _normal(7, (2, 3))  # n_in=3 != n_out=2: wrong shape
    result = hg.check_vjp(_dense_with(bwd), hg.reference.dense, x, w)
    assert not result.ok
    assert "shape" in str(result), str(result)


# --- sign errors ---------------------------------------------------------------------------


def _elementwise(forward, derivative):
    @jax.custom_vjp
    def op(z):
        return forward(z)

    op.defvjp(lambda z: (op(z), z), lambda z, g: (g * derivative(z),))
    return op


def _dsigmoid(z):
    a = jax.nn.sigmoid(z)
    return a * (1 - a)


@pytest.mark.parametrize(
    "forward, derivative",
    [
        (jax.nn.sigmoid, lambda z: -_dsigmoid(z)),
        (jnp.tanh, lambda z: jnp.tanh(z) ** 2 - 1),
        (jnp.sin, lambda z: -jnp.cos(z)),
    ],
    ids=["sigmoid", "tanh", "sin"],
)
def test_sign_error_is_caught(forward, derivative):
    result = hg.check_vjp(_elementwise(forward, derivative), forward, _normal(8, (3, 4)))
    assert not result.ok
    assert _failed(result, "vjp arg 0 vs autodiff"), str(result)
    assert _failed(result, "vjp arg 0 vs finite diff"), str(result)
    worst = result.worst("vjp arg 0 vs autodiff")
    assert worst.rel_err == pytest.approx(2.0, rel=1e-6)  # −g' vs g': off by twice the gradient


def test_wrong_forward_is_caught():
    op = _elementwise(lambda z: jnp.sin(z) + 1e-3, jnp.cos)
    result = hg.check_vjp(op, jnp.sin, _normal(9, (6,)))
    assert _failed(result, "forward"), str(result)
    assert not _failed(result, "vjp"), str(result)  # the backward itself is right


def test_finite_differences_catch_an_error_the_reference_shares():
    # The op passed as its own reference: autodiff agrees with the wrong rule, FD does not.
    op = _elementwise(jnp.sin, lambda z: 0.5 * jnp.cos(z))
    result = hg.check_vjp(op, op, _normal(10, (3, 5)))
    assert not _failed(result, "vjp arg 0 vs autodiff"), str(result)
    assert _failed(result, "vjp arg 0 vs finite diff"), str(result)
    assert not result.ok


# --- dtype ---------------------------------------------------------------------------------


def test_float32_cotangent_for_float64_primal_is_a_problem():
    @jax.custom_vjp
    def op(z):
        return jnp.sin(z)

    op.defvjp(lambda z: (op(z), z), lambda z, g: ((g * jnp.cos(z)).astype(jnp.float32),))
    result = hg.check_vjp(op, jnp.sin, _normal(11, (5,)))
    assert not result.ok
    assert result.problems, str(result)
    assert "float32" in result.problems[0] and "float64" in result.problems[0]
    assert "problem: cotangent of arg 0 is float32[5], primal is float64[5]" in str(result)


def test_correct_dtype_has_no_problems():
    result = hg.check_vjp(_elementwise(jnp.sin, jnp.cos), jnp.sin, _normal(11, (5,)))
    assert result.ok and not result.problems, str(result)


# --- second order: a stop_gradient on a residual -------------------------------------------


@jax.custom_vjp
def _sigmoid_stopped(z):
    return jax.nn.sigmoid(z)


def _sigmoid_stopped_fwd(z):
    a = _sigmoid_stopped(z)
    return a, jax.lax.stop_gradient(a)  # right values, but blind to grad-of-grad


_sigmoid_stopped.defvjp(_sigmoid_stopped_fwd, lambda a, g: (g * a * (1 - a),))


def test_stop_gradient_residual_passes_first_order_and_fails_second_order():
    z = _normal(12, (3, 4))
    first = hg.check_vjp(_sigmoid_stopped, hg.reference.sigmoid, z)
    assert first.ok, str(first)  # first order cannot see it
    second = hg.check_vjp(_sigmoid_stopped, hg.reference.sigmoid, z, second_order=True,
                          finite_differences=False)
    assert not second.ok
    assert _failed(second, "grad-of-grad arg 0"), str(second)
    assert not _failed(second, "vjp"), str(second)


def test_hand_sigmoid_passes_second_order():
    z = _normal(12, (3, 4))
    result = hg.check_vjp(hg.sigmoid, hg.reference.sigmoid, z, second_order=True)
    assert result.ok, str(result)
    assert any(c.what.startswith("grad-of-grad") for c in result.comparisons)


# --- vmap: a rule that is wrong only when batched ------------------------------------------


@custom_batching.custom_vmap
def _times_cos(z, g):
    return g * jnp.cos(z)


@_times_cos.def_vmap
def _times_cos_batched(axis_size, in_batched, z, g):
    return -(g * jnp.cos(z)), in_batched[0] or in_batched[1]  # sign flips under vmap only


def test_rule_wrong_only_under_vmap_is_caught_with_vmap_true():
    @jax.custom_vjp
    def op(z):
        return jnp.sin(z)

    op.defvjp(lambda z: (op(z), z), lambda z, g: (_times_cos(z, g),))
    z = _normal(13, (3, 4))
    plain = hg.check_vjp(op, jnp.sin, z)
    assert plain.ok, str(plain)
    batched = hg.check_vjp(op, jnp.sin, z, vmap=True, finite_differences=False)
    assert not batched.ok
    assert _failed(batched, "vmap example 0") and _failed(batched, "vmap example 1"), str(batched)


# --- correct ops pass, with every option on -------------------------------------------------


@pytest.mark.parametrize(
    "op, ref, shapes",
    [
        (hg.dense, hg.reference.dense, ((4, 3), (2, 3), (2,))),
        (hg.squared_error, hg.reference.squared_error, ((5, 2), (5, 2))),
    ],
    ids=["dense", "squared_error"],
)
def test_correct_hand_ops_pass_every_check(op, ref, shapes):
    args = [_normal(20 + i, s) for i, s in enumerate(shapes)]
    result = hg.check_vjp(op, ref, *args, second_order=True, vmap=True,
                          key=jax.random.PRNGKey(7))
    assert result.ok, str(result)
    kinds = {c.what.split(" arg")[0].split(" vs")[0] for c in result.comparisons}
    assert {"forward", "vjp", "grad-of-grad", "vmap example 0"} <= kinds, kinds


# --- integer arguments are held fixed ------------------------------------------------------


def _labels(seed, m, k):
    return jnp.asarray(np.random.default_rng(seed).integers(0, k, (m,)), jnp.int32)


def test_integer_labels_are_held_fixed():
    logits, labels = _normal(30, (6, 4)), _labels(31, 6, 4)
    result = hg.check_vjp(hg.softmax_cross_entropy, hg.reference.softmax_cross_entropy,
                          logits, labels, second_order=True, vmap=True)
    assert result.ok, str(result)
    assert any(c.what == "vjp arg 0 vs finite diff" for c in result.comparisons)
    assert not any("arg 1" in c.what for c in result.comparisons), str(result)


def test_integer_labels_still_matter_a_backward_ignoring_them_is_caught():
    @jax.custom_vjp
    def ce(logits, labels):
        return hg.reference.softmax_cross_entropy(logits, labels)

    def bwd(res, g):
        logits, _ = res
        return g * jax.nn.softmax(logits) / logits.shape[0], None  # forgot "− y"

    ce.defvjp(lambda z, y: (ce(z, y), (z, y)), bwd)
    result = hg.check_vjp(ce, hg.reference.softmax_cross_entropy,
                          _normal(32, (6, 4)), _labels(33, 6, 4))
    assert _failed(result, "vjp arg 0 vs autodiff"), str(result)


def test_no_floating_argument_is_an_error():
    with pytest.raises(ValueError, match="no floating argument"):
        hg.check_vjp(lambda y: y, lambda y: y, jnp.arange(3))


# --- finite differences need float64 -------------------------------------------------------


def test_finite_differences_are_skipped_and_said_so_without_x64():
    assert jax.config.read("jax_enable_x64")
    try:
        with jax.enable_x64(False):
            z = jnp.asarray(np.random.default_rng(40).standard_normal((3, 4)))
            assert z.dtype == jnp.float32
            good = hg.check_vjp(hg.sigmoid, hg.reference.sigmoid, z)
            bad = hg.check_vjp(_elementwise(jax.nn.sigmoid, lambda z: -_dsigmoid(z)),
                               jax.nn.sigmoid, z)
    finally:
        assert jax.config.read("jax_enable_x64"), "the x64 context did not restore the flag"
    for result in (good, bad):
        assert result.dtype == "float32"
        assert any("finite differences" in s and "float64" in s for s in result.skipped)
        assert not any("finite diff" in c.what for c in result.comparisons)
        assert "skipped: finite differences" in str(result)
    assert good.ok, str(good)
    assert not bad.ok and _failed(bad, "vjp arg 0 vs autodiff"), str(bad)


def test_finite_differences_off_is_not_reported_as_skipped():
    result = hg.check_vjp(hg.tanh, hg.reference.tanh, _normal(41, (3,)),
                          finite_differences=False)
    assert result.ok and not result.skipped, str(result)


# --- the report: the worst index, a readable string ----------------------------------------


def test_worst_index_and_readable_report():
    bad_at = (2, 3)

    def derivative(z):
        return jnp.cos(z).at[bad_at].add(0.5)

    op = _elementwise(jnp.sin, derivative)
    z = _normal(50, (4, 5))
    result = hg.check_vjp(op, jnp.sin, z, key=jax.random.PRNGKey(3))
    assert not result.ok
    worst = result.worst("vjp arg 0 vs autodiff")
    assert worst is not None and not worst.ok
    assert worst.worst_index == bad_at
    assert worst.max_abs_err > 1e-3
    assert result.worst("vjp arg 0 vs finite diff").worst_index == bad_at
    text = str(result)
    assert text.splitlines()[0] == "check_vjp(op, float64): FAIL"
    line = next(x for x in text.splitlines() if "vjp arg 0 vs autodiff" in x)
    assert "at (2, 3)" in line and line.endswith("FAIL") and "rtol=1e-10" in line
    assert not bool(result)


def test_name_appears_in_the_report():
    result = hg.check_vjp(hg.relu, hg.reference.relu, _normal(51, (3,)), name="my_relu")
    assert str(result).startswith("check_vjp(my_relu, float64): PASS")


# --- large arguments: directional finite differences ---------------------------------------

# One row more than check_vjp's default element-wise limit, whatever that default is.
_MAX_FD = inspect.signature(hg.check_vjp).parameters["max_fd_elements"].default
_LARGE = (_MAX_FD // 16 + 1, 16)


def test_large_argument_uses_directions_and_passes_when_right():
    z = _normal(60, _LARGE)
    result = hg.check_vjp(hg.tanh, hg.reference.tanh, z)
    assert result.ok, str(result)
    assert z.size > _MAX_FD
    names = [c.what for c in result.comparisons if "finite diff" in c.what]
    assert names == ["vjp arg 0 vs finite diff (4 directions)"], names


def test_large_argument_directional_mode_catches_a_sign_error():
    op = _elementwise(jnp.tanh, lambda z: jnp.tanh(z) ** 2 - 1)
    z = _normal(61, _LARGE)
    # The op as its own reference: only the directional finite differences can see the error.
    result = hg.check_vjp(op, op, z, fd_directions=3)
    assert not _failed(result, "vjp arg 0 vs autodiff"), str(result)
    assert _failed(result, "vjp arg 0 vs finite diff (3 directions)"), str(result)
    assert not result.ok


def test_large_argument_directional_mode_catches_an_error_in_one_element():
    op = _elementwise(jnp.sin, lambda z: jnp.cos(z).at[7, 3].multiply(3.0))
    z = _normal(62, _LARGE)
    result = hg.check_vjp(op, op, z, fd_directions=4)
    assert _failed(result, "vjp arg 0 vs finite diff (4 directions)"), str(result)


def test_small_max_fd_elements_switches_to_directions():
    result = hg.check_vjp(hg.sigmoid, hg.reference.sigmoid, _normal(63, (3, 4)),
                          max_fd_elements=5, fd_directions=2)
    assert result.ok, str(result)
    assert any(c.what == "vjp arg 0 vs finite diff (2 directions)" for c in result.comparisons)


# --- an infinite reference entry must not switch the comparison off ------------------------


def test_infinite_reference_entry_does_not_hide_errors_elsewhere():
    op = _elementwise(jnp.log, lambda z: 2 / z)  # wrong: d log z = 1/z
    z = jnp.abs(_normal(70, (6,))).at[0].set(0.0)
    result = hg.check_vjp(op, jnp.log, z, finite_differences=False)
    assert np.isinf(np.asarray(jax.grad(lambda v: jnp.sum(jnp.log(v)))(z))[0])
    assert not result.ok, str(result)
