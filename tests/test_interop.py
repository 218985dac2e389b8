"""The interop examples: a Flax NNX module and an Equinox module built on handgrad ops.

For each example: its ``main()`` trains for a few steps and the loss goes down, and the
gradients w.r.t. the module's parameters (float64) equal those of the same module built with
``ops=hg.reference`` — plain autodiff, no custom_vjp — so the hand VJPs compose correctly
with each framework's transformations (nnx.grad / eqx.filter_grad, nnx.jit / eqx.filter_jit).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _modules import load_file

import handgrad as hg

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RTOL = 1e-12


def _load_example(name):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    return load_file(f"handgrad_examples_{name}", EXAMPLES / f"{name}.py")


@pytest.fixture(scope="module")
def digits():
    from handgrad import data as data_lib

    return data_lib.load_digits()


@pytest.fixture(scope="module")
def flax_example():
    return _load_example("flax_nnx_mlp")


@pytest.fixture(scope="module")
def equinox_example():
    return _load_example("equinox_cnn")


def _assert_trees_close(got, want, what, nonzero=True):
    """Leaf by leaf, matched by path (the treedefs differ in the static ops namespace)."""
    got_leaves, _ = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, _ = jax.tree_util.tree_flatten_with_path(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves], what
    assert got_leaves, what
    for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        where = f"{what} {jax.tree_util.keystr(path)}"
        assert g.dtype == w.dtype == np.float64 and g.shape == w.shape, where
        scale = float(np.max(np.abs(w)))
        assert scale > 0 or not nonzero, f"{where}: a zero gradient proves nothing"
        err = float(np.max(np.abs(g - w)))
        assert err <= RTOL * scale, f"{where}: max |err| {err:.3e}, max |ref| {scale:.3e}"


def _assert_loss_goes_down(losses, steps):
    assert len(losses) == steps and all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.75 * first, losses


def _uses_hand_vjps(fn, *args):
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


# --- Flax NNX -----------------------------------------------------------------------------------


def test_flax_example_main_trains(flax_example, digits, capsys):
    losses = flax_example.main(steps=20)
    _assert_loss_goes_down(losses, 20)
    out = capsys.readouterr().out
    assert "loss" in out and "test accuracy" in out


def test_flax_gradients_equal_reference_module(flax_example, digits):
    from flax import nnx

    ex = flax_example
    x = jnp.asarray(digits.flat().x_train[:32], jnp.float64)
    y = jnp.asarray(digits.y_train[:32])
    model = ex.MLP(64, 16, 10, rngs=nnx.Rngs(1), dtype=jnp.float64)
    model_ref = ex.MLP(64, 16, 10, rngs=nnx.Rngs(1), dtype=jnp.float64, ops=hg.reference)
    assert model.ops is hg and model_ref.ops is hg.reference
    _assert_trees_close(nnx.state(model, nnx.Param), nnx.state(model_ref, nnx.Param),
                        "same initial parameters", nonzero=False)

    loss, grads = nnx.value_and_grad(ex.loss_fn)(model, x, y)
    loss_ref, grads_ref = nnx.value_and_grad(ex.loss_fn)(model_ref, x, y)
    assert abs(float(loss) - float(loss_ref)) <= 1e-12 * abs(float(loss_ref))
    _assert_trees_close(grads, grads_ref, "nnx.grad: hand VJPs vs autodiff of hg.reference")
    # ...and through nnx.jit, with the ops swapped at call time instead.
    jit_grads = nnx.jit(nnx.grad(ex.loss_fn))(model, x, y)
    _assert_trees_close(jit_grads, grads_ref, "nnx.jit(nnx.grad)")

    graphdef, params = nnx.split(model, nnx.Param)
    loss_of = lambda p, ops: ex.loss_fn(nnx.merge(graphdef, p), x, y, ops=ops)  # noqa: E731
    assert _uses_hand_vjps(lambda p: loss_of(p, hg), params)
    assert not _uses_hand_vjps(lambda p: loss_of(p, hg.reference), params)
    _assert_trees_close(jax.grad(loss_of)(params, hg), jax.grad(loss_of)(params, hg.reference),
                        "split/merge + jax.grad, ops swapped at call time")


# --- Equinox ------------------------------------------------------------------------------------


def test_equinox_example_main_trains(equinox_example, digits, capsys):
    losses = equinox_example.main(steps=20)
    _assert_loss_goes_down(losses, 20)
    out = capsys.readouterr().out
    assert "loss" in out and "test accuracy" in out


def test_equinox_gradients_equal_reference_module(equinox_example, digits):
    import equinox as eqx

    ex = equinox_example
    x = jnp.asarray(digits.x_train[:16], jnp.float64)
    y = jnp.asarray(digits.y_train[:16])
    key = jax.random.PRNGKey(3)
    model = ex.CNN(key, channels=4, dtype=jnp.float64)
    model_ref = ex.CNN(key, channels=4, dtype=jnp.float64, ops=hg.reference)
    params = eqx.filter(model, eqx.is_array)
    _assert_trees_close(params, eqx.filter(model_ref, eqx.is_array), "same initial parameters",
                        nonzero=False)

    loss, grads = eqx.filter_value_and_grad(ex.loss_fn)(model, x, y)
    loss_ref, grads_ref = eqx.filter_value_and_grad(ex.loss_fn)(model_ref, x, y)
    assert abs(float(loss) - float(loss_ref)) <= 1e-12 * abs(float(loss_ref))
    _assert_trees_close(eqx.filter(grads, eqx.is_array), eqx.filter(grads_ref, eqx.is_array),
                        "eqx.filter_grad: hand VJPs vs autodiff of hg.reference")
    jit_grads = eqx.filter_jit(eqx.filter_grad(ex.loss_fn))(model, x, y, hg.reference)
    _assert_trees_close(eqx.filter(jit_grads, eqx.is_array),
                        eqx.filter(grads_ref, eqx.is_array),
                        "eqx.filter_jit(filter_grad), ops swapped at call time")
    assert _uses_hand_vjps(lambda m: ex.loss_fn(m, x, y), model)
    assert not _uses_hand_vjps(lambda m: ex.loss_fn(m, x, y), model_ref)


def test_equinox_train_step_updates_every_array(equinox_example, digits):
    import equinox as eqx

    ex = equinox_example
    x = jnp.asarray(digits.x_train[:64])
    y = jnp.asarray(digits.y_train[:64])
    model = ex.CNN(jax.random.PRNGKey(0), channels=4)
    trained, losses = ex.train(model, x, y, steps=3, batch_size=32)
    before = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    after = jax.tree_util.tree_leaves(eqx.filter(trained, eqx.is_array))
    assert len(losses) == 3 and all(np.isfinite(losses))
    for b, a in zip(before, after, strict=True):
        assert a.dtype == b.dtype == jnp.float32 and a.shape == b.shape
        assert not np.array_equal(np.asarray(a), np.asarray(b))
