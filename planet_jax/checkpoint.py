"""Checkpoints of a run with orbax: the train state, the RNG key and the loop's counters.

Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every
file is written, so a kill or a full disk during a save never leaves a partial checkpoint under a
step's name; `Checkpointer` adds one-line errors, the cleanup of what a failed save leaves, and a
`restore` that falls back to the newest checkpoint it can read.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

# orbax logs every save through absl (at INFO, and a WARNING whenever a save waits for the previous
# one's background work, as every save of a run does); a training run only needs its own messages,
# and Checkpointer reports failures itself.
_ABSL = logging.getLogger("absl")
_ABSL.setLevel(logging.ERROR)
# Orbax's name for a checkpoint being written: "<step>.orbax-checkpoint-tmp", in some versions with
# a suffix after it.
_UNFINISHED = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
# A checkpoint set aside while the same step is written again (`Checkpointer.save`).
_REPLACED = re.compile(r"^(\d+)\.replaced$")


@contextlib.contextmanager
def _quiet_absl():
    """orbax also logs its own ERROR lines (with tracebacks) for the failures whose exception we report."""
    level = _ABSL.level
    _ABSL.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        _ABSL.setLevel(level)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or none can be read; its text is one line naming the
    checkpoint and the reason."""


def _reason(err: BaseException) -> str:
    """One line saying why a save failed: the OS error ("No space left on device (ENOSPC)") where
    the exception or its cause carries one (tensorstore reports it as os_error_code='28'), else the
    exception's type and first line."""
    seen = err
    while seen is not None:
        code = getattr(seen, "errno", None)
        if code is None:
            match = re.search(r"os_error_code='?(\d+)", str(seen))
            code = int(match.group(1)) if match else None
        if code:
            name = errno.errorcode.get(code)
            return os.strerror(code) + (f" ({name})" if name else "")
        seen = seen.__cause__ or seen.__context__
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


