"""Data parallelism with ``jax.jit`` over a ``Mesh``: one axis, every device of every process.

Batches are split on their leading axis (``P("data")``); params and optimizer state are
replicated (``P()``) or sharded over the same axis (:mod:`saitjax.sharding`); XLA inserts the
gradient all-reduce (or reduce-scatter). The same code runs on one CPU, eight
virtual CPU devices in tests, a GPU node, or a multi-host TPU slice / GPU cluster once
:func:`initialize_distributed` has connected the processes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
# Variables that mark a multi-process launch (SLURM, Open MPI, TPU pods, or our own flag).
_CLUSTER_ENV = ("SAITJAX_DISTRIBUTED", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "JAX_COORDINATOR_ADDRESS")


def should_initialize_distributed(flag: bool | None) -> bool:
    """An explicit flag wins; otherwise a multi-process launch is detected from the environment."""
    if flag is not None:
        return flag
    if os.environ.get("SAITJAX_DISTRIBUTED", "").lower() in ("0", "false", "no"):
        return False
    if "SLURM_NTASKS" in os.environ and os.environ["SLURM_NTASKS"] == "1":
        return False
    return any(k in os.environ for k in _CLUSTER_ENV)


def initialize_distributed(flag: bool | None = None, **kwargs: Any) -> None:
    """``jax.distributed.initialize()`` when asked, before any other JAX call.

    With no ``kwargs`` JAX auto-detects the cluster (TPU pods, SLURM, Open MPI); pass
    ``coordinator_address``, ``num_processes`` and ``process_id`` for a manual launch.
    """
    if not should_initialize_distributed(flag) and not kwargs:
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes: shardings are propagated by the compiler (jax.make_mesh defaults to Explicit
    # axes, which would make every op's sharding part of its type).
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "batch_size") -> int:
    """Per-process batch size; a clear error, naming the config ``field``, if the global batch
    does not split evenly over the devices."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(f"{field}={global_batch_size} is not divisible by the {devices} devices "
                         f"of the mesh; use a multiple of {devices}")
    return global_batch_size // jax.process_count()


def to_global(tree: Any, sharding: NamedSharding) -> Any:
    """Assemble per-process numpy arrays into global ``jax.Array``s split on axis 0."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree: Any) -> Any:
    """Numpy copies of ``tree``'s global arrays on every process. Arrays sharded across processes
    (FSDP parameters on several hosts) are all-gathered: a collective, so every process calls it."""
    if all(getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False)
           for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def place(tree: Any, shardings: Any) -> Any:
    """Host (or device) arrays -> arrays with ``shardings`` (a tree like ``tree``); copies first,
    as :func:`replicate` does."""
    return jax.tree.map(lambda x, s: jax.device_put(jnp.array(x, copy=True), s), tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host (or device) arrays -> arrays replicated over ``mesh``.

    Copies first: ``device_put`` of a host array can alias its buffer, and a later donation of
    the replicated state would then invalidate the caller's original.
    """
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(jnp.array(x, copy=True), sharding), tree)
