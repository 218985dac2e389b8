"""check_vjp must catch wrong backward passes, and say what is wrong.

Each test builds a small, deliberately broken ``jax.custom_vjp`` (a dropped ``1/m``, a missing
transpose, a sign error, a float32 cotangent, a ``stop_gradient`` on a residual, a rule that is
wrong only when batched, a backward that is not deterministic, one that adds a term that does not
scale with ``g``, a check that could only pass vacuously) and asserts that ``hg.check_vjp``
reports it — and, as controls, that the correct rules on the same random inputs pass.
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


def test_default_cotangent_is_not_the_users_default_rng_0_draw():
    # Inputs drawn with np.random.default_rng(0), the most common seed, and a cotangent of the
    # same shape: were the cotangent that same draw, gᵀx would equal xᵀg and hide dW = xᵀg.
    x, w = _normal(0, (3, 2)), _normal(1, (2, 2))
    result = hg.check_vjp(_dense_with(lambda res, g: (g @ res[1], res[0].T @ g)),
                          hg.reference.dense, x, w)
    assert _failed(result, "vjp arg 1 vs autodiff"), str(result)


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
    assert "problem: cotangent of arg 0 (`z`) is float32[5], primal `z` is float64[5]" in str(
        result)


def test_cotangent_dtype_problem_names_the_argument():
    @jax.custom_vjp
    def scale(x, w):
        return x * w

    def bwd(res, g):
        x, w = res
        return g * w, (g * x).astype(jnp.float32)  # dw in float32: the second argument

    scale.defvjp(lambda x, w: (scale(x, w), (x, w)), bwd)
    x, w = _normal(12, (4, 3)), _normal(13, (4, 3))
    result = hg.check_vjp(scale, lambda x, w: x * w, x, w, finite_differences=False)
    assert result.problems == ["cotangent of arg 1 (`w`) is float32[4, 3], primal `w` is "
                               "float64[4, 3]"], str(result)
    renamed = hg.check_vjp(scale, lambda x, w: x * w, x, w, finite_differences=False,
                           argnames=("inputs", "weights"))
    assert "`weights`" in renamed.problems[0], str(renamed)
    right = _elementwise(jnp.sin, jnp.cos)
    assert "cotangents' dtypes and shapes" in hg.check_vjp(right, jnp.sin, x).passed


def test_forward_output_dtype_differing_from_the_reference_is_a_problem():
    @jax.custom_vjp
    def op(z):
        return jnp.sin(z).astype(jnp.float32)  # the output loses the input's precision

    op.defvjp(lambda z: (op(z), z), lambda z, g: ((g * jnp.cos(z)).astype(z.dtype),))
    result = hg.check_vjp(op, jnp.sin, _normal(14, (5,)), finite_differences=False,
                          tolerance=hg.tolerances.AUTODIFF[("cpu", "float32")])
    assert [p for p in result.problems if "forward's output" in p] == [
        "the forward's output is ['float32'], the reference's ['float64']"], str(result)


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


# --- finite differences in float64 even when the user has not enabled it --------------------


def test_finite_differences_run_in_float64_without_global_x64():
    assert jax.config.read("jax_enable_x64")
    # The op as its own reference: only the finite differences can see the sign error.
    wrong = _elementwise(jax.nn.sigmoid, lambda z: -_dsigmoid(z))
    try:
        with jax.enable_x64(False):
            z = jnp.asarray(np.random.default_rng(40).standard_normal((3, 4)))
            assert z.dtype == jnp.float32
            good = hg.check_vjp(hg.sigmoid, hg.reference.sigmoid, z)
            bad = hg.check_vjp(wrong, wrong, z)
            assert not jax.config.read("jax_enable_x64"), "the scoped x64 leaked out"
    finally:
        assert jax.config.read("jax_enable_x64"), "the x64 context did not restore the flag"
    for result in (good, bad):
        assert result.dtype == "float32" and not result.skipped, str(result)
        assert any(c.what == "vjp arg 0 vs finite diff" for c in result.comparisons), str(result)
        assert "scoped jax.enable_x64" in str(result)
    assert good.ok, str(good)
    # float64 precision: rounding of ~1e-10 relative, not float32's ~1e-3 after a 1e-6 step
    assert good.worst("vjp arg 0 vs finite diff").rel_err < 1e-8, str(good)
    assert not _failed(bad, "vjp arg 0 vs autodiff"), str(bad)
    assert _failed(bad, "vjp arg 0 vs finite diff"), str(bad)


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
    assert text.splitlines()[0].startswith("check_vjp(op, float64): FAIL (2 failed of 3 ")
    line = next(x for x in text.splitlines() if "vjp arg 0 (z) vs autodiff" in x)
    assert line.split()[0] == "FAIL"
    assert "at (2, 3)" in line and "rtol=1e-12" in line, line
    assert not bool(result)


def test_name_appears_in_the_report():
    result = hg.check_vjp(hg.relu, hg.reference.relu, _normal(51, (3,)) + 3.0, name="my_relu")
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
    assert np.isinf(np.asarray(jax.grad(lambda v: jnp.sum(jnp.log(v)))(z))[0])
    for allow in (False, True):
        result = hg.check_vjp(op, jnp.log, z, finite_differences=False, allow_nonfinite=allow)
        assert _failed(result, "vjp arg 0 vs autodiff"), str(result)
        assert result.worst("vjp arg 0 vs autodiff").status == "FAIL", str(result)


# --- no vacuous pass: non-finite or identically zero references -----------------------------


def test_nan_against_nan_is_not_verified_unless_allowed():
    z = _normal(80, (2, 3)).at[0, 1].set(-1.0)  # log of a negative number: NaN on both sides
    op = _elementwise(jnp.log, lambda z: 1 / z)
    result = hg.check_vjp(op, jnp.log, z, finite_differences=False)
    assert not result.ok
    unverified = {c.what: c.unverified for c in result.not_verified}
    assert set(unverified) == {"forward"}, str(result)  # d log z = 1/z is finite at −1
    assert "non-finite" in unverified["forward"] and "allow_nonfinite" in unverified["forward"]
    assert "not verified" in str(result) and "FAIL" in str(result).splitlines()[0]
    allowed = hg.check_vjp(op, jnp.log, z, finite_differences=False, allow_nonfinite=True)
    assert allowed.ok, str(allowed)


def test_nan_gradient_against_nan_reference_is_not_verified():
    # sqrt at 0: the forward is finite, both gradients are inf — a match that proves nothing
    op = _elementwise(jnp.sqrt, lambda z: 0.5 / jnp.sqrt(z))
    z = jnp.abs(_normal(81, (5,))).at[2].set(0.0)
    result = hg.check_vjp(op, jnp.sqrt, z, finite_differences=False)
    assert [c.what for c in result.not_verified] == ["vjp arg 0 vs autodiff"], str(result)
    assert hg.check_vjp(op, jnp.sqrt, z, finite_differences=False, allow_nonfinite=True).ok


def test_identically_zero_gradient_is_not_verified_unless_allowed():
    z = -jnp.abs(_normal(82, (3, 4))) - 0.5  # relu of negative inputs: zero output and gradient
    result = hg.check_vjp(hg.relu, hg.reference.relu, z)
    assert not result.ok
    names = {c.what for c in result.not_verified}
    assert names == {"forward", "vjp arg 0 vs autodiff", "vjp arg 0 vs finite diff"}, str(result)
    assert all("identically zero" in c.unverified for c in result.not_verified)
    assert hg.check_vjp(hg.relu, hg.reference.relu, z, allow_zero=True).ok


def _dropout_without_rescaling():
    """Inverted dropout whose backward forgets the 1/(1 − p) of the forward."""

    @jax.custom_vjp
    def dropout(x, mask, rate):
        return x * mask / (1 - rate)

    dropout.defvjp(lambda x, mask, rate: (dropout(x, mask, rate), (mask, rate)),
                   lambda res, g: (g * res[0], None, None))
    return dropout


def test_a_wrong_backward_hidden_by_an_all_zero_mask_is_not_a_pass():
    op = _dropout_without_rescaling()

    def ref(x, mask, rate):
        return x * mask / (1 - rate)

    x, rate = _normal(83, (3, 4)), jnp.float64(0.9)
    everything_dropped = jnp.zeros((3, 4))
    vacuous = hg.check_vjp(op, ref, x, everything_dropped, rate, argnums=(0,))
    assert not vacuous.ok and vacuous.not_verified, str(vacuous)
    assert not [c for c in vacuous.comparisons if c.status == "FAIL"], str(vacuous)
    some_kept = everything_dropped.at[0, 1].set(1.0).at[2, 3].set(1.0)
    caught = hg.check_vjp(op, ref, x, some_kept, rate, argnums=(0,))
    assert _failed(caught, "vjp arg 0 vs autodiff"), str(caught)
    assert "0.1 × the reference" in str(caught), str(caught)


def test_batch_norm_over_one_element_per_feature_is_not_verified():
    # N = H = W = 1: x̂ = 0, the output is β whatever x is, so dx and dγ are zero on both sides
    k = np.random.default_rng(84)
    x, gamma, beta = (jnp.asarray(k.standard_normal(s)) for s in [(1, 3, 1, 1), (3,), (3,)])

    def out(op):
        return lambda x, gamma, beta: op(x, gamma, beta)[0]

    result = hg.check_vjp(out(hg.batch_norm), out(hg.reference.batch_norm), x, gamma, beta)
    assert {c.what for c in result.not_verified} >= {
        "vjp arg 0 vs autodiff", "vjp arg 1 vs autodiff"}, str(result)
    assert not result.worst("vjp arg 2 vs autodiff").unverified  # dβ = Σ g is not zero
    x3 = jnp.asarray(k.standard_normal((1, 3, 2, 2)))
    assert hg.check_vjp(out(hg.batch_norm), out(hg.reference.batch_norm), x3, gamma, beta).ok


def test_reference_zero_and_hand_tiny_passes_on_atol_only_when_allowed():
    # The reference's gradient is exactly zero, the hand one 1e-16: within atol, proves nothing
    op = _elementwise(lambda z: 0 * z, lambda z: 1e-16 * jnp.ones_like(z))
    z = _normal(85, (4,))
    result = hg.check_vjp(op, lambda z: 0 * z, z, finite_differences=False)
    (c,) = [c for c in result.comparisons if c.what == "vjp arg 0 vs autodiff"]
    assert c.within and "the reference is identically zero" in c.unverified, str(result)
    assert hg.check_vjp(op, lambda z: 0 * z, z, finite_differences=False, allow_zero=True).ok


def test_second_order_of_a_piecewise_linear_op_passes_on_its_cotangent_part():
    z = _normal(86, (3, 4)) + 0.05 * jnp.sign(_normal(87, (3, 4)))
    result = hg.check_vjp(hg.relu, hg.reference.relu, z, second_order=True)
    assert result.ok, str(result)
    (x_part,) = [c for c in result.comparisons if c.what == "grad-of-grad arg 0 vs autodiff"]
    assert x_part.zero_reference and x_part.hand_scale == 0.0  # relu'' = 0, exactly
    (ct_part,) = [c for c in result.comparisons if c.what.startswith("grad-of-grad cotangent")]
    assert ct_part.ref_scale > 0 and ct_part.ok


def test_second_order_zero_reference_with_a_nonzero_hand_side_is_not_verified():
    # relu whose backward leaks 1e-20·g·z: first order agrees to 1e-20, but its second
    # derivative is not the exact zero of the reference's
    op = _elementwise(jax.nn.relu, lambda z: (z >= 0) + 1e-20 * z)
    z = _normal(88, (3, 4)) + 0.05 * jnp.sign(_normal(89, (3, 4)))
    result = hg.check_vjp(op, hg.reference.relu, z, second_order=True)
    assert [c.what for c in result.not_verified] == ["grad-of-grad arg 0 vs autodiff"], str(result)
    assert "not exactly zero" in result.not_verified[0].unverified


def test_second_order_differentiates_the_cotangent_too():
    # A backward that uses g non-linearly (g·|g|/|g|, fine in value) is caught on J·u only
    op = _elementwise(jnp.sin, jnp.cos)
    result = hg.check_vjp(op, jnp.sin, _normal(90, (2, 3)), second_order=True)
    assert any(c.what == "grad-of-grad cotangent vs autodiff (J·u)" and c.ok
               for c in result.comparisons), str(result)

    @jax.custom_vjp
    def doubled(z):
        return jnp.sin(z)

    # right value, but its derivative in g is 2·cos: g·g/stop_gradient(g) hides a factor
    doubled.defvjp(lambda z: (doubled(z), z),
                   lambda z, g: (g * g / jax.lax.stop_gradient(g) * jnp.cos(z),))
    bad = hg.check_vjp(doubled, jnp.sin, _normal(90, (2, 3)), second_order=True,
                       finite_differences=False)
    assert _failed(bad, "grad-of-grad cotangent"), str(bad)
    assert not _failed(bad, "vjp arg 0"), str(bad)


# --- the backward run twice: non-determinism and Python state -------------------------------


def _broadcast_rows_with(summation):
    """x (n,) -> (m, n), rows repeated; the backward sums g over the rows (a db) by
    `summation`, a host function standing for a GPU scatter-add."""

    @jax.custom_vjp
    def broadcast(x, like):
        return jnp.broadcast_to(x, like.shape)

    def bwd(res, g):
        total = jax.pure_callback(summation, jax.ShapeDtypeStruct(g.shape[1:], g.dtype), g)
        return total, jnp.zeros_like(res)

    broadcast.defvjp(lambda x, like: (broadcast(x, like), like), bwd)
    return broadcast


def _reference_broadcast(x, like):
    return jnp.broadcast_to(x, like.shape)


def test_non_deterministic_backward_is_caught_and_nondet_tol_accepts_it():
    order = np.random.default_rng(91)

    def atomic_like_sum(g):
        # rows added in a different order on every call, as atomics on a GPU would
        total = np.zeros(g.shape[1:], g.dtype)
        for row in order.permutation(g.shape[0]):
            total += g[row]
        return total

    op = _broadcast_rows_with(atomic_like_sum)
    x, like = _normal(92, (5,)), _normal(93, (64, 5))
    result = hg.check_vjp(op, _reference_broadcast, x, like, argnums=(0,))
    twice = [p for p in result.problems if p.startswith("the backward run twice differs")]
    assert twice and "arg 0 (`x`)" in twice[0], str(result)
    assert all(c.ok for c in result.comparisons), str(result)  # only this diagnostic sees it
    tolerant = hg.check_vjp(op, _reference_broadcast, x, like, argnums=(0,), nondet_tol=1e-12)
    assert tolerant.ok, str(tolerant)
    assert any("within" in p and "nondet_tol" in p for p in tolerant.passed), str(tolerant)


def test_deterministic_backward_runs_twice_identically():
    op = _broadcast_rows_with(lambda g: np.sum(g, axis=0))
    result = hg.check_vjp(op, _reference_broadcast, _normal(92, (5,)), _normal(93, (64, 5)),
                          argnums=(0,))
    assert result.ok and "backward run twice: identical" in result.passed, str(result)


def test_backward_reading_python_state_while_tracing_is_caught():
    traced = []

    @jax.custom_vjp
    def op(z):
        return jnp.sin(z)

    def bwd(z, g):
        traced.append(1)  # a Python-side counter, schedule or cache read while tracing
        return (g * jnp.cos(z) * (1.0 if len(traced) == 1 else 1.0 + 1e-9),)

    op.defvjp(lambda z: (op(z), z), bwd)
    result = hg.check_vjp(op, jnp.sin, _normal(94, (4,)), finite_differences=False)
    assert any(p.startswith("the backward run twice differs: arg 0 (`z`)")
               for p in result.problems), str(result)


# --- a zero cotangent gives zero gradients --------------------------------------------------


def test_backward_adding_a_term_that_does_not_scale_with_g_is_caught():
    # weight decay written into the backward: g·cos z + 1e-3·z
    op = _elementwise(jnp.sin, jnp.cos)
    leaky = jax.custom_vjp(lambda z: jnp.sin(z))
    leaky.defvjp(lambda z: (jnp.sin(z), z), lambda z, g: (g * jnp.cos(z) + 1e-3 * z,))
    z = _normal(95, (3, 4))
    # The op as its own reference and no finite differences: only this diagnostic can see it
    result = hg.check_vjp(leaky, leaky, z, finite_differences=False)
    assert all(c.ok for c in result.comparisons), str(result)
    assert [p for p in result.problems if p.startswith("a zero cotangent gives non-zero")], (
        str(result))
    right = hg.check_vjp(op, op, z, finite_differences=False)
    assert right.ok and "zero cotangent -> zero" in right.passed, str(right)


# --- on a failure of a small op: the Jacobians side by side ---------------------------------


def test_small_op_failure_shows_both_jacobians_with_the_worst_entry_marked():
    op = _elementwise(jnp.sin, lambda z: jnp.cos(z).at[2, 3].add(0.5))
    z = _normal(96, (4, 5))  # 20 outputs × 20 inputs = 400 entries: at the limit
    result = hg.check_vjp(op, jnp.sin, z)
    (name,) = result.jacobians
    numerical, analytical, out_shape, in_shape = result.jacobians[name]
    assert numerical.shape == analytical.shape == (20, 20)
    assert out_shape == in_shape == (4, 5)
    np.testing.assert_allclose(numerical, np.diag(np.cos(np.asarray(z)).ravel()), atol=1e-8)
    worst = np.unravel_index(np.argmax(np.abs(numerical - analytical)), numerical.shape)
    assert worst == (13, 13)  # (2, 3) in row-major order
    text = str(result)
    assert "Worst *: output (2, 3), input (2, 3)" in text, text
    row = next(line for line in text.splitlines() if "*" in line and "|" in line)
    left, right = row.split("|")
    assert left.count("*") == right.count("*") == 1, row
    assert f"{float(numerical[13, 13]):10.3g}*" in left and f"{analytical[13, 13]:10.3g}*" in right


def test_jacobians_only_for_failures_of_small_ops():
    right = hg.check_vjp(_elementwise(jnp.sin, jnp.cos), jnp.sin, _normal(97, (4, 5)))
    assert right.ok and not right.jacobians and "Jacobian" not in str(right)
    wrong = _elementwise(jnp.sin, lambda z: jnp.cos(z).at[0, 0].add(0.5))
    large = hg.check_vjp(wrong, jnp.sin, _normal(98, (5, 5)))  # 625 entries
    assert not large.ok and not large.jacobians, str(large)
    raised = hg.check_vjp(wrong, jnp.sin, _normal(98, (5, 5)), max_jacobian_entries=625)
    assert list(raised.jacobians) == ["d out / d z (arg 0)"], str(raised)


# --- fast mode: one random projection vᵀJu, the slow mode on failure ------------------------


def test_fast_mode_passes_a_right_vjp_with_one_projection_per_argument():
    x, w, b = _normal(100, (40, 30)), _normal(101, (7, 30)), _normal(102, (7,))
    result = hg.check_vjp(hg.dense, hg.reference.dense, x, w, b, fast_mode=True)
    assert result.ok, str(result)
    fd = [c.what for c in result.comparisons if "finite diff" in c.what]
    assert fd == [f"vjp arg {i} vs finite diff (fast mode: vᵀJu)" for i in range(3)], fd


def test_fast_mode_failure_falls_back_to_the_slow_mode():
    wrong = _elementwise(jnp.tanh, lambda z: (1 - jnp.tanh(z) ** 2).at[1, 2].multiply(1.5))
    result = hg.check_vjp(wrong, wrong, _normal(103, (3, 4)), fast_mode=True)
    assert not result.ok
    assert result.notes and result.notes[0].startswith("fast mode (one random projection"), (
        str(result))
    assert "vᵀJu" in result.notes[0] and "FAIL" in result.notes[0]
    slow = result.worst("vjp arg 0 vs finite diff")
    assert slow.what == "vjp arg 0 vs finite diff" and slow.worst_index == (1, 2), str(result)
    assert result.jacobians, str(result)  # the slow mode's report, Jacobians included


# --- the report a student reads ------------------------------------------------------------


def test_report_is_one_line_per_comparison_and_names_arguments():
    x, w, b = _normal(104, (4, 3)), _normal(105, (2, 3)), _normal(106, (2,))
    result = hg.check_vjp(hg.dense, hg.reference.dense, x, w, b)
    lines = str(result).splitlines()
    assert lines[0].startswith("check_vjp(dense, float64): PASS (7 comparisons; rel = ")
    assert len(lines) == 1 + len(result.comparisons) + 1  # header, comparisons, diagnostics
    assert "vjp arg 1 (w) vs autodiff" in lines[3] and lines[3].split()[0] == "ok"
    assert max(map(len, lines)) <= 110, max(lines, key=len)
    wrong = _dense_with(lambda res, g: (g @ res[1], -(g.T @ res[0])))
    text = str(hg.check_vjp(wrong, hg.reference.dense, x, w))
    line = next(x for x in text.splitlines() if "vjp arg 1 (w) vs autodiff" in x)
    assert line.split()[0] == "FAIL" and "sign error" in line, text


def test_report_names_a_missing_factor_and_a_missing_transpose():
    too_big = _mean_sq_with(lambda m: 1.0)  # drops 1/m, m = 5
    text = str(hg.check_vjp(too_big, _mean_sq_ref, _normal(107, (5, 3))))
    assert "= 5 × the reference: a missing or extra factor?" in text, text
    x, w = _normal(108, (5, 3)), _normal(109, (3, 3))
    text = str(hg.check_vjp(_dense_with(_dense_bwd_dw_transposed), hg.reference.dense, x, w))
    assert "the transpose of the reference" in text, text


# --- hg.compare: a student's cmp ------------------------------------------------------------


def test_compare_exact_approximate_and_different(capsys):
    a = _normal(110, (3, 4))
    exact = hg.compare("dW", a, a)
    assert exact == ("dW", True, True, 0.0)
    close = hg.compare("dW", a * (1 + 1e-14), a)
    assert close.approximate and not close.exact and 0 < close.max_abs_diff < 1e-13
    far = hg.compare("dW", a.at[1, 2].add(0.1), a)
    assert not far.approximate and not far.exact
    assert far.max_abs_diff == pytest.approx(0.1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("dW") and "exact: True " in lines[0]
    assert "exact: False | approximate: True " in lines[1]
    assert "approximate: False | max abs diff: 0.1" in lines[2]


def test_compare_takes_pytrees_and_uses_the_dtype_tolerance(capsys):
    grads = {"W1": _normal(111, (3, 2)), "b1": _normal(112, (2,))}
    mine = {"W1": grads["W1"].astype(jnp.float32), "b1": grads["b1"]}
    match = hg.compare("grads", mine, grads)
    assert match.name == "grads" and not match.exact and match.approximate, match
    out = capsys.readouterr().out
    assert "grads['W1']" in out and "grads['b1']" in out
    wrong = {"W1": grads["W1"], "b1": 2 * grads["b1"]}
    assert not hg.compare("grads", wrong, grads, verbose=False).approximate
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="different structures"):
        hg.compare("grads", {"W1": grads["W1"]}, grads)


def test_compare_reports_a_shape_mismatch():
    a = _normal(113, (2, 3))
    match = hg.compare("dW", a, a.T, verbose=False)
    assert match == ("dW", False, False, np.inf)


def test_compare_is_exported():
    assert hg.compare is hg.check.compare
