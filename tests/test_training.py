"""handgrad.train: hand-written and autodiff gradients train to the same parameters; the jit
step (donation, any optax optimizer); NaN/inf detection; checkpoints and bit-identical resume;
weighted evaluation; data-parallel training over 4 (forced host) devices in a subprocess.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import handgrad as hg
from handgrad import data, models, tolerances, train

REPO = Path(__file__).resolve().parents[1]
OPS = {"hand": hg, "auto": hg.reference}
MLP_SIZES = (64, 64, 32, 10)


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load_digits(seed=0)


@pytest.fixture(scope="module")
def small(digits) -> data.Dataset:
    """320 training images (10 steps of 32), 100 test images: small enough for several fits."""
    return data.Dataset(
        digits.x_train[:320],
        digits.y_train[:320],
        digits.x_test[:100],
        digits.y_test[:100],
        num_classes=10,
        name="digits-small",
    )


@functools.cache
def _jitted_init(name: str):
    inits = {
        "mlp": lambda key: models.init_mlp(key, MLP_SIZES, dtype=jnp.float64),
        "cnn": lambda key: models.init_cnn(key, dtype=jnp.float64),
    }
    return jax.jit(inits[name])


def init_params(name: str, dtype=jnp.float32, seed: int = 0):
    """Fresh parameters (the train step donates its inputs, so every run needs its own).
    Drawn in float64 and cast: one compiled init per model, and the float32 and float64 runs
    start from the same point."""
    params = _jitted_init(name)(jax.random.key(seed))
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def rel_err(got, want) -> float:
    """max |got − want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want))
    return float(np.max(np.abs(got - want)) / (scale if scale > 0 else 1.0))


def max_rel_err(got_tree, want_tree) -> float:
    assert jax.tree_util.tree_structure(got_tree) == jax.tree_util.tree_structure(want_tree)
    pairs = zip(jax.tree_util.tree_leaves(got_tree), jax.tree_util.tree_leaves(want_tree))
    return max((rel_err(a, b) for a, b in pairs), default=0.0)  # default: EmptyState


def assert_trees_bit_identical(got_tree, want_tree):
    assert jax.tree_util.tree_structure(got_tree) == jax.tree_util.tree_structure(want_tree)
    got_leaves = jax.tree_util.tree_leaves_with_path(got_tree)
    for (path, got), want in zip(got_leaves, jax.tree_util.tree_leaves(want_tree)):
        got, want = np.asarray(got), np.asarray(want)
        where = jax.tree_util.keystr(path)
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert got.tobytes() == want.tobytes(), where  # stricter than array_equal: -0.0, NaN


# --- 1. hand-written and autodiff gradients train identically --------------------------------


def run_steps(name, ops, dtype, optimizer, x, y, steps, batch_size):
    """``steps`` steps of make_train_step, data order of data.batches(seed=0), epoch after
    epoch. Returns the parameters and the losses."""
    params = init_params(name, dtype)
    opt_state = optimizer.init(params)
    apply = models.MODELS[name].apply
    step = train.make_train_step(models.classification_loss(apply, ops=ops), optimizer)
    losses, epoch = [], 0
    while len(losses) < steps:
        for batch in data.batches(x, y, batch_size, seed=0, epoch=epoch, drop_remainder=True):
            params, opt_state, metrics = step(params, opt_state, batch)
            losses.append(float(metrics["loss"]))
            if len(losses) == steps:
                break
        epoch += 1
    return params, losses


# (model, examples, dtype, optimizer, bound on max |hand − auto| / max |auto| per leaf after
# 50 steps). float64: the two backward passes differ by rounding only (measured ≤ 3e-15).
# float32 bounds are ~10× the measured values:
#   mlp + adam: 7.9e-7.   cnn + sgd(momentum 0.9): 1.1e-6.
# (cnn + adam in float32 measures 1.1e-4, all in conv2.w, and is already there after step 1:
# adam's first update is g/(|g|+eps), and conv2.w has gradient entries of ~1e-8 ≈ eps whose
# float32 rounding (~2e-10 absolute, 1e-9 of max |g|) moves that ratio by ~5e-3. That is
# adam amplifying rounding, not a backward-pass error, so that case is not a good parity probe.)
PARITY = [
    ("mlp", 512, jnp.float64, "adam", tolerances.autodiff_tolerance("float64").rtol),
    pytest.param("mlp", 512, jnp.float64, "sgd", tolerances.autodiff_tolerance("float64").rtol,
                 marks=pytest.mark.slow),
    pytest.param("mlp", 512, jnp.float32, "adam", 1e-5, marks=pytest.mark.slow),
    ("cnn", 256, jnp.float64, "adam", tolerances.autodiff_tolerance("float64").rtol),
    pytest.param("cnn", 256, jnp.float32, "sgd", 1e-5, marks=pytest.mark.slow),
]
OPTIMIZERS = {"adam": lambda: optax.adam(1e-2), "sgd": lambda: optax.sgd(0.1, momentum=0.9)}
PARITY_STEPS = 50


