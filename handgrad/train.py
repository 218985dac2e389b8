"""Training: a jit-compiled optax step, evaluation, a fit loop with progress, checkpoints.

The same step runs on one device or data-parallel over a :class:`jax.sharding.Mesh`: the batch
is split along its first axis with ``NamedSharding``, parameters and optimizer state are
replicated (or, with ``shard_params``, split over the same axis, FSDP/ZeRO-3 style), and XLA
inserts the collectives that average the gradients (the loss is a mean over the global batch,
so the averaged gradient is exactly the single-device one).

The mesh may span several processes (:mod:`handgrad.distributed`): every process runs ``fit``
on the same data with the same seed, so every process knows the global batch order; each puts
only its own devices' rows on them. Host reads of replicated values (the loss, the metrics)
read the local copy; checkpoints are gathered by every process and written by process 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from handgrad.checkpoint import load_checkpoint as load_checkpoint
from handgrad.checkpoint import read_checkpoint
from handgrad.checkpoint import save_checkpoint as save_checkpoint

BATCH_AXIS = "data"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the epoch and step."""


# --- devices and sharding --------------------------------------------------------------------


def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all of them by default; with
    several processes, every process's devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"`num_devices` (={num_devices}) must be between 1 and the {len(devices)} "
                f"devices ({devices[0].platform})."
            )
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError(
                f"`num_devices` (={num_devices}): with {jax.process_count()} processes the mesh "
                f"spans all {len(devices)} devices, every process's."
            )
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (BATCH_AXIS,))


# Parameters smaller than this many entries stay replicated under shard_params: splitting a
# bias saves nothing and costs a collective.
SHARD_MIN_SIZE = 1024


def param_sharding(mesh: Mesh, shard_params: bool = False) -> Callable:
    """``leaf -> NamedSharding`` for parameters and optimizer state: replicated, or with
    ``shard_params`` split over the mesh's data axis along the leaf's largest axis that the
    device count divides (leaves under :data:`SHARD_MIN_SIZE` entries stay replicated)."""
    n = mesh.devices.size

    def rule(leaf) -> NamedSharding:
        shape = tuple(np.shape(leaf))
        axes = [a for a in range(len(shape)) if shape[a] % n == 0]
        if not shard_params or n == 1 or not axes or math.prod(shape) < SHARD_MIN_SIZE:
            return NamedSharding(mesh, P())
        axis = max(axes, key=lambda a: shape[a])
        return NamedSharding(mesh, P(*([None] * axis), BATCH_AXIS))

    return rule


def place(tree, mesh: Mesh, rule: Callable | None = None):
    """Put host or device values onto the mesh, each leaf as ``rule(leaf)`` says (default
    replicated). On a mesh spanning several processes each process supplies the same whole
    values and puts only its own devices' parts (``jax.make_array_from_callback``). Typed
    PRNG keys travel as their raw data."""
    rule = rule or param_sharding(mesh)
    if all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        return jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf, rule(leaf)), tree)

    def one(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            impl = jax.random.key_impl(leaf)
            return jax.random.wrap_key_data(one(jax.random.key_data(leaf)), impl=impl)
        host = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array)
                          and not leaf.is_fully_addressable else leaf)
        return jax.make_array_from_callback(host.shape, rule(leaf), lambda index: host[index])

    return jax.tree_util.tree_map(one, tree)


def replicate(tree, mesh: Mesh):
    return place(tree, mesh)


def shard_batch(batch, mesh: Mesh):
    """Split every array of the (global) batch along its first axis over the mesh's devices;
    on a mesh spanning processes each process puts its own devices' rows."""
    n = mesh.devices.size
    for leaf in jax.tree_util.tree_leaves(batch):
        if leaf.shape[0] % n:
            raise ValueError(
                f"the batch size ({leaf.shape[0]}) must be divisible by the number of devices "
                f"({n}) for data-parallel training; choose `batch_size` as a multiple of {n}."
            )
    split = NamedSharding(mesh, P(BATCH_AXIS))
    return place(batch, mesh, lambda leaf: split)


def to_host(tree):
    """NumPy copies of ``tree``'s arrays, whole, on every process: replicated arrays are read
    locally, arrays split over processes are gathered (a collective: every process calls)."""
    def one(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):  # kept typed
            return leaf if leaf.is_fully_addressable else leaf.addressable_data(0)
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree_util.tree_map(one, tree)


