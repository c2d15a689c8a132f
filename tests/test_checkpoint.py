"""planet_jax.checkpoint: failed saves leave nothing partial, damaged or unfinished checkpoints are
skipped in favour of the one before."""
import errno
import os
import signal
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from planet_jax import checkpoint


def _state(value):
    return {"train": {"w": jnp.full((3, 4), value, jnp.float32), "step": jnp.int32(value)},
            "key": jnp.arange(2, dtype=jnp.uint32) + value}


def _saved(directory, steps):
    ckpt = checkpoint.Checkpointer(directory)
    for step in steps:
        ckpt.save(step, _state(step), {"episode": step})
    return ckpt


def _assert_restored(ckpt, step):
    state, meta = ckpt.restore(_state(0))
    assert meta == {"episode": step}
    np.testing.assert_array_equal(state["train"]["w"], np.full((3, 4), step))
    assert int(state["train"]["step"]) == step


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def _zero_files(path):
    for f in path.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0")


def _delete_files(path):
    for f in path.rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.unlink()


@pytest.mark.parametrize("damage", [
    lambda step: _zero_files(step / "state"),          # array data and metadata overwritten
    lambda step: _delete_files(step / "state"),        # array files missing
    lambda step: (step / "meta" / "metadata").write_text("{ not json"),  # counters unreadable
])
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, damage):
    ckpt = _saved(tmp_path, [1, 2])
    damage(tmp_path / "2")
    ckpt = checkpoint.Checkpointer(tmp_path)  # as a resumed run opens it
    with pytest.warns(UserWarning, match=rf"^checkpoint {tmp_path / '2'} cannot be read \(.*\); "
                                         r"restoring checkpoint 1$") as caught:
        _assert_restored(ckpt, 1)
    assert "TensorStore" not in str(caught[0].message) and "\n" not in str(caught[0].message)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read") as info:
        ckpt.restore(_state(0), step=2)
    assert "\n" not in str(info.value)
    # The run goes on from 1 and writes its later checkpoints over the damaged one.
    ckpt.save(2, _state(22), {"episode": 2})
    state, meta = ckpt.restore(_state(0))
    assert int(state["train"]["step"]) == 22 and _names(tmp_path) == ["1", "2"]