@pytest.mark.parametrize(
    ("name", "n", "dtype", "optimizer", "bound"),
    PARITY,
    ids=[f"{v[0]}-{jnp.dtype(v[2]).name}-{v[3]}"
         for v in (getattr(p, "values", p) for p in PARITY)],
)
def test_hand_and_autodiff_training_agree(digits, name, n, dtype, optimizer, bound):
    x, y = digits.x_train[:n].astype(dtype), digits.y_train[:n]
    if name == "mlp":
        x = x.reshape(n, -1)
    runs = {
        ops_name: run_steps(
            name, ops, dtype, OPTIMIZERS[optimizer](), x, y, PARITY_STEPS, batch_size=32
        )
        for ops_name, ops in OPS.items()
    }
    (hand, hand_losses), (auto, auto_losses) = runs["hand"], runs["auto"]

    for leaf in jax.tree_util.tree_leaves(hand):
        assert leaf.dtype == dtype
    # It trained (the comparison is about real, moving parameters)...
    assert np.mean(auto_losses[-5:]) < 0.5 * auto_losses[0], auto_losses
    # ... and the hand-written gradients took it to the same place.
    worst = max_rel_err(hand, auto)
    assert worst <= bound, f"max relative difference {worst:.3g} > {bound:g}"
    np.testing.assert_allclose(hand_losses, auto_losses, rtol=100 * bound)


# --- 2. the train step ----------------------------------------------------------------------


def _donation_supported() -> bool:
    a = jnp.ones(3)
    jax.jit(lambda v: v + 1, donate_argnums=0)(a).block_until_ready()
    return a.is_deleted()


@pytest.fixture(scope="module")
def batch(digits):
    return digits.x_train[:32].reshape(32, -1).astype(np.float64), digits.y_train[:32]


def test_train_step_donates_params_and_opt_state(batch):
    if not _donation_supported():
        pytest.skip(f"buffer donation is not supported on {jax.default_backend()}")
    optimizer = optax.adam(1e-2)
    loss_fn = models.classification_loss(models.mlp)
    params = init_params("mlp", jnp.float64)
    opt_state = optimizer.init(params)
    x, y = jnp.asarray(batch[0]), jnp.asarray(batch[1])

    new_params, new_state, _ = train.make_train_step(loss_fn, optimizer)(params, opt_state, (x, y))
    for leaf in jax.tree_util.tree_leaves((params, opt_state)):
        assert leaf.is_deleted()
    for leaf in jax.tree_util.tree_leaves((new_params, new_state, x, y)):
        assert not leaf.is_deleted()  # the results and the batch live on
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(params["layers"][0]["w"])

    # donate=False leaves the inputs alone.
    kept = train.make_train_step(loss_fn, optimizer, donate=False)
    newer_params, _, _ = kept(new_params, new_state, (x, y))
    for leaf in jax.tree_util.tree_leaves((new_params, new_state)):
        assert not leaf.is_deleted()
    assert max_rel_err(newer_params, new_params) > 1e-6  # and it did step


STEP_OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "sgd-momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "clip+adam": lambda: optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-2)),
}


