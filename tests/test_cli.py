"""The real command line, end to end on a real dm_control task with the tiny preset."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import evaluate as evaluate_cli
from experiments import train as train_cli
from tests.conftest import xla_flags

ENV = "cartpole_swingup"  # tiny preset: 100 environment steps at repeat 8 -> 14-frame episodes


def _cli(module, *args):
    env = dict(os.environ, MUJOCO_GL="egl")  # with conftest.py's compilation cache for the session
    return [sys.executable, "-m", module, *args], env


def _run(module, *args, timeout=300):
    cmd, env = _cli(module, *args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _records(logdir):
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_stop_and_evaluate(tmp_path):
    logdir = tmp_path / "run"
    base = ("--env", ENV, "--preset", "tiny", "--logdir", str(logdir), "--no-progress")

    first = _run("experiments.train", *base, "--episodes", "3")
    assert first.returncode == 0, first.stderr
    rounds = [line for line in first.stdout.splitlines() if line.startswith("episode ")]  # --no-progress
    assert [line.split(":")[0] for line in rounds] == ["episode 1/3", "episode 2/3", "episode 3/3"]
    assert "test return" in rounds[2] and "loss" in rounds[2] and "loss" not in rounds[0]
    assert first.stdout.splitlines()[-1].startswith(f"{logdir} holds 3 episodes (5 updates, wall time 0:")
    records = _records(logdir)
    assert [r["episode"] for r in records] == [1, 2, 3]
    assert records[-1]["updates"] == 5 and "test_return" in records[-1] and "image_loss" in records[-1]
    assert records[-1]["env_steps"] == 3 * 100  # simulator steps: 13 agent steps of R = 8, the last cut to 4
    assert max(int(p.name) for p in (logdir / "checkpoints").iterdir()) == 3
    assert len(list((logdir / "episodes").glob("episode_*.npz"))) == 3
    assert (logdir / "videos" / "test_000003.mp4").stat().st_size > 0
    assert (logdir / "videos" / "openloop_000003.mp4").stat().st_size > 0
    assert list((logdir / "tensorboard").glob("events.out.tfevents.*"))
    # The same command again finds the run complete, says so, and writes nothing.
    again = _run("experiments.train", *base, "--episodes", "3")
    assert again.returncode == 0, again.stderr
    assert "already holds 3 episodes" in again.stdout and _records(logdir) == records

    # A corrupt episode file is skipped with a one-line warning; the run goes on.
    (logdir / "episodes" / "episode_000050_14.npz").write_bytes(b"PK\x03\x04 truncated")
    # Stopped by SIGTERM in the middle of the second invocation: it saves and exits cleanly.
    cmd, env = _cli("experiments.train", *base, "--episodes", "8")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(_records(logdir)) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out and "Traceback" not in err
    assert "warning:" in err and "episode_000050_14.npz" in err
    stopped_at = len(_records(logdir))
    assert 4 <= stopped_at < 8
    assert str(stopped_at) in {p.name for p in (logdir / "checkpoints").iterdir()}

    # Resuming after a stop is tested through the CLI in test_gym.py (after a finished run) and
    # test_reliability.py (after kill -9), and round for round in test_loop.py.

    result = _run("experiments.evaluate", "--logdir", str(logdir), "--episodes", "2")
    assert result.returncode == 0, result.stderr
    assert "mean" in result.stdout and (logdir / "videos" / "eval_001.mp4").exists()

    # Checkpoints that are all damaged are named in one line, exit 2, and the folder is left as it was.
    for f in (logdir / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "meta" not in str(f):
            f.write_bytes(b"\0")
    before = sorted(p.name for p in (logdir / "episodes").iterdir())
    broken = _run("experiments.train", *base, "--episodes", "20")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    *warnings, error = broken.stderr.strip().splitlines()
    assert all(line.startswith("warning: skipping corrupt episode") for line in warnings), warnings
    assert "checkpoint" in error and "cannot be read" in error
    assert sorted(p.name for p in (logdir / "episodes").iterdir()) == before


def _usage_error(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--env", "walker_wlk"], "walker_walk"),
    (["--env", ENV, "--episodes", "0"], "train.episodes must be positive"),
    (["--env", ENV, "--set", "train.batch_size=-1"], "train.batch_size must be positive"),
    (["--env", ENV, "--set", "planner.top_k=100"], "must not exceed planner.candidates"),
    (["--env", ENV, "--set", "train.chunk_length=40"], "longer than an episode"),
    (["--env", ENV, "--set", "model.nope=1"], "unknown field 'nope'"),
    (["--env", ENV, "--set", "train.batch_size=many"], "bad value for train.batch_size"),
    (["--env", ENV, "--episodes", "many"], "invalid int value"),
    (["--env", ENV, "--set", "loss.free_nats=nan"], "expected a finite number, got 'nan'"),
    (["--env", ENV, "--set", "optim.lr=inf"], "expected a finite number"),
    (["--env", ENV, "--set", "optim.lr=fast"], "bad value for optim.lr"),
    (["--env", ENV, "--action-repeat", "-1"], "action_repeat"),
])
def test_train_usage_errors(tmp_path, capsys, argv, message):
    err = _usage_error(train_cli.main, argv + ["--preset", "tiny", "--logdir", str(tmp_path / "r")], capsys)
    assert message in err


def test_unwritable_logdir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = _usage_error(train_cli.main, ["--env", ENV, "--preset", "tiny", "--logdir", str(blocker / "run")],
                       capsys)
    assert "cannot write to logdir" in err


def test_logdir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = _usage_error(train_cli.main, ["--env", ENV, "--preset", "tiny", "--logdir", str(blocker)], capsys)
    assert "is a file, not a folder" in err
    assert blocker.read_text() == "not a folder"


def test_batch_that_does_not_divide_over_the_devices():
    cmd, env = _cli("experiments.train", "--env", ENV, "--preset", "tiny", "--set", "train.batch_size=3",
                    "--logdir", "/nonexistent/never_written")
    env["XLA_FLAGS"] = xla_flags("--xla_force_host_platform_device_count=2")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "batch_size" in result.stderr, result.stderr


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    logdir = tmp_path / "r"
    logdir.mkdir()
    (logdir / "run.json").write_text(json.dumps({"env": ENV, "seed": 0}))
    from planet_jax import config
    (logdir / "config.json").write_text(json.dumps(config.to_dict(config.tiny())))
    err = _usage_error(train_cli.main, ["--env", ENV, "--preset", "tiny", "--logdir", str(logdir),
                                        "--set", "planner.candidates=32"], capsys)
    assert "planner.candidates" in err
    (logdir / "config.json").write_text("{ not json")
    err = _usage_error(train_cli.main, ["--env", ENV, "--preset", "tiny", "--logdir", str(logdir)], capsys)
    assert "cannot be read" in err


@pytest.mark.parametrize("main, argv, message", [
    (train_cli.main, ["--preset", "cpuu"], "argument --preset: invalid choice: 'cpuu'"),
    (train_cli.main, ["--episodes", "many"], "argument --episodes: invalid int value: 'many'"),
    (train_cli.main, ["--envv", ENV], "unrecognized arguments: --envv"),
    (evaluate_cli.main, [], "the following arguments are required: --logdir"),
])
def test_argparse_errors_are_one_line(main, argv, message, capsys):
    (line,) = _usage_error(main, argv, capsys).splitlines()  # no usage block before it
    assert line.startswith(f"python -m {main.__module__}: error: {message}") and line.endswith("(see --help)"), line


def test_evaluate_usage_errors(tmp_path, capsys):
    assert "not a planet_jax run folder" in _usage_error(
        evaluate_cli.main, ["--logdir", str(tmp_path), "--episodes", "1"], capsys)
    assert "must be positive" in _usage_error(
        evaluate_cli.main, ["--logdir", str(tmp_path), "--episodes", "0"], capsys)