def test_the_writer_sets_unreadable_checkpoints_aside_so_that_saves_keep_the_restored_one(tmp_path, monkeypatch):
    """A run that restores an older checkpoint may go on at a later step (its replay kept episodes
    stored after it): the damaged newer one must not count towards `keep`."""
    ckpt = _saved(tmp_path, [1, 2, 3])
    _zero_files(tmp_path / "3" / "state")
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.warns(UserWarning, match=rf"^checkpoint {tmp_path / '3'} cannot be read \(.*\) "
                                         rf"\(kept as {tmp_path / '3.unreadable'}\); restoring checkpoint 2$"):
        state, _ = ckpt.restore(_state(0), set_aside_unreadable=True)
    assert int(state["train"]["step"]) == 2 and _names(tmp_path) == ["2", "3.unreadable"]
    ckpt.save(4, _state(4), {"episode": 4})
    assert _names(tmp_path) == ["2", "3.unreadable", "4"]
    _assert_restored(ckpt, 4)
    # Damaged again: the next free name; a rename that fails says so, and the step stays.
    _zero_files(tmp_path / "4" / "state")
    (tmp_path / "4.unreadable").mkdir()
    with pytest.warns(UserWarning, match=rf"\(kept as {tmp_path / '4.unreadable2'}\); restoring checkpoint 2$"):
        checkpoint.Checkpointer(tmp_path).restore(_state(0), set_aside_unreadable=True)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(4, _state(4), {"episode": 4})
    _zero_files(tmp_path / "4" / "state")
    with monkeypatch.context() as m:
        m.setattr(checkpoint.Path, "rename", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
        with pytest.warns(UserWarning, match=r"\(not set aside: Permission denied\); restoring checkpoint 2$"):
            checkpoint.Checkpointer(tmp_path).restore(_state(0), set_aside_unreadable=True)
    assert _names(tmp_path) == ["2", "3.unreadable", "4", "4.unreadable", "4.unreadable2"]
    # A reader (evaluate) only skips: it never renames in a folder another process writes.
    _zero_files(tmp_path / "4" / "state")
    with pytest.warns(UserWarning, match=r"cannot be read \(.*\); restoring checkpoint 2$"):
        checkpoint.Checkpointer(tmp_path).restore(_state(0))
    assert _names(tmp_path) == ["2", "3.unreadable", "4", "4.unreadable", "4.unreadable2"]


def test_no_readable_checkpoint_is_one_error_naming_the_latest(tmp_path):
    ckpt = _saved(tmp_path, [1, 2])
    for step in ("1", "2"):
        _zero_files(tmp_path / step / "state")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.Checkpointer(tmp_path).restore(_state(0))
    message = str(info.value)
    assert message.startswith(f"no checkpoint in {tmp_path} can be read; the latest: checkpoint "
                              f"{tmp_path / '2'} cannot be read (")
    assert "\n" not in message
    with pytest.raises(checkpoint.CheckpointError, match=f"^no checkpoint in {tmp_path / 'empty'}$"):
        checkpoint.Checkpointer(tmp_path / "empty").restore(_state(0))


def _failing_save(ckpt, monkeypatch, code):
    """Orbax's save starts writing the step's temp folder, then the disk refuses with `code`."""
    def save(step, args, force):
        partial = ckpt.directory / f"{step}.orbax-checkpoint-tmp" / "state"
        partial.mkdir(parents=True)
        (partial / "manifest.ocdbt").write_bytes(b"part")
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(ckpt._manager, "save", save)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_failed_save_is_one_line_and_keeps_every_earlier_checkpoint(tmp_path, monkeypatch, code):
    ckpt = _saved(tmp_path, [1, 2])
    _failing_save(ckpt, monkeypatch, code)
    reason = f"{os.strerror(code)} ({errno.errorcode[code]})"
    with pytest.raises(checkpoint.CheckpointError) as info:
        ckpt.save(3, _state(3), {"episode": 3})
    assert str(info.value) == f"cannot write checkpoint {tmp_path / '3'}: {reason}"
    assert _names(tmp_path) == ["1", "2"]
    # Writing a step again sets the old one aside; a failure puts it back.
    with pytest.raises(checkpoint.CheckpointError, match=f"cannot write checkpoint {tmp_path / '2'}: "):
        ckpt.save(2, _state(22), {"episode": 2})
    assert _names(tmp_path) == ["1", "2"]
    _assert_restored(ckpt, 2)
    monkeypatch.undo()  # the disk is fixed: the same saves work
    ckpt.save(3, _state(3), {"episode": 3})
    _assert_restored(checkpoint.Checkpointer(tmp_path), 3)
    assert _names(tmp_path) == ["2", "3"]


def test_a_checkpoint_set_aside_by_a_killed_save_is_put_back(tmp_path):
    """What a kill leaves while checkpoint 2 is written again: the old 2 set aside, the new one unfinished."""
    _saved(tmp_path, [1, 2])
    (tmp_path / "2").rename(tmp_path / "2.replaced")
    (tmp_path / "2.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    ckpt = checkpoint.Checkpointer(tmp_path)
    _assert_restored(ckpt, 2)
    assert _names(tmp_path) == ["1", "2", "2.orbax-checkpoint-tmp"]
    ckpt.save(3, _state(3), {"episode": 3})
    assert _names(tmp_path) == ["2", "3"]


# A child process saves checkpoints 1 and 2; then the kernel refuses checkpoint 3's files past 4 KiB
# (RLIMIT_FSIZE: a real failed write, as on a full disk); then, with no limit, it starts checkpoint 3
# again and blocks inside orbax's writer just before the commit, where the test kills it with SIGKILL.
WRITER = """
import resource, signal, sys, time
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint._src.path.atomicity as atomicity
from planet_jax import checkpoint

def state(value):
    return {"train": {"w": jnp.full((3, 4), value, jnp.float32), "step": jnp.int32(value)},
            "key": jnp.arange(2, dtype=jnp.uint32) + value}

ckpt = checkpoint.Checkpointer(sys.argv[1])
ckpt.save(1, state(1), {"episode": 1})
ckpt.save(2, state(2), {"episode": 2})
big = {**state(3), "big": jnp.asarray(np.random.default_rng(0).normal(size=100_000), jnp.float32)}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    ckpt.save(3, big, {"episode": 3})
except checkpoint.CheckpointError as err:
    print(err, flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

async def blocked_finalize(self, *args, **kwargs):
    print("writing", flush=True)
    time.sleep(300)
atomicity.AtomicRenameTemporaryPath.finalize = blocked_finalize
ckpt.save(3, state(3), {"episode": 3})
"""


def test_a_failed_write_then_a_kill_in_the_middle_of_a_save(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(240, proc.kill)  # a child that never gets there must not hang the suite
    watchdog.start()
    try:
        error = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read() if proc.poll() else ""
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert error == f"cannot write checkpoint {tmp_path / '3'}: File too large (EFBIG)"
    assert _names(tmp_path) == ["1", "2", "3.orbax-checkpoint-tmp"]  # the killed write, unfinished
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.warns(UserWarning, match=rf"^checkpoint {tmp_path / '3'} was never finished; "
                                         r"restoring checkpoint 2$"):
        _assert_restored(ckpt, 2)
    ckpt.save(3, _state(3), {"episode": 3})
    assert _names(tmp_path) == ["2", "3"]
    _assert_restored(checkpoint.Checkpointer(tmp_path), 3)
