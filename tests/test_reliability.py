"""A run meets bad numbers, a full disk, kill -9 and a second process on its folder, and says what
happened in one line, losing at most the round in progress."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import train as train_cli
from planet_jax import config, loop, replay, rundir

ENV = "cartpole_swingup"  # tiny preset: 14-frame episodes


def _records(logdir):
    path = logdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _main(argv, capsys):
    """experiments.train in this process: (exit code, stderr)."""
    try:
        code = train_cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def _args(logdir, episodes, *extra):
    return ["--env", ENV, "--preset", "tiny", "--logdir", str(logdir), "--episodes", str(episodes),
            "--no-progress", "--set", "train.test_every=100", *extra]


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(tmp_path, capsys):
    logdir = tmp_path / "run"
    assert _main(_args(logdir, 2), capsys)[0] == 0  # the two seed episodes
    for path in sorted((logdir / "episodes").glob("episode_*.npz")):  # a bad sensor: NaN rewards
        episode = replay.load_episode(path)
        episode["reward"][:] = np.nan
        path.unlink()
        replay.save_episode(logdir / "episodes", episode, int(path.name.split("_")[1]))
    # C = 5: the first trained round skips all 5 updates and goes on, the second reaches the limit.
    with pytest.warns(rundir.ResumedWithChangesWarning, match=r"train\.max_skipped_updates=8 \(config\.json: 20\)"):
        code, err = _main(_args(logdir, 6, "--set", "train.max_skipped_updates=8"), capsys)
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "10 updates in a row" in err and "update 10" in err and "checkpoints/3" in err
    records = _records(logdir)
    assert [r["episode"] for r in records] == [1, 2, 3]
    assert records[-1]["skipped_updates"] == 5 and records[-1]["updates"] == 5
    assert "loss" not in records[-1]  # no finite update to average
    # Every update was skipped, so the last checkpoint holds the initial parameters (seed 0).
    saved = jax.tree.leaves(loop.load_params(logdir, 1))
    initial = jax.tree.leaves(loop.state_template(config.tiny(), 1)["train"].params)
    assert len(saved) == len(initial)
    for got, expected in zip(saved, initial):
        np.testing.assert_array_equal(got, expected)


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    logdir = tmp_path / "run"
    assert _main(_args(logdir, 2), capsys)[0] == 0
    real = np.savez_compressed

    def full(file, **arrays):
        file.write(b"PK\x03\x04 half an episode")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez_compressed", full)
    code, err = _main(_args(logdir, 4), capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "episode_000002" in err and "No space left on device" in err
    names = sorted(p.name for p in (logdir / "episodes").iterdir())
    assert names == ["episode_000000_14.npz", "episode_000001_14.npz"]  # no partial or temp file
    monkeypatch.setattr(np, "savez_compressed", real)
    assert _main(_args(logdir, 4), capsys)[0] == 0
    memory = replay.Replay(logdir / "episodes", 0)
    assert memory.load() == 4
    assert [r["episode"] for r in _records(logdir)][-2:] == [3, 4]


# experiments.train with a hook: at the first update of the first trained round it writes a
# marker file and waits to be killed, or, in the middle of writing the checkpoint of episode 3 (its
# files being written, not yet committed), it kills itself with SIGKILL.
HOOKED = """
import os, signal, sys, time
from pathlib import Path
import orbax.checkpoint as ocp
from experiments import train
from planet_jax import logger

where, marker = sys.argv[1], Path(sys.argv[2])
if where == "update":
    def updated(self, metrics):
        marker.write_text(str(os.getpid()))
        time.sleep(600)
    logger.Progress.updated = updated
else:
    real_save = ocp.CheckpointManager.save
    def save(self, step, *args, **kwargs):
        result = real_save(self, step, *args, **kwargs)
        if step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    ocp.CheckpointManager.save = save
sys.exit(train.main(sys.argv[3:]))
"""


def _start(logdir, hook=None):
    """experiments.train (4 episodes) in a subprocess, its output in a file beside the run folder
    (a pipe that nobody reads could fill up and stall it)."""
    log = open(logdir.parent / f"train_{time.monotonic_ns()}.log", "w+")
    prefix = ["-c", HOOKED, hook, str(logdir.parent / "marker")] if hook else ["-m", "experiments.train"]
    return subprocess.Popen([sys.executable, *prefix, *_args(logdir, 4)], env=dict(os.environ, MUJOCO_GL="egl"),
                            stdout=log, stderr=subprocess.STDOUT, text=True), log


def _output(log) -> str:
    log.seek(0)
    return log.read()


def test_one_run_per_folder_and_kill_9_in_an_update_round_and_a_checkpoint_write(tmp_path):
    """A second run on a folder in use is refused in one line, naming the process; kill -9 of the
    first in the middle of an update round, then of the resumed one in the middle of writing a
    checkpoint; each time the same command resumes, and the run ends with every episode readable."""
    logdir, marker = tmp_path / "run", tmp_path / "marker"
    first, log = _start(logdir, hook="update")
    deadline = time.time() + 600
    while not marker.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), _output(log)
    second = subprocess.run([sys.executable, "-m", "experiments.train", *_args(logdir, 4)],
                            env=dict(os.environ, MUJOCO_GL="egl"), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and f"in use by process {first.pid}" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert [r["episode"] for r in _records(logdir)] == [1, 2]  # the round in progress is lost

    resumed, log = _start(logdir, hook="checkpoint")
    assert resumed.wait(timeout=900) == -signal.SIGKILL, _output(log)
    assert [r["episode"] for r in _records(logdir)] == [1, 2, 3]

    last, log = _start(logdir)
    assert last.wait(timeout=900) == 0, _output(log)
    assert "Traceback" not in _output(log)
    assert [r["episode"] for r in _records(logdir)] == [1, 2, 3, 4]
    memory = replay.Replay(logdir / "episodes", 0)
    assert memory.load() == 4
    assert loop.load_params(logdir, 1) is not None
