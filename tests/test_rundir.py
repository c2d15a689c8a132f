"""planet_jax.rundir: the run folder's files, its one-line errors and the one-run-per-folder lock."""
import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from planet_jax import config, rundir
from planet_jax.rundir import RunError

ENV = "cartpole_swingup"


def _one_line_error(fn, *args):
    with pytest.raises(RunError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_prepare_writes_the_run_and_read_returns_it(tmp_path):
    logdir = tmp_path / "a" / "run"
    cfg = config.tiny()
    assert rundir.prepare(logdir, cfg, ENV, 3) == cfg
    assert json.loads((logdir / "run.json").read_text()) == {"env": ENV, "seed": 3}
    assert rundir.read(logdir) == (cfg, ENV, 3)
    assert sorted(p.name for p in logdir.iterdir()) == ["config.json", "run.json"]  # no temp files


def test_resume_accepts_only_resumable_changes(tmp_path):
    cfg = config.tiny()
    rundir.prepare(tmp_path, cfg, ENV, 0)
    extended = config.override(cfg, ["train.episodes=9", "train.test_episodes=4",
                                     "train.max_skipped_updates=5", "planner.matmul_dtype=bfloat16"])
    with pytest.warns(rundir.ResumedWithChangesWarning) as record:
        assert rundir.prepare(tmp_path, extended, ENV, 0) == extended
    message = str(record[0].message)
    assert "train.test_episodes=4 (config.json: 2), train.max_skipped_updates=5 (config.json: 20)" in message
    assert "planner.matmul_dtype='bfloat16' (config.json: 'float32')" in message
    assert "episodes=9" not in message
    assert rundir.read(tmp_path)[0] == cfg  # the stored config is left as it was
    with warnings.catch_warnings():  # extending the run alone is the usual resume: no warning
        warnings.simplefilter("error")
        rundir.prepare(tmp_path, config.override(cfg, ["train.episodes=9"]), ENV, 0)
        # Nor for a field config.json does not hold (written before the field existed).
        written = json.loads((tmp_path / "config.json").read_text())
        del written["planner"]["matmul_dtype"]
        (tmp_path / "config.json").write_text(json.dumps(written))
        rundir.prepare(tmp_path, config.override(cfg, ["planner.matmul_dtype=bfloat16"]), ENV, 0)
    other = config.override(cfg, ["planner.candidates=32"])
    message = _one_line_error(rundir.prepare, tmp_path, other, ENV, 0)
    assert "holds a run with another config: planner.candidates (16 stored, 32 asked)" in message
    assert "holds a run of env cartpole_swingup seed 0, not cartpole_swingup seed 1" in \
        _one_line_error(rundir.prepare, tmp_path, cfg, ENV, 1)


def test_an_old_run_with_pins_a_new_config_rejects_is_read_as_it_ran(tmp_path):
    # Run folders written before such pins were rejected may hold them: a pin of no layer never
    # had an effect, and of a layer pinned twice the last one ran.
    cfg = config.override(config.tiny(), ["model.conv_impl=conv1=taps"])
    rundir.prepare(tmp_path, cfg, ENV, 0)
    stored = json.loads((tmp_path / "config.json").read_text())
    cases = [("decov2=taps,conv1=taps,deconv0=xla/auto", "conv1=taps",
              "ignoring the pins of deconv0, decov2, which name no layer \\(the stride-2 layers are conv0, "),
             ("decov2=taps", "auto", "ignoring the pin of decov2, which names no layer"),
             ("conv1=xla,conv1=taps", "conv1=taps", "conv1 pinned twice, keeping the last pin"),
             ("decov2=taps,conv1=xla, conv1 =taps", "conv1=taps", "decov2, which names no layer .*; conv1 pinned twice")]
    for spec, kept, message in cases:
        stored["model"]["conv_impl"] = spec
        (tmp_path / "config.json").write_text(json.dumps(stored))
        with pytest.warns(config.StoredConvImplWarning, match=message):
            read, env, seed = rundir.read(tmp_path)
        assert read.model.conv_impl == kept and (env, seed) == (ENV, 0)
    with warnings.catch_warnings():  # resuming: the asked conv_impl runs, so nothing to warn about
        warnings.simplefilter("error")
        assert rundir.prepare(tmp_path, cfg, ENV, 0) == cfg
    stored["model"]["conv_impl"] = "conv1=fastest"  # malformed: still an error
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert "model.conv_impl must be one of" in _one_line_error(rundir.read, tmp_path)


def test_a_logdir_that_is_a_file_or_under_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a run")
    for fn in (lambda d: rundir.prepare(d, config.tiny(), ENV, 0), lambda d: rundir.lock(d).__enter__()):
        assert _one_line_error(fn, path) == f"logdir {path} is a file, not a folder; use another --logdir"
        assert "cannot write to logdir" in _one_line_error(fn, path / "run")
    assert path.read_text() == "not a run"


def test_an_unwritable_logdir(tmp_path, monkeypatch):
    # Tests run as root, whom chmod does not stop: the write itself is made to fail as it would.
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
    monkeypatch.setattr(Path, "write_text", refuse)
    message = _one_line_error(rundir.prepare, tmp_path / "run", config.tiny(), ENV, 0)
    assert message == f"cannot write to logdir {tmp_path / 'run'}: Permission denied"


def test_read_rejects_what_is_not_a_readable_run(tmp_path):
    assert "is not a planet_jax run folder" in _one_line_error(rundir.read, tmp_path)
    rundir.prepare(tmp_path, config.tiny(), ENV, 0)
    stored = json.loads((tmp_path / "config.json").read_text())
    stored["loss"]["free_nats"] = float("nan")  # json writes NaN, and reads it back
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert "loss.free_nats must be a finite number, got nan" in _one_line_error(rundir.read, tmp_path)
    (tmp_path / "config.json").write_text("{")
    assert "cannot read the run in" in _one_line_error(rundir.read, tmp_path)
    assert "cannot be read" in _one_line_error(rundir.prepare, tmp_path, config.tiny(), ENV, 0)


def test_lock_refuses_a_second_holder_and_is_free_again_after_release(tmp_path):
    with rundir.lock(tmp_path) as path:
        assert path.read_text() == f"{os.getpid()}\n"
        message = _one_line_error(lambda: rundir.lock(tmp_path).__enter__())
        assert message.startswith(f"{tmp_path} is in use by process {os.getpid()} ")
    assert path.read_text() == ""
    with rundir.lock(tmp_path):
        pass


HOLD = """
import sys, time
from planet_jax import rundir
with rundir.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_lock_held_by_another_process_and_left_by_kill_9(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        message = _one_line_error(lambda: rundir.lock(tmp_path).__enter__())
        assert f"is in use by process {proc.pid} " in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / rundir.LOCK_FILE).read_text() == f"{proc.pid}\n"  # the killed holder's id stays
    with rundir.lock(tmp_path) as path:  # but never blocks
        assert path.read_text() == f"{os.getpid()}\n"
