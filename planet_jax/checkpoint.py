"""Checkpoints of a run with orbax: the train state, the RNG key and the loop's counters."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

# orbax logs every save at INFO level through absl; a training run only needs its own messages.
_ABSL = logging.getLogger("absl")
_ABSL.setLevel(logging.WARNING)


@contextlib.contextmanager
def _quiet_absl():
    """orbax also logs its own ERROR lines for the damaged files whose exception we report."""
    level = _ABSL.level
    _ABSL.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        _ABSL.setLevel(level)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read."""


class Checkpointer:
    """Keeps the last `keep` checkpoints in `directory`, one per episode count."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        with _quiet_absl():  # reads every step's metadata, damaged ones included
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `step`; blocks until written."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if step in self._manager.all_steps():  # e.g. stopped during training after the last save
            self._manager.delete(step)
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores (state, meta) of `step` (the latest by default) into the structure of `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            with _quiet_absl():
                restored = self._manager.restore(step, args=args)
        except Exception as err:  # orbax raises many types for missing or damaged files
            earlier = [s for s in self._manager.all_steps() if s < step]
            hint = (f"; move it away to resume from checkpoint {max(earlier)}" if earlier else "")
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:200]}){hint}") from None
        # orbax returns plain tuples for NamedTuples (e.g. optax states): put the template's types back.
        leaves = jax.tree.leaves(restored.state)
        state = jax.tree.unflatten(jax.tree.structure(template), leaves)
        return state, dict(restored.meta)

    def close(self) -> None:
        self._manager.close()


def key_to_list(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                      else key).astype(np.uint32).tolist()


def key_from_list(data: list[int]) -> jax.Array:
    return jax.numpy.asarray(np.asarray(data, np.uint32))
