"""Training: a jit-compiled optax step, evaluation, a fit loop with progress, checkpoints.

The same step runs on one device or data-parallel over a :class:`jax.sharding.Mesh`: the batch
is split along its first axis with ``NamedSharding``, parameters and optimizer state are
replicated, and XLA inserts the all-reduce that averages the gradients (the loss is a mean over
the global batch, so the averaged gradient is exactly the single-device one).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "data"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the epoch and step."""


# --- devices and sharding --------------------------------------------------------------------


def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` local devices (all of them by default)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"`num_devices` (={num_devices}) must be between 1 and the {len(devices)} "
                f"local devices ({devices[0].platform})."
            )
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (BATCH_AXIS,))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch, mesh: Mesh):
    """Split every array of the batch along its first axis over the mesh's devices."""
    n = mesh.devices.size
    for leaf in jax.tree_util.tree_leaves(batch):
        if leaf.shape[0] % n:
            raise ValueError(
                f"the batch size ({leaf.shape[0]}) must be divisible by the number of devices "
                f"({n}) for data-parallel training; choose --batch-size as a multiple of {n}."
            )
    return jax.device_put(batch, NamedSharding(mesh, P(BATCH_AXIS)))


# --- steps -----------------------------------------------------------------------------------


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    mesh: Mesh | None = None, donate: bool = True,
                    stateful: bool = False) -> Callable:
    """A jit-compiled ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (loss, aux_metrics_dict)``; with ``stateful``,
        ``loss_fn(params, batch, state) -> (loss, (aux_metrics_dict, new_state))`` for
        models that carry non-trained state (batch-norm statistics, a dropout key).
      optimizer: any optax ``GradientTransformation``.
      mesh: data-parallel over this mesh (batch split, params replicated); None: one device.
      donate: donate the params and optimizer-state buffers to the step (updated in place).
      stateful: the step is ``step(params, opt_state, batch, state) -> (params, opt_state,
        metrics, state)``.

    Returns:
      the compiled step; ``metrics`` holds ``loss`` and the aux metrics.
    """

    def step(params, opt_state, batch, *state):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, *state)
        if stateful:
            aux, new_state = aux
        updates, opt_state = optimizer.update(grads, opt_state, params)
        out = (optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux})
        return (*out, new_state) if stateful else out

    donate_argnums = ((0, 1, 3) if stateful else (0, 1)) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(BATCH_AXIS))
    extra = (replicated,) if stateful else ()
    return jax.jit(step, donate_argnums=donate_argnums,
                   in_shardings=(replicated, replicated, split, *extra),
                   out_shardings=(replicated, replicated, replicated, *extra))


def make_eval_step(loss_fn: Callable, stateful: bool = False) -> Callable:
    """``eval_step(params, batch[, state]) -> (loss, aux)``; a stateful loss's new state is
    dropped (evaluation changes nothing)."""
    if not stateful:
        return jax.jit(loss_fn)

    def eval_step(params, batch, state):
        loss, (aux, _) = loss_fn(params, batch, state)
        return loss, aux

    return jax.jit(eval_step)


def evaluate(eval_step: Callable, params, x, y, batch_size: int = 512,
             mesh: Mesh | None = None, state=None) -> dict[str, float]:
    """Loss and metrics over the whole set, weighted by batch size (the last batch may be
    smaller). ``state``: the model state of a stateful eval step."""
    totals: dict[str, float] = {}
    extra = () if state is None else (state,)
    for start in range(0, len(x), batch_size):
        batch = (x[start:start + batch_size], y[start:start + batch_size])
        if mesh is not None:
            batch = replicate(batch, mesh)
        loss, aux = eval_step(params, batch, *extra)
        weight = len(batch[0])
        for name, value in {"loss": loss, **aux}.items():
            totals[name] = totals.get(name, 0.0) + float(value) * weight
    return {name: value / len(x) for name, value in totals.items()}


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, state) -> Path:
    """Save a pytree (params, optimizer state, counters) as ``.npz`` plus its structure.

    Written to a temporary file first and renamed, so an interruption never leaves half a
    checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    # Typed PRNG keys (jax.random.key) are stored as their raw data, tagged with their impl.
    names = [f"key:{jax.random.key_impl(leaf)}"
             if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key) else None
             for leaf in leaves]
    leaves = [np.asarray(jax.random.key_data(leaf)) if name else np.asarray(leaf)
              for leaf, name in zip(leaves, names)]
    # .npz cannot name bfloat16 (it would store raw void bytes): keep each leaf's dtype name
    # and store the bits of such leaves as unsigned integers of the same width.
    dtypes = np.array([name or leaf.dtype.name for leaf, name in zip(leaves, names)])
    arrays = {f"leaf_{i:05d}": leaf if leaf.dtype.isbuiltin else leaf.view(f"u{leaf.itemsize}")
              for i, leaf in enumerate(leaves)}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __structure__=np.array(str(treedef)), __dtypes__=dtypes, **arrays)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, like):
    """Load a checkpoint written by :func:`save_checkpoint` into the structure of ``like``.

    Raises ValueError naming the path when the structure, a shape or a dtype differs (a
    checkpoint of another model or optimizer), FileNotFoundError when it is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    leaves, treedef = jax.tree_util.tree_flatten(like)
    with np.load(path) as data:
        stored = str(data["__structure__"])
        if stored != str(treedef):
            raise ValueError(
                f"checkpoint {path} has another structure than the model/optimizer state: "
                f"stored {stored[:200]}…, expected {str(treedef)[:200]}…"
            )
        if "__dtypes__" not in data:
            raise ValueError(f"checkpoint {path} is in an older format (no dtype record); "
                             "train again to write a current one")
        names = [str(n) for n in data["__dtypes__"]]
        loaded = [data[f"leaf_{i:05d}"] for i in range(len(leaves))]
    loaded = [_restore_leaf(leaf, name) for leaf, name in zip(loaded, names)]
    leaves = [jax.random.key_data(leaf)
              if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key) else leaf
              for leaf in leaves]
    for i, (want, got) in enumerate(zip(leaves, loaded)):
        want = np.asarray(want)
        if want.shape != got.shape or want.dtype != got.dtype:
            raise ValueError(
                f"checkpoint {path}: leaf {i} is {got.dtype}{list(got.shape)}, expected "
                f"{want.dtype}{list(want.shape)}"
            )
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.wrap_key_data(leaf, impl=name[4:]) if name.startswith("key:")
                  else jnp.asarray(leaf) for leaf, name in zip(loaded, names)])


def _restore_leaf(leaf: np.ndarray, name: str) -> np.ndarray:
    if name.startswith("key:") or leaf.dtype.name == name:
        return leaf
    return leaf.view(jnp.dtype(name))  # bfloat16 & co., stored as same-width unsigned ints


# --- the fit loop ----------------------------------------------------------------------------


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.epochs, indent=2)


def _progress(iterable: Iterable, total: int, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


def fit(params, optimizer: optax.GradientTransformation, loss_fn: Callable, data, *,
        epochs: int, batch_size: int, seed: int = 0, mesh: Mesh | None = None,
        checkpoint_path: str | os.PathLike | None = None, resume: bool = False,
        progress: bool = True, log: Callable[[str], None] | None = None,
        stop_after_epoch: int | None = None, state=None,
        eval_loss_fn: Callable | None = None):
    """Train ``params`` on ``data`` (x_train, y_train, x_test, y_test) for ``epochs`` epochs.

    The shuffle of epoch ``e`` depends only on ``(seed, e)`` and the step is deterministic, so
    a run resumed from the checkpoint of epoch ``e`` ends bit-identical to an uninterrupted one
    (on CPU). A NaN or infinite loss stops training with :class:`NonFiniteLossError` naming
    the epoch and step.

    Args:
      checkpoint_path: where parameters, optimizer state and epoch are saved after every epoch.
      resume: continue from ``checkpoint_path`` when it exists; when it does not yet (the
        first run of a job that always passes ``resume=True``), start at epoch 0 and say so
        through ``log``. Needs ``checkpoint_path``.
      stop_after_epoch: end early after this epoch (simulates an interruption in tests).
      state: the initial model state of a stateful model (batch-norm statistics, dropout
        key); then ``loss_fn`` is stateful (see :func:`make_train_step`) and
        ``eval_loss_fn`` (the same loss in evaluation mode) is required.

    Returns:
      ``(params, opt_state, history)``, and the final model state as a fourth element when
      ``state`` was given; ``history.epochs`` holds per-epoch train/test loss and accuracy
      and the epoch's wall time.
    """
    from handgrad import data as data_lib

    # The step donates its inputs; train on copies so the caller's arrays stay usable.
    params = jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params)
    stateful = state is not None
    if stateful and eval_loss_fn is None:
        raise ValueError("fit: a stateful model needs `eval_loss_fn` (its evaluation mode)")
    if resume and checkpoint_path is None:
        raise ValueError("fit: resume=True needs `checkpoint_path`, the checkpoint to continue")
    opt_state = optimizer.init(params)
    start_epoch, history = 0, History()
    if resume and Path(checkpoint_path).is_file():
        saved = load_checkpoint(checkpoint_path, _checkpoint(params, opt_state, state, 0))
        params, opt_state, state = saved["params"], saved["opt_state"], saved.get("state")
        start_epoch = int(saved["epoch"])
        history_file = Path(checkpoint_path).with_suffix(".history.json")
        if history_file.is_file():
            history.epochs = json.loads(history_file.read_text())[:start_epoch]
        if log:
            log(f"resumed from {checkpoint_path} after epoch {start_epoch}")
    elif resume and log:
        log(f"no checkpoint at {checkpoint_path} yet: starting from epoch 0")
    if mesh is not None:
        params, opt_state = replicate(params, mesh), replicate(opt_state, mesh)
        state = replicate(state, mesh) if stateful else None
    step = make_train_step(loss_fn, optimizer, mesh=mesh, stateful=stateful)
    eval_step = make_eval_step(eval_loss_fn or loss_fn, stateful=stateful)
    steps_per_epoch = data_lib.num_batches(len(data.x_train), batch_size, drop_remainder=True)
    if steps_per_epoch == 0:
        raise ValueError(
            f"`batch_size` (={batch_size}) is larger than the training set "
            f"({len(data.x_train)} examples)."
        )

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        sums = {}
        batches = data_lib.batches(data.x_train, data.y_train, batch_size, seed=seed,
                                   epoch=epoch, drop_remainder=True)
        bar = _progress(batches, steps_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        for i, batch in enumerate(bar):
            batch = shard_batch(batch, mesh) if mesh is not None else batch
            if stateful:
                params, opt_state, metrics, state = step(params, opt_state, batch, state)
            else:
                params, opt_state, metrics = step(params, opt_state, batch)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"the training loss became {loss} at epoch {epoch + 1}, step {i + 1} "
                    f"(global step {epoch * steps_per_epoch + i + 1}); try a smaller --lr"
                )
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            if progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{float(metrics['accuracy']):.3f}")
        test = evaluate(eval_step, params, data.x_test, data.y_test, mesh=mesh, state=state)
        record = {
            "epoch": epoch + 1,
            "train_loss": sums["loss"] / steps_per_epoch,
            "train_accuracy": sums["accuracy"] / steps_per_epoch,
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "seconds": time.perf_counter() - started,
        }
        history.epochs.append(record)
        if log:
            log(f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} "
                f"acc {record['train_accuracy']:.4f} | test loss {record['test_loss']:.4f} "
                f"acc {record['test_accuracy']:.4f} | {record['seconds']:.1f}s")
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, _checkpoint(params, opt_state, state, epoch + 1))
            Path(checkpoint_path).with_suffix(".history.json").write_text(history.to_json())
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return (params, opt_state, history, state) if stateful else (params, opt_state, history)


def _checkpoint(params, opt_state, state, epoch: int) -> dict:
    saved = {"params": params, "opt_state": opt_state, "epoch": np.int64(epoch)}
    if state is not None:
        saved["state"] = state
    return saved


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """An optax optimizer by name (``adam``, ``sgd``, ``adamw``, …), with a clear error."""
    factory = getattr(optax, name, None)
    if not callable(factory) or name.startswith("_"):
        raise ValueError(
            f"unknown optimizer {name!r}: use an optax optimizer name such as adam, adamw, "
            f"sgd, rmsprop, lion, lamb"
        )
    try:
        optimizer = factory(learning_rate)
    except TypeError as error:
        raise ValueError(f"optax.{name} is not an optimizer taking a learning rate") from error
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optax.{name} is not an optimizer")
    return optimizer