@pytest.mark.parametrize("optimizer_name", list(STEP_OPTIMIZERS))
def test_train_step_is_one_optax_update_for_any_optimizer(batch, optimizer_name):
    optimizer = STEP_OPTIMIZERS[optimizer_name]()
    step = train.make_train_step(models.classification_loss(models.mlp), optimizer)
    reference_loss = models.classification_loss(models.mlp, ops=hg.reference)

    @jax.jit
    def by_hand(params, opt_state, batch):  # what a step must be: autodiff, then optax
        grads = jax.grad(lambda p: reference_loss(p, batch)[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = init_params("mlp", jnp.float64)
    opt_state = optimizer.init(params)
    want_params, want_state = init_params("mlp", jnp.float64), optimizer.init(params)
    losses = []
    for _ in range(3):
        want_params, want_state = by_hand(want_params, want_state, batch)
        params, opt_state, metrics = step(params, opt_state, batch)
        assert set(metrics) == {"loss", "accuracy"}
        losses.append(float(metrics["loss"]))
        rtol = tolerances.autodiff_tolerance("float64").rtol
        assert max_rel_err(params, want_params) <= rtol
        assert max_rel_err(opt_state, want_state) <= rtol
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == jnp.float64
    assert losses[2] < losses[1] < losses[0], losses


# --- 3. a NaN or infinite loss stops fit -------------------------------------------------------


def test_fit_stops_on_divergence_naming_epoch_and_step(small):
    # lr = 1e30: the first step's loss (at the initial parameters) is finite, the update
    # overflows float32, and the second step's loss is not.
    with pytest.raises(
        train.NonFiniteLossError, match=r"at epoch 1, step 2 \(global step 2\)"
    ) as info:
        train.fit(
            init_params("mlp"),
            optax.sgd(1e30),
            models.classification_loss(models.mlp),
            small,
            epochs=2,
            batch_size=32,
            progress=False,
        )
    assert isinstance(info.value, FloatingPointError)
    assert re.search(r"became (nan|inf|-inf)", str(info.value)), str(info.value)


def test_fit_stops_at_the_step_that_sees_a_nan(small):
    n, batch_size = len(small.x_train), 96  # 3 steps per epoch, 32 examples dropped

    def order(epoch):  # the example indices of fit's batches in this epoch
        index = np.arange(n)
        return [
            b[0]
            for b in data.batches(
                index, index, batch_size, seed=0, epoch=epoch, drop_remainder=True
            )
        ]

    used_in_epoch1 = set(np.concatenate(order(0)).tolist())
    # An example that epoch 1 drops (remainder) and epoch 2 uses: epoch 1 runs clean.
    step, poisoned = next(
        (k + 1, int(i)) for k, b in enumerate(order(1)) for i in b if int(i) not in used_in_epoch1
    )
    x_train = small.x_train.copy()
    x_train[poisoned, 0, 3, 3] = np.nan
    poisoned_data = data.Dataset(x_train, small.y_train, small.x_test, small.y_test, 10, "nan")

    logged = []
    with pytest.raises(
        train.NonFiniteLossError,
        match=rf"became nan at epoch 2, step {step} \(global step {3 + step}\)",
    ):
        train.fit(
            init_params("mlp"),
            optax.adam(1e-3),
            models.classification_loss(models.mlp),
            poisoned_data,
            epochs=3,
            batch_size=batch_size,
            seed=0,
            progress=False,
            log=logged.append,
        )
    assert len(logged) == 1 and logged[0].startswith("epoch 1/3"), logged  # epoch 1 was fine


# --- 4. checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adam_checkpoint(tmp_path_factory, batch):
    """A training state after one adam step (float32 params, int32 count) and its checkpoint."""
    optimizer = optax.adam(1e-2)
    params = init_params("mlp")
    step = train.make_train_step(models.classification_loss(models.mlp), optimizer)
    x, y = batch
    params, opt_state, _ = step(params, optimizer.init(params), (x.astype(np.float32), y))
    state = {"params": params, "opt_state": opt_state, "epoch": np.int64(3)}
    path = train.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "adam.npz", state)
    return path, state


def zeros_like_init(init, *args):
    """Concrete zeros with the structure, shapes and dtypes ``init`` would give (traced only)."""
    abstract = jax.eval_shape(lambda key: init(key, *args), jax.random.key(0))
    return jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract)


def test_checkpoint_round_trip_is_bit_identical(tmp_path, adam_checkpoint):
    path, state = adam_checkpoint
    assert_trees_bit_identical(train.load_checkpoint(path, state), state)

    state = {
        **state,
        "odd": {
            "special": jnp.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], jnp.float32),
            "f64": jnp.asarray(np.random.default_rng(0).standard_normal((3, 4))),
            "i8": jnp.array([-128, 0, 127], jnp.int8),
            "flag": jnp.array(True),
        },
    }
    path = tmp_path / "sub" / "state.npz"  # the folder is created
    assert train.save_checkpoint(path, state) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.npz"]  # no temporary left
    assert_trees_bit_identical(train.load_checkpoint(path, state), state)

    # Overwriting an existing checkpoint replaces it.
    state["epoch"] = np.int64(4)
    train.save_checkpoint(path, state)
    assert int(train.load_checkpoint(path, state)["epoch"]) == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.npz"]


