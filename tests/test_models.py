"""handgrad.models: hand-written and autodiff backward agree on whole models; initializers;
the classification loss (float64, and bfloat16 compute with float32 master weights).

Every model is written once against an ops namespace, so ``ops=hg`` (hand-written VJPs) and
``ops=hg.reference`` (plain JAX differentiated by autodiff) differ in the backward passes only.
Model programs are jit-compiled once per (model, ops): eager custom_vjp dispatch is far slower
than one compile.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import handgrad as hg
from handgrad import models, tolerances

# float64: the two backward passes differ by rounding only (measured ~3e-15)
RTOL_F64 = tolerances.autodiff_tolerance("float64").rtol

IMAGE_SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "lenet": (1, 28, 28)}
NUM_CLASSES = 10


def rel_err(got, want) -> float:
    """max |got − want| / max |want| (one number per array)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def random_batch(seed, n, shape, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(dtype)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    return x, y


@functools.cache
def logits_and_grads(name: str, ops_name: str):
    """jit(params, x, y) -> (logits, d loss / d params, loss, aux) of MODELS[name], these ops,
    loss = classification_loss (mean softmax cross-entropy)."""
    apply = models.MODELS[name].apply
    ops = {"hand": hg, "auto": hg.reference}[ops_name]
    loss_fn = models.classification_loss(apply, ops=ops)

    def f(params, x, y):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, (x, y))
        return apply(params, x, ops=ops), grads, loss, aux

    return jax.jit(f)


@functools.cache
def jitted_init(name: str, dtype):
    """MODELS[name].init(key) for this dataset shape, compiled once (eager jax.random compiles a
    program per shape, which is slower)."""
    spec = models.MODELS[name]
    return jax.jit(lambda key: spec.init(key, IMAGE_SHAPES[name], NUM_CLASSES, dtype))


def float64_params(name: str):
    return jitted_init(name, jnp.float64)(jax.random.key(7))


# --- hand-written vs autodiff backward on whole models ---------------------------------------


CASES = [
    ("mlp", "image"),  # (N, 1, 8, 8), flattened inside mlp
    ("mlp", "flat"),  # (N, 64)
    ("cnn", "image"),
    ("lenet", "image"),
]


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 5])
@pytest.mark.parametrize(("name", "layout"), CASES, ids=[f"{n}-{l}" for n, l in CASES])
def test_hand_and_autodiff_models_agree(name, layout, batch):
    params = float64_params(name)
    shape = IMAGE_SHAPES[name]
    if layout == "flat":
        shape = (math.prod(shape),)
    x, y = random_batch(batch, batch, shape)

    logits_h, grads_h, _, _ = logits_and_grads(name, "hand")(params, x, y)
    logits_a, grads_a, _, _ = logits_and_grads(name, "auto")(params, x, y)

    assert logits_h.shape == (batch, NUM_CLASSES) and logits_h.dtype == jnp.float64
    assert rel_err(logits_h, logits_a) <= RTOL_F64
    # The gradient is a pytree of exactly the parameters' structure, shapes and dtypes.
    assert jax.tree_util.tree_structure(grads_h) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_structure(grads_a) == jax.tree_util.tree_structure(params)
    flat_h = jax.tree_util.tree_leaves_with_path(grads_h)
    flat_a = jax.tree_util.tree_leaves(grads_a)
    for (path, gh), ga, p in zip(flat_h, flat_a, jax.tree_util.tree_leaves(params)):
        where = jax.tree_util.keystr(path)
        assert gh.shape == p.shape and gh.dtype == p.dtype, where
        # Non-trivial gradients (all-zero leaves would make the comparison vacuous).
        assert np.max(np.abs(np.asarray(ga))) > 1e-8, where
        assert rel_err(gh, ga) <= RTOL_F64, (where, rel_err(gh, ga))