class Checkpointer:
    """Keeps the last `keep` checkpoints in `directory`, one per step (the loop uses episode counts).

    One process writes (the run holds `rundir.lock`); others may read at the same time.
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        with _quiet_absl():  # reads every step's metadata, damaged ones included
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest step with a finished checkpoint (readable or not), or None."""
        return self._manager.latest_step()

    def read_meta(self, step: int) -> dict:
        """The JSON `meta` saved with checkpoint `step`, without reading its arrays.

        Raises CheckpointError (one line) if it cannot be read."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        try:
            with _quiet_absl():
                return dict(self._manager.restore(step, args=args).meta)
        except Exception as err:  # orbax raises many types for missing or damaged files
            raise self._unreadable(step, err) from None

    def _unreadable(self, step: int, err: Exception) -> CheckpointError:
        """'checkpoint <path> cannot be read (<type>: <first line of err>)', one line."""
        # tensorstore appends a pointer to its own objects, which tells a user nothing
        detail = re.sub(r"\.? *See full TensorStore details.*", "", (str(err).splitlines() or [""])[0])
        return CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read "
                               f"({type(err).__name__}: {detail[:200]})")

    def _leftovers(self, pattern: re.Pattern) -> dict[int, Path]:
        """Step -> folder in `directory` whose name matches `pattern` (unfinished or set aside)."""
        found = {}
        with contextlib.suppress(OSError):
            for path in self.directory.iterdir():
                match = pattern.match(path.name)
                if match:
                    found[int(match.group(1))] = path
        return found

    def _reload(self) -> None:
        with _quiet_absl():
            self._manager.reload()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `step`; blocks until written.

        An existing checkpoint of the same step (e.g. after a stop in the middle of training) is
        set aside as `<step>.replaced` and deleted only once the new one is written. What earlier
        failed or killed saves left behind is deleted first.

        Raises:
          CheckpointError (one line: the checkpoint's path and why, e.g. "No space left on device
          (ENOSPC)") if the checkpoint cannot be written. The unfinished write is then deleted, the
          checkpoint it was to replace is put back, and every earlier checkpoint stays readable.
        """
        final = self.directory / str(step)
        for path in self._leftovers(_UNFINISHED).values():
            shutil.rmtree(path, ignore_errors=True)
        self._restore_set_aside()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        set_aside = final.with_name(f"{step}.replaced")
        try:
            if step in self._manager.all_steps():
                final.rename(set_aside)
                self._reload()
            with _quiet_absl():
                self._manager.save(step, args=args, force=True)
                self._manager.wait_until_finished()
        except Exception as err:  # orbax and tensorstore raise many types for one failed write
            for path in self._leftovers(_UNFINISHED).values():
                shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                if set_aside.exists() and not final.exists():
                    set_aside.rename(final)
            with contextlib.suppress(Exception):
                self._reload()
            raise CheckpointError(f"cannot write checkpoint {final}: {_reason(err)}") from None
        shutil.rmtree(set_aside, ignore_errors=True)

    def _restore_set_aside(self) -> None:
        """Puts back a checkpoint set aside by a save that was killed before it finished."""
        for step, path in self._leftovers(_REPLACED).items():
            final = self.directory / str(step)
            with contextlib.suppress(OSError):
                if final.exists():
                    shutil.rmtree(path)
                else:
                    path.rename(final)
        self._reload()

    def _restore_step(self, template: Any, step: int) -> tuple[Any, dict]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        try:
            with _quiet_absl():
                restored = self._manager.restore(step, args=args)
        except Exception as err:  # orbax raises many types for missing or damaged files
            raise self._unreadable(step, err) from None
        # orbax returns plain tuples for NamedTuples (e.g. optax states): put the template's types back.
        leaves = jax.tree.leaves(restored.state)
        state = jax.tree.unflatten(jax.tree.structure(template), leaves)
        return state, dict(restored.meta)

    def restore(self, template: Any, step: int | None = None, set_aside_unreadable: bool = False
                ) -> tuple[Any, dict]:
        """Restores (state, meta) into the structure of `template`: of `step`, or by default of the
        newest checkpoint that can be read.

        By default a checkpoint that cannot be read (files missing or damaged, e.g. by a kill in the
        middle of writing it) is skipped with a `warnings.warn` naming it and the one restored
        instead; so is a newer write that never finished. A checkpoint that a killed `save` had set
        aside to write its step again is put back first. With `set_aside_unreadable` (for the one
        process that writes here), the skipped unreadable ones are renamed `<step>.unreadable`, kept
        for a look but no longer checkpoints: otherwise `keep` would count them, and the next saves
        could delete the readable checkpoint restored here while keeping them.

        Raises:
          CheckpointError (one line) if there is no checkpoint, if `step` is given and cannot be
          read, or if none can be read (naming the newest and why).
        """
        if step is not None:
            return self._restore_step(template, step)
        self._restore_set_aside()
        steps = sorted(self._manager.all_steps(), reverse=True)
        unfinished = sorted(s for s in self._leftovers(_UNFINISHED) if not steps or s > steps[0])
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}" + (
                f" (checkpoint {unfinished[-1]} was never finished)" if unfinished else ""))
        skipped = [f"checkpoint {self.directory / str(s)} was never finished" for s in unfinished]
        errors = []
        for s in steps:
            try:
                result = self._restore_step(template, s)
            except CheckpointError as err:
                errors.append((s, err))
                continue
            for unreadable, err in errors:
                reason = str(err)
                if set_aside_unreadable:
                    reason += f" ({self._set_aside(unreadable)})"
                skipped.append(reason)
            for reason in skipped:
                warnings.warn(f"{reason}; restoring checkpoint {s}", stacklevel=2)
            return result
        raise CheckpointError(f"no checkpoint in {self.directory} can be read; the latest: {errors[0][1]}")

    def _set_aside(self, step: int) -> str:
        """Renames checkpoint `step` to `<step>.unreadable` (`.unreadable2`, ... if taken); says
        where it went, or why it stays a checkpoint (then counted by `keep` as before)."""
        final = self.directory / str(step)
        n = 1
        while (aside := final.with_name(f"{step}.unreadable" + (str(n) if n > 1 else ""))).exists():
            n += 1
        try:
            final.rename(aside)
        except OSError as err:
            return f"not set aside: {err.strerror or err}"
        self._reload()
        return f"kept as {aside}"

    def close(self) -> None:
        self._manager.close()


def key_to_list(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                      else key).astype(np.uint32).tolist()


def key_from_list(data: list[int]) -> jax.Array:
    return jax.numpy.asarray(np.asarray(data, np.uint32))