# --- steps -----------------------------------------------------------------------------------


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    mesh: Mesh | None = None, donate: bool = True,
                    stateful: bool = False, shard_params: bool = False) -> Callable:
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
      shard_params: with a mesh, keep parameters and optimizer state split over the data
        axis (:func:`param_sharding`) instead of replicated; XLA gathers each weight where
        it is used and reduce-scatters its gradient. Same numbers, less memory per device.

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
    rule = param_sharding(mesh, shard_params)
    compiled = {}

    def sharded_step(params, opt_state, batch, *state):
        # The shardings of parameters and optimizer state follow from their shapes: build
        # the jit for this structure once, on the first call.
        key = jax.tree_util.tree_structure((params, opt_state))
        if key not in compiled:
            trees = tuple(jax.tree_util.tree_map(rule, t) for t in (params, opt_state))
            compiled[key] = jax.jit(step, donate_argnums=donate_argnums,
                                    in_shardings=(*trees, split, *extra),
                                    out_shardings=(*trees, replicated, *extra))
        return compiled[key](params, opt_state, batch, *state)

    return sharded_step


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
        for name, value in to_host({"loss": loss, **aux}).items():
            totals[name] = totals.get(name, 0.0) + float(value) * weight
    return {name: value / len(x) for name, value in totals.items()}


# --- the fit loop ----------------------------------------------------------------------------


@dataclass
class History:
    """One record per epoch: ``epoch``, ``train_<metric>`` and ``test_<metric>`` for the loss
    and every metric the loss function reports (``accuracy`` for classification), and the
    epoch's wall time ``seconds``."""

    epochs: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.epochs, indent=2)


class FitResult(NamedTuple):
    """What :func:`fit` returns, and what its checkpoint holds."""

    params: Any
    opt_state: Any
    history: History
    state: Any = None  # the model state of a stateful model; None otherwise


def load_fit_checkpoint(path: str | os.PathLike, params, optimizer: optax.GradientTransformation,
                        state=None) -> FitResult:
    """The checkpoint :func:`fit` wrote at ``path``, read into the structure of ``params``,
    ``optimizer``'s state and the model ``state`` (the arguments ``fit`` was given).

    ``len(result.history.epochs)`` is the number of epochs done. Raises like
    :func:`~handgrad.checkpoint.load_checkpoint`: ValueError naming the file when it is
    damaged or holds another model or optimizer.
    """
    tree, history = read_checkpoint(path, _fit_tree(params, optimizer.init(params), state))
    if history is None:
        raise ValueError(f"checkpoint {path} holds no training history: it was not written by "
                         "fit; train again to write one")
    return FitResult(tree["params"], tree["opt_state"], History(history), tree["state"])