OTHER_STATES = {
    "another optimizer": lambda s: {**s, "opt_state": optax.sgd(0.1).init(s["params"])},
    "another model": lambda s: {**s, "params": zeros_like_init(models.init_cnn)},
    "other layer sizes": lambda s: {
        **s,
        "params": zeros_like_init(models.init_mlp, (64, 64, 31, 10)),
    },
    "another dtype": lambda s: {**s, "epoch": np.float64(3)},
    "fewer entries": lambda s: {"params": s["params"], "opt_state": s["opt_state"]},
}


@pytest.mark.parametrize("other", list(OTHER_STATES))
def test_checkpoint_of_another_structure_is_refused_naming_the_path(adam_checkpoint, other):
    path, state = adam_checkpoint
    like = OTHER_STATES[other](state)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        train.load_checkpoint(path, like)


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    missing = tmp_path / "nowhere" / "ckpt.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        train.load_checkpoint(missing, {"a": jnp.zeros(2)})


def test_checkpoint_round_trip_bfloat16(tmp_path):
    state = {"w": jnp.array([1.5, -2.0, 3.25], jnp.bfloat16)}
    path = train.save_checkpoint(tmp_path / "bf16.npz", state)
    assert_trees_bit_identical(train.load_checkpoint(path, state), state)


def test_resumed_fit_is_bit_identical_to_an_uninterrupted_one(tmp_path, small):
    optimizer = optax.adam(1e-2)
    loss_fn = models.classification_loss(models.mlp)
    fit = functools.partial(
        train.fit,
        optimizer=optimizer,
        loss_fn=loss_fn,
        data=small,
        epochs=2,
        batch_size=32,
        seed=3,
        progress=False,
    )

    whole = fit(init_params("mlp"))
    assert isinstance(whole, train.FitResult) and whole.state is None

    path = tmp_path / "ckpt.npz"
    first = fit(init_params("mlp"), checkpoint_path=path, stop_after_epoch=1)
    assert [e["epoch"] for e in first.history.epochs] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]  # history inside
    assert max_rel_err(first.params, whole.params) > 1e-3  # it really was interrupted

    logged = []
    resumed = fit(init_params("mlp"), checkpoint_path=path, resume=True, log=logged.append)
    assert logged[0] == f"resumed from {path} after epoch 1"
    assert_trees_bit_identical(resumed.params, whole.params)
    assert_trees_bit_identical(resumed.opt_state, whole.opt_state)
    # The history is continued: epoch 1 as recorded before the interruption, epoch 2 anew.
    history = resumed.history
    assert [e["epoch"] for e in history.epochs] == [1, 2]
    assert history.epochs[0] == first.history.epochs[0]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert history.epochs[1][key] == whole.history.epochs[1][key], key
    saved = train.load_fit_checkpoint(path, init_params("mlp"), optimizer)
    assert saved.history.epochs == history.epochs
    assert_trees_bit_identical(saved.params, whole.params)

    # Resuming a finished run trains no further.
    again = fit(init_params("mlp"), checkpoint_path=path, resume=True)
    assert_trees_bit_identical(again.params, whole.params)
    assert [e["epoch"] for e in again.history.epochs] == [1, 2]


def test_fit_resume_without_a_checkpoint_yet_starts_fresh_and_says_so(tmp_path, small):
    fit = functools.partial(train.fit, optimizer=optax.sgd(0.1),
                            loss_fn=models.classification_loss(models.mlp), data=small,
                            epochs=1, batch_size=32, seed=5, progress=False)
    path = tmp_path / "first-run.npz"
    logged = []
    result = fit(init_params("mlp"), checkpoint_path=path, resume=True, log=logged.append)
    assert logged[0] == f"no checkpoint at {path} yet: starting from epoch 0"
    assert [e["epoch"] for e in result.history.epochs] == [1] and path.is_file()
    assert_trees_bit_identical(result.params, fit(init_params("mlp")).params)
    with pytest.raises(ValueError, match=r"fit: resume=True needs `checkpoint_path`"):
        fit(init_params("mlp"), resume=True)


def test_fit_calls_on_step_after_every_step_with_the_new_parameters(small):
    seen = []
    result = train.fit(init_params("mlp"), optax.sgd(0.1), models.classification_loss(models.mlp),
                       small, epochs=2, batch_size=64, progress=False,
                       on_step=lambda step, params: seen.append((step, jax.device_get(params))))
    assert [step for step, _ in seen] == list(range(1, 11))  # 320 examples: 5 steps an epoch
    assert_trees_bit_identical(seen[-1][1], result.params)
    assert max_rel_err(seen[0][1], result.params) > 1e-3


