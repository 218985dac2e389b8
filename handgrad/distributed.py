"""Several processes, one program: JAX's distributed runtime as handgrad's jobs use it.

Every process runs the same script. :func:`initialize` connects them (``jax.distributed``:
a coordinator at ``host:port``, the process count and this process's id — from the arguments,
from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or detected by
JAX on SLURM, Open MPI, Kubernetes and Cloud TPU). From then on ``jax.devices()`` lists every
process's devices, a :class:`jax.sharding.Mesh` over them spans the hosts, and a jit-compiled
step runs on all of them with XLA's collectives between (gloo on CPUs, NCCL on GPUs, ICI on
TPUs). Each process holds only its own devices' part of an array:
:func:`handgrad.train.place` puts each process's part of a global value on its devices,
:func:`handgrad.train.to_host` brings a (replicated or sharded) array back whole.

A process that dies is noticed by the coordination service within ``heartbeat_timeout``
seconds; the others then stop with JAX's "Terminating process because the JAX distributed
service detected fatal errors" instead of waiting forever in a collective.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import jax

HEARTBEAT_TIMEOUT_SECONDS = 30
INITIALIZATION_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Processes:
    """Who this process is among how many; ``main`` is process 0, the one that reports."""

    index: int
    count: int

    @property
    def main(self) -> bool:
        return self.index == 0


def current() -> Processes:
    return Processes(jax.process_index(), jax.process_count())


def _int_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT_SECONDS,
               initialization_timeout: int = INITIALIZATION_TIMEOUT_SECONDS) -> Processes:
    """Join the other processes (call before anything else touches JAX's devices).

    Arguments left ``None`` come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``, else from JAX's cluster detection. A loopback coordinator
    (``127.0.0.1:PORT``, ``localhost:PORT``) is listened on at that address only.

    Args:
      coordinator: ``host:port`` of process 0, which runs the coordination service.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 ≤ process_id < num_processes``.
      heartbeat_timeout: seconds after which a silent process counts as dead and the others
        stop.
      initialization_timeout: seconds to wait for every process to connect.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _int_from_env("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _int_from_env("JAX_PROCESS_ID")
    if coordinator is not None and ":" not in coordinator:
        raise ValueError(f"initialize: `coordinator` must be host:port, got {coordinator!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"initialize: `num_processes` must be ≥ 1, got {num_processes}")
    if (process_id is not None and num_processes is not None
            and not 0 <= process_id < num_processes):
        raise ValueError(f"initialize: `process_id` must be in [0, {num_processes}), got "
                         f"{process_id}")
    bind = coordinator if coordinator is not None and _is_loopback(coordinator) else None
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
        coordinator_bind_address=bind, heartbeat_timeout_seconds=heartbeat_timeout,
        initialization_timeout=initialization_timeout)
    return current()


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