def _fit_tree(params, opt_state, state) -> dict:
    return {"params": params, "opt_state": opt_state, "state": state}


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
        eval_loss_fn: Callable | None = None,
        on_step: Callable[[int, Any], None] | None = None,
        shard_params: bool = False) -> FitResult:
    """Train ``params`` on ``data`` (x_train, y_train, x_test, y_test) for ``epochs`` epochs.

    The shuffle of epoch ``e`` depends only on ``(seed, e)`` and the step is deterministic, so
    a run resumed from the checkpoint of epoch ``e`` ends bit-identical to an uninterrupted one
    (on CPU). A NaN or infinite loss stops training with :class:`NonFiniteLossError` naming
    the epoch and step.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (loss, metrics)``; the loss and every metric of
        the dict are averaged per epoch over the training and the test set (the history).
      checkpoint_path: after every epoch, parameters, optimizer state, model state and the
        history so far are saved there as one file (:func:`save_checkpoint`).
      resume: continue from ``checkpoint_path`` when it exists; when it does not yet (the
        first run of a job that always passes ``resume=True``), start at epoch 0 and say so
        through ``log``. Needs ``checkpoint_path``.
      stop_after_epoch: end early after this epoch (simulates an interruption in tests).
      state: the initial model state of a stateful model (batch-norm statistics, dropout
        key); then ``loss_fn`` is stateful (see :func:`make_train_step`) and
        ``eval_loss_fn`` (the same loss in evaluation mode) is required.
      on_step: called as ``on_step(global_step, params)`` after every step (1-based).
      shard_params: with a mesh, split parameters and optimizer state over the data axis
        (see :func:`make_train_step`).

    With a mesh spanning several processes every process calls ``fit`` with the same
    arguments; ``log`` and ``progress`` are for process 0 to pass, and only process 0 writes
    the checkpoint (every process reads it to resume).

    Returns:
      a :class:`FitResult` ``(params, opt_state, history, state)``; ``state`` is None for a
      stateless model.
    """
    from handgrad import data as data_lib

    stateful = state is not None
    if stateful and eval_loss_fn is None:
        raise ValueError("fit: a stateful model needs `eval_loss_fn` (its evaluation mode)")
    if resume and checkpoint_path is None:
        raise ValueError("fit: resume=True needs `checkpoint_path`, the checkpoint to continue")
    steps = data_lib.num_batches(len(data.x_train), batch_size, drop_remainder=True)
    if steps == 0:
        raise ValueError(f"`batch_size` (={batch_size}) is larger than the training set "
                         f"({len(data.x_train)} examples).")
    # The step donates its inputs; train on copies so the caller's arrays stay usable.
    params = jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params)
    start = FitResult(params, optimizer.init(params), History(), state)
    if resume and Path(checkpoint_path).is_file():
        start = load_fit_checkpoint(checkpoint_path, params, optimizer, state)
        if log:
            log(f"resumed from {checkpoint_path} after epoch {len(start.history.epochs)}")
    elif resume and log:
        log(f"no checkpoint at {checkpoint_path} yet: starting from epoch 0")
    history = start.history
    carry = (start.params, start.opt_state, *([start.state] if stateful else []))
    if mesh is not None:
        rule = param_sharding(mesh, shard_params)
        carry = (*place(carry[:2], mesh, rule), *replicate(carry[2:], mesh))
    step = make_train_step(loss_fn, optimizer, mesh=mesh, stateful=stateful,
                           shard_params=shard_params)
    eval_step = make_eval_step(eval_loss_fn or loss_fn, stateful=stateful)

    for epoch in range(len(history.epochs), epochs):
        started = time.perf_counter()
        batches = data_lib.batches(data.x_train, data.y_train, batch_size, seed=seed,
                                   epoch=epoch, drop_remainder=True)
        batches = _progress(batches, steps, f"epoch {epoch + 1}/{epochs}", progress)
        carry, train = _run_epoch(step, carry, batches, mesh, epoch, steps, on_step)
        test = evaluate(eval_step, carry[0], data.x_test, data.y_test, mesh=mesh,
                        state=carry[2] if stateful else None)
        seconds = time.perf_counter() - started
        history.epochs.append({"epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()},
                               **{f"test_{k}": v for k, v in test.items()}, "seconds": seconds})
        if log:
            log(f"epoch {epoch + 1}/{epochs}: train {_metrics_text(train)} | test "
                f"{_metrics_text(test)} | {seconds:.1f}s")
        if checkpoint_path is not None:
            tree = to_host(_fit_tree(carry[0], carry[1], carry[2] if stateful else None))
            if jax.process_index() == 0:
                save_checkpoint(checkpoint_path, tree, history=history.epochs)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return FitResult(carry[0], carry[1], history, carry[2] if stateful else None)


def _run_epoch(step: Callable, carry: tuple, batches: Iterable, mesh: Mesh | None,
               epoch: int, steps: int, on_step) -> tuple[tuple, dict[str, float]]:
    """Epoch ``epoch`` (0-based, ``steps`` steps): the carry ``(params, opt_state[, state])``
    after it and the mean of the loss and of every metric over its steps."""
    steps_before = epoch * steps
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches, start=1):
        batch = shard_batch(batch, mesh) if mesh is not None else batch
        params, opt_state, metrics, *state = step(carry[0], carry[1], batch, *carry[2:])
        carry = (params, opt_state, *state)
        values = {name: float(value) for name, value in to_host(metrics).items()}
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(
                f"the training loss became {values['loss']} at epoch {epoch + 1}, step {i} "
                f"(global step {steps_before + i}); try a smaller `learning_rate`"
            )
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        if on_step is not None:
            on_step(steps_before + i, params)
        if hasattr(batches, "set_postfix"):
            batches.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
    means = {name: total / i for name, total in sums.items()}
    return carry, {"loss": means.pop("loss"), **means}  # jit returns the metrics sorted


def _metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


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