# --- 5. evaluate ---------------------------------------------------------------------------------


def test_evaluate_weights_a_smaller_last_batch(small):
    params = init_params("mlp")
    loss_fn = models.classification_loss(models.mlp)
    eval_step = train.make_eval_step(loss_fn)
    x, y = small.x_test, small.y_test  # 100 examples: batches of 32, 32, 32 and 4

    batched = train.evaluate(eval_step, params, x, y, batch_size=32)
    whole = train.evaluate(eval_step, params, x, y, batch_size=len(x))
    assert set(batched) == set(whole) == {"loss", "accuracy"}
    for key in whole:
        np.testing.assert_allclose(batched[key], whole[key], rtol=1e-6, err_msg=key)
    loss, aux = eval_step(params, (x, y))
    np.testing.assert_allclose(whole["loss"], float(loss), rtol=1e-6)
    np.testing.assert_allclose(whole["accuracy"], float(aux["accuracy"]), rtol=1e-6)

    # The test can tell: a plain mean over the 4 batches is another number.
    per_batch = [eval_step(params, (x[i : i + 32], y[i : i + 32])) for i in range(0, 100, 32)]
    plain_loss = np.mean([float(b[0]) for b in per_batch])
    assert abs(plain_loss - whole["loss"]) > 1e-3 * whole["loss"]


# --- 6. data parallel over 4 host devices ---------------------------------------------------------


DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    from handgrad import data, models, tolerances, train

    out = {"num_devices": jax.device_count(), "platform": jax.default_backend()}
    mesh = train.make_mesh(4)
    out["mesh_size"] = int(mesh.devices.size)
    loss_fn = models.classification_loss(models.mlp)
    optimizer = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    xs = rng.random((3, 32, 1, 8, 8))
    ys = rng.integers(0, 10, (3, 32)).astype(np.int32)

    def init(dtype):
        return models.init_mlp(jax.random.key(0), (64, 64, 32, 10), dtype=dtype)

    def rel(a, b):  # on the host: the two trees live on different devices
        pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
        return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))
                         / np.max(np.abs(np.asarray(v, np.float64)))) for u, v in pairs)

    def replicated(tree):
        return all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
                   for leaf in jax.tree_util.tree_leaves(tree))

    for dtype in ("float32", "float64"):
        runs = {}
        for where in ("single", "mesh"):
            m = mesh if where == "mesh" else None
            params = init(dtype)
            opt_state = optimizer.init(params)
            if m is not None:
                params, opt_state = train.replicate(params, m), train.replicate(opt_state, m)
            step = train.make_train_step(loss_fn, optimizer, mesh=m)
            losses = []
            for i in range(3):
                batch = (xs[i].astype(dtype), ys[i])
                if m is not None:
                    batch = train.shard_batch(batch, m)
                    x = batch[0]
                    out["batch_shards"] = len(x.addressable_shards)
                    out["batch_shard_shapes"] = sorted({tuple(s.data.shape)
                                                        for s in x.addressable_shards})
                    out["batch_shard_devices"] = len({s.device for s in x.addressable_shards})
                    out["batch_spec_is_data"] = x.sharding.spec == P("data")
                    out["batch_replicated"] = x.sharding.is_fully_replicated
                params, opt_state, metrics = step(params, opt_state, batch)
                losses.append(float(metrics["loss"]))
            runs[where] = params, opt_state, losses
            if m is not None:
                out[f"params_replicated_{dtype}"] = replicated(params)
                out[f"opt_state_replicated_{dtype}"] = replicated(opt_state)
                out[f"metrics_replicated_{dtype}"] = replicated(metrics)
        out[f"param_rel_{dtype}"] = rel(runs["mesh"][0], runs["single"][0])
        out[f"losses_{dtype}"] = [runs["mesh"][2], runs["single"][2]]
        out[f"dtype_{dtype}"] = str(jax.tree_util.tree_leaves(runs["mesh"][0])[0].dtype)

    try:
        train.shard_batch((xs[0][:30], ys[0][:30]), mesh)
        out["batch_30"] = None
    except ValueError as e:
        out["batch_30"] = str(e)

    try:
        train.make_mesh(num_devices=5)
        out["mesh_5"] = None
    except ValueError as e:
        out["mesh_5"] = str(e)
    out["mesh_default_size"] = int(train.make_mesh().devices.size)
    out["mesh_2_size"] = int(train.make_mesh(2).devices.size)

    x_train = rng.random((128, 1, 8, 8)).astype(np.float32)
    y_train = rng.integers(0, 10, 128).astype(np.int32)
    ds = data.Dataset(x_train, y_train, x_train[:40], y_train[:40], 10, "random")
    fits = {}
    for where, m in (("mesh", train.make_mesh(4)), ("single", None)):
        fits[where] = train.fit(init("float32"), optimizer, loss_fn, ds, epochs=1,
                                batch_size=32, mesh=m, progress=False)
    params, _, history, _ = fits["mesh"]
    out["fit_epochs"] = [e["epoch"] for e in history.epochs]
    out["fit_finite"] = all(np.isfinite(v) for v in history.epochs[0].values())
    out["fit_params_replicated"] = replicated(params)
    out["fit_rel"] = rel(params, fits["single"].params)
    out["fit_test_loss"] = [history.epochs[0]["test_loss"],
                            fits["single"].history.epochs[0]["test_loss"]]
    try:
        train.fit(init("float32"), optimizer, loss_fn, ds, epochs=1, batch_size=30,
                  mesh=train.make_mesh(4), progress=False)
        out["fit_30"] = None
    except ValueError as e:
        out["fit_30"] = str(e)
    print(json.dumps(out))
