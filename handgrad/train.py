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
                f"({n}) for data-parallel training; choose `batch_size` as a multiple of {n}."
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
        on_step: Callable[[int, Any], None] | None = None) -> FitResult:
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
        carry = replicate(carry, mesh)
    step = make_train_step(loss_fn, optimizer, mesh=mesh, stateful=stateful)
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
            tree = _fit_tree(carry[0], carry[1], carry[2] if stateful else None)
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
        values = {name: float(value) for name, value in metrics.items()}
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