def test_mlp_flat_and_image_inputs_give_the_same_logits():
    params = float64_params("mlp")
    x, y = random_batch(3, 5, IMAGE_SHAPES["mlp"])
    image_logits, image_grads, _, _ = logits_and_grads("mlp", "hand")(params, x, y)
    flat_logits, flat_grads, _, _ = logits_and_grads("mlp", "hand")(params, x.reshape(5, -1), y)
    np.testing.assert_array_equal(np.asarray(image_logits), np.asarray(flat_logits))
    for a, b in zip(jax.tree_util.tree_leaves(image_grads), jax.tree_util.tree_leaves(flat_grads)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- initializers ----------------------------------------------------------------------------


EXPECTED_SHAPES = {
    "mlp": {
        "layers": [
            {"w": (128, 64), "b": (128,)},
            {"w": (64, 128), "b": (64,)},
            {"w": (10, 64), "b": (10,)},
        ]
    },
    "cnn": {
        "conv1": {"w": (16, 1, 3, 3), "b": (16,)},
        "conv2": {"w": (32, 16, 3, 3), "b": (32,)},
        "fc1": {"w": (64, 128), "b": (64,)},
        "fc2": {"w": (10, 64), "b": (10,)},
    },
    "lenet": {
        "conv1": {"w": (6, 1, 5, 5), "b": (6,)},
        "conv2": {"w": (16, 6, 5, 5), "b": (16,)},
        "fc1": {"w": (120, 400), "b": (120,)},
        "fc2": {"w": (84, 120), "b": (84,)},
        "fc3": {"w": (10, 84), "b": (10,)},
    },
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("name", list(EXPECTED_SHAPES))
def test_init_shapes_and_dtypes(name, dtype):
    spec = models.MODELS[name]
    # eval_shape: shapes and dtypes without compiling an init per dtype.
    abstract = jax.eval_shape(
        lambda k: spec.init(k, IMAGE_SHAPES[name], NUM_CLASSES, dtype), jax.random.key(0)
    )
    assert jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract) == EXPECTED_SHAPES[name]
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        assert leaf.dtype == dtype, jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", list(EXPECTED_SHAPES))
def test_init_values_zero_biases_random_weights(name):
    for path, leaf in jax.tree_util.tree_leaves_with_path(float64_params(name)):
        where = (name, jax.tree_util.keystr(path))
        if where[1].endswith("['b']"):
            assert not np.any(np.asarray(leaf)), where
        else:
            assert np.all(np.isfinite(leaf)) and np.std(np.asarray(leaf)) > 0, where


def test_init_default_dtype_is_float32():
    key = jax.random.key(0)
    for init in (
        lambda k: models.init_mlp(k, (4, 3, 2)),
        models.init_cnn,
        models.init_lenet5,
        lambda k: models.dense_params(k, 3, 2),
        lambda k: models.conv_params(k, 1, 2, 3),
    ):
        dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(jax.eval_shape(init, key))}
        assert dtypes == {jnp.dtype("float32")}


def _he(fan_in):
    return math.sqrt(2.0 / fan_in)


def _glorot(fan_in, fan_out):
    return math.sqrt(2.0 / (fan_in + fan_out))


# The sample std of n ≥ 9216 draws is within ~1% (one standard error ≤ 1/sqrt(2n)) of the
# init's std; 6% is > 6 standard errors, yet every case below has the wrong choice (He vs Glorot,
# or the fan from the wrong axis) at least 11% away, so a mix-up fails.
STD_RTOL = 0.06
# truncated_normal draws from N(0, σ²) cut at ±2σ, σ = std / 0.8796… so the variance is std².
TRUNCATION = 2.0 / 0.87962566103423978


def _weights(key):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    return {
        "dense relu 800→400": models.dense_params(k1, 800, 400, "relu")["w"],
        "dense leaky_relu 800→400": models.dense_params(k2, 800, 400, "leaky_relu")["w"],
        "dense linear 800→400": models.dense_params(k3, 800, 400, "linear")["w"],
        "conv relu 16→64 3×3": models.conv_params(k4, 16, 64, 3)["w"],
        "conv linear 64→16 3×3": models.conv_params(k5, 64, 16, 3, "linear")["w"],
    }


# what: (expected std, std of the wrong choice: Glorot for He and vice versa, or fan_out)
EXPECTED_STD = {
    "dense relu 800→400": (_he(800), _he(400)),
    "dense leaky_relu 800→400": (_he(800), _glorot(800, 400)),
    "dense linear 800→400": (_glorot(800, 400), _he(800)),
    "conv relu 16→64 3×3": (_he(16 * 9), _he(64 * 9)),
    "conv linear 64→16 3×3": (_glorot(64 * 9, 16 * 9), _he(64 * 9)),
}


def test_init_std_is_he_or_glorot():
    weights = jax.jit(_weights)(jax.random.key(3))
    assert set(weights) == set(EXPECTED_STD)
    for what, w in weights.items():
        std, wrong = EXPECTED_STD[what]
        assert abs(wrong / std - 1) > 1.8 * STD_RTOL, f"{what}: the case does not discriminate"
        w = np.asarray(w, np.float64)
        assert w.size >= 9216, what
        assert abs(np.std(w) / std - 1) < STD_RTOL, (what, np.std(w), std)
        assert abs(np.mean(w)) < 5 * std / math.sqrt(w.size), (what, np.mean(w))
        assert np.max(np.abs(w)) <= TRUNCATION * std * (1 + 1e-6), (what, "not truncated at 2σ")


# Which init each layer of each model asks for: He before a ReLU, Glorot for the output layer.
EXPECTED_ACTIVATIONS = {
    "mlp": [((128, 64), "relu"), ((64, 128), "relu"), ((10, 64), "linear")],
    "cnn": [
        ((16, 1, 3, 3), "relu"),
        ((32, 16, 3, 3), "relu"),
        ((64, 128), "relu"),
        ((10, 64), "linear"),
    ],
    "lenet": [
        ((6, 1, 5, 5), "relu"),
        ((16, 6, 5, 5), "relu"),
        ((120, 400), "relu"),
        ((84, 120), "relu"),
        ((10, 84), "linear"),
    ],
}


