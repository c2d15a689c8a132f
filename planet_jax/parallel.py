"""Data parallelism with JAX's own sharding: one mesh axis 'data' over every device of the run.

The training step is the same jitted function for 1 or N devices (`learner.make_train_step(cfg, mesh)`):
the batch is split along its leading axis B over the mesh, the train state and the key are
replicated, and XLA inserts the gradient all-reduce. There is no hand-written distribution layer.

Several hosts (a TPU pod slice, GPU nodes) run one process each, started by their launcher;
`initialize_distributed()` connects them before anything touches a device. The mesh then spans all
processes' devices; each process samples its own share of the batch (B / processes sequences)
from its own replay and `shard_batch` assembles the global batch from the shares.

Acting (the planner, videos) never runs on the mesh: it uses `local_copy(params)`, the replica held
by this process's first device, so one process can act without the others.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Connects the processes of a multi-host run (`jax.distributed.initialize()`).

    Arguments come from the launcher's environment (Cloud TPU metadata, SLURM, Open MPI, or
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Call it before any other JAX call.
    """
    jax.distributed.initialize()


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full value on every device (train state, keys, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the devices: device d holds sequences [d B / n, (d + 1) B / n)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless B divides evenly across the mesh's devices."""
    n = mesh.size
    if batch_size % n:
        platform = mesh.devices.flat[0].platform
        options = sorted({max(n, batch_size - batch_size % n), batch_size + n - batch_size % n})
        raise ValueError(f"train.batch_size ({batch_size}) must be a multiple of the number of devices "
                         f"({n} {platform} devices), since each device trains on an equal share of the "
                         f"batch; use e.g. " + " or ".join(f"--set train.batch_size={b}" for b in options))


def local_batch_size(batch_size: int) -> int:
    """Sequences this process samples per step: B / number of processes."""
    return batch_size // jax.process_count()


def is_primary() -> bool:
    """Whether this process writes logs, videos and run files (process 0)."""
    return jax.process_index() == 0


def process_seed(seed: int) -> int:
    """`seed` itself on process 0 (so single-process runs are unchanged); a distinct seed elsewhere."""
    index = jax.process_index()
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def shard_batch(local: Any, mesh: Mesh) -> Any:
    """This process's share of a batch (a pytree of numpy arrays, leading axis B / processes) ->
    the global batch, split along B over the mesh. With one process this is `device_put`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A pytree whose value is the same on every process -> arrays replicated over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def local_copy(tree: Any) -> Any:
    """The replica of a replicated pytree held by this process's first device (no copy made)."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)