""")

# Measured: after 3 adam steps (mlp 64-64-32-10, batch 32), the float32 parameters of the
# 4-device run differ from the single-device run's by 2.1e-6 relative (max |a − b| / max |b|
# per leaf): the all-reduce sums the per-device partial gradients in another order, and adam's
# g/(sqrt(v)+eps) magnifies that rounding on tiny gradient entries. After fit's 4 steps: 2.8e-7.
# float64: 7e-15. Bounds ~10× the float32 measurement, ~100× the float64 one.
DATA_PARALLEL_F32_RTOL = 2e-5
DATA_PARALLEL_F64_RTOL = 1e-12


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    script = tmp_path_factory.mktemp("data_parallel") / "data_parallel.py"
    script.write_text(DATA_PARALLEL_SCRIPT)
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        JAX_ENABLE_X64="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_data_parallel_step_matches_single_device(data_parallel):
    out = data_parallel
    assert out["num_devices"] == 4 and out["platform"] == "cpu" and out["mesh_size"] == 4
    # The batch really is split over the 4 devices, 8 examples each.
    assert out["batch_shards"] == 4 and out["batch_shard_devices"] == 4
    assert out["batch_shard_shapes"] == [[8, 1, 8, 8]]
    assert out["batch_spec_is_data"] and not out["batch_replicated"]
    for dtype, rtol in (("float32", DATA_PARALLEL_F32_RTOL), ("float64", DATA_PARALLEL_F64_RTOL)):
        assert out[f"dtype_{dtype}"] == dtype
        # The step's outputs are replicated on all 4 devices...
        assert out[f"params_replicated_{dtype}"] and out[f"opt_state_replicated_{dtype}"]
        assert out[f"metrics_replicated_{dtype}"]
        # ... and are the single-device step's, to rounding.
        assert out[f"param_rel_{dtype}"] <= rtol, (dtype, out[f"param_rel_{dtype}"])
        mesh_losses, single_losses = out[f"losses_{dtype}"]
        np.testing.assert_allclose(mesh_losses, single_losses, rtol=10 * rtol)


def test_data_parallel_errors(data_parallel):
    out = data_parallel
    assert out["batch_30"] is not None, "a batch of 30 on 4 devices was accepted"
    assert "batch size (30)" in out["batch_30"] and "divisible" in out["batch_30"]
    assert "(4)" in out["batch_30"]
    assert out["fit_30"] is not None and "batch size (30)" in out["fit_30"]
    assert out["mesh_5"] is not None, "make_mesh(5) on 4 devices was accepted"
    assert "(=5)" in out["mesh_5"] and "the 4 devices" in out["mesh_5"]
    assert out["mesh_default_size"] == 4 and out["mesh_2_size"] == 2


def test_data_parallel_fit_runs_an_epoch(data_parallel):
    out = data_parallel
    assert out["fit_epochs"] == [1] and out["fit_finite"]
    assert out["fit_params_replicated"]
    assert out["fit_rel"] <= DATA_PARALLEL_F32_RTOL, out["fit_rel"]
    np.testing.assert_allclose(*out["fit_test_loss"], rtol=1e-5)