@pytest.mark.parametrize("name", list(EXPECTED_ACTIVATIONS))
def test_init_picks_he_for_relu_layers_and_glorot_for_the_output(name, monkeypatch):
    calls = []
    original = models._init_weight

    def recording(key, shape, activation, dtype):
        calls.append((tuple(shape), activation))
        return original(key, shape, activation, dtype)

    monkeypatch.setattr(models, "_init_weight", recording)
    jax.eval_shape(
        lambda k: models.MODELS[name].init(k, IMAGE_SHAPES[name], NUM_CLASSES), jax.random.key(0)
    )  # traced only: nothing compiled
    assert calls == EXPECTED_ACTIVATIONS[name]


def test_init_keys():
    for name in EXPECTED_SHAPES:
        init = jitted_init(name, jnp.float64)
        a, again, b = init(jax.random.key(0)), init(jax.random.key(0)), init(jax.random.key(1))
        weights = []
        for (path, la), la2, lb in zip(
            jax.tree_util.tree_leaves_with_path(a),
            jax.tree_util.tree_leaves(again),
            jax.tree_util.tree_leaves(b),
        ):
            where = (name, jax.tree_util.keystr(path))
            np.testing.assert_array_equal(np.asarray(la), np.asarray(la2))  # same key, same init
            if where[1].endswith("['w']"):
                assert not np.any(np.asarray(la) == np.asarray(lb)), where  # another key
                weights.append(np.asarray(la).ravel()[:8])
        # Layers get their own keys: no two weights of one model start alike.
        for i in range(len(weights)):
            for j in range(i):
                assert not np.allclose(weights[i], weights[j]), (name, i, j)


# --- the classification loss -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_classification_loss_is_mean_cross_entropy(name):
    params = float64_params(name)
    x, y = random_batch(5, 5, IMAGE_SHAPES[name])  # the batch-5 shapes compiled above
    logits = np.asarray(logits_and_grads(name, "auto")(params, x, y)[0])
    # Labels making 2 of the 5 predictions right: accuracy 0.4, neither 0 nor 1.
    predicted = np.argmax(logits, axis=-1)
    y = np.where(np.arange(5) < 2, predicted, (predicted + 1) % NUM_CLASSES).astype(np.int32)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    accuracy = 0.4
    for ops_name in ("hand", "auto"):
        _, _, loss, aux = logits_and_grads(name, ops_name)(params, x, y)
        assert set(aux) == {"accuracy"}
        assert loss.shape == () and aux["accuracy"].shape == ()
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
        np.testing.assert_allclose(float(aux["accuracy"]), accuracy, rtol=1e-6)


def test_classification_loss_accuracy_counts_hits():
    # A "model" that returns x as the logits, so accuracy is exactly 3/4.
    x = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    y = np.array([0, 1, 2, 2], np.int32)
    loss, aux = jax.jit(models.classification_loss(lambda p, x, ops: x))({}, (x, y))
    assert float(aux["accuracy"]) == 0.75
    want = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(x), y).mean()
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


def test_classification_loss_keeps_float64():
    params = float64_params("mlp")
    x, y = random_batch(5, 5, IMAGE_SHAPES["mlp"])
    logits, _, loss, _ = logits_and_grads("mlp", "hand")(params, x, y)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    assert loss.dtype == jnp.float64, loss.dtype
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-12)


@functools.cache
def grads_with_compute_dtype(name: str, compute_dtype):
    loss_fn = models.classification_loss(models.MODELS[name].apply, compute_dtype=compute_dtype)
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


# bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2%) and the error compounds over
# the layers: measured per-leaf relative L2 error of the bfloat16 gradient against the float32
# one is 0.003-0.055 (mlp) and 0.03-0.075 (cnn) over seeds 0-3; the bound is twice the worst.
# A wrong gradient (wrong scale, sign, zeros, another layer's) is off by ~1 or more.
BF16_GRAD_REL_L2 = 0.15


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_bfloat16_compute_gives_float32_gradients(name):
    # float32 master weights (cast from the float64 init: no extra init compile).
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), float64_params(name))
    x, y = random_batch(0, 32, IMAGE_SHAPES[name], np.float32)
    x = np.abs(x)  # pixel-like inputs
    (loss32, _), g32 = grads_with_compute_dtype(name, None)(params, (x, y))
    (loss16, _), g16 = grads_with_compute_dtype(name, jnp.bfloat16)(params, (x, y))

    assert loss16.dtype == jnp.float32 and loss32.dtype == jnp.float32
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)
    assert jax.tree_util.tree_structure(g16) == jax.tree_util.tree_structure(params)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g16), jax.tree_util.tree_leaves(g32)
    ):
        where = jax.tree_util.keystr(path)
        assert a.dtype == jnp.float32, (where, a.dtype)  # the cast's VJP: float32 master grads
        err = rel_l2(a, b)
        assert err <= BF16_GRAD_REL_L2, (where, err)
        # ... and the forward/backward really ran in bfloat16 (not silently in float32).
        assert err > 1e-4, (where, err)
