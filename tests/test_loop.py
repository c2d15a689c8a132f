"""planet_jax.loop: the named steps of Algorithm 1 on their own, and a resumed run against an
uninterrupted one."""
import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from planet_jax import config, envs, logger, loop, replay, rollout, rundir

ENV = "cartpole_swingup"  # tiny preset: 100 environment steps at R = 8 -> 13 agent steps, 14 frames


def tiny(**train) -> config.Config:
    cfg = config.tiny()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def test_seed_action_scales_by_hand():
    np.testing.assert_array_equal(loop.seed_action_scales(0, 1, 5, graded=False), [1.0])
    np.testing.assert_array_equal(loop.seed_action_scales(2, 3, 5, graded=False), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(loop.seed_action_scales(0, 1, 5, graded=True), [0.2])
    np.testing.assert_allclose(loop.seed_action_scales(4, 1, 5, graded=True), [1.0])
    # A round of 4 environments starting at seed episode 3 of 5: the last one is past the seeds.
    np.testing.assert_allclose(loop.seed_action_scales(3, 4, 5, graded=True), [0.8, 1.0, 1.0, 1.0])


def test_seed_rounds_collect_store_and_count_simulated_steps(tmp_path):
    """collect + store in the seed phase: episode k starts from episode_seed(seed, k), its actions stay
    in the graded range, and env_steps counts the simulator's steps (100 per episode at R = 8, where
    13 agent steps of 8 would be 104)."""
    cfg = tiny(seed_episodes=3, episodes=3, graded_seed_actions=True)
    with loop.open_run(cfg, ENV, tmp_path / "run", seed=4) as run:
        state = loop.load_state(run)
        assert (state.episodes, state.updates, state.env_steps) == (0, 0, 0)
        for k in range(3):
            state, episodes, played = loop.collect(run, state, stop=False)
            state = loop.store(run, state, episodes, played)
            assert state.episodes == k + 1 and state.env_steps == 100 * (k + 1)
            episode = episodes[0]
            assert len(episode["reward"]) == 14
            assert np.abs(episode["action"][1:]).max() <= (k + 1) / 3 + 1e-6
            env = envs.make_env(ENV, 0, 100)
            np.testing.assert_array_equal(episode["obs"][0], env.reset(rollout.episode_seed(4, k)))
            env.close()
    assert replay.Replay(tmp_path / "run" / "episodes", 0).load() == 3


def test_update_then_test_then_save_and_load(tmp_path):
    """update runs C steps and averages their metrics; test plays train.test_episodes noise-free
    episodes whose mean and std are those of the returns; the saved state loads back equal."""
    cfg = tiny(seed_episodes=1, episodes=2, test_episodes=3, collect_interval=3)
    with loop.open_run(cfg, ENV, tmp_path / "run", seed=0) as run:
        state = loop.load_state(run)
        state = loop.store(run, *loop.collect(run, state, stop=False))
        with logger.Progress(2, 1, 1, enabled=False) as progress:
            state, metrics = loop.update(run, state, False, progress)
        assert state.updates == 3 and metrics["skipped_updates"] == 0
        assert np.isfinite(metrics["loss"]) and int(state.train.step) == 3
        stopped, nothing = loop.update(run, state, True, progress)
        assert nothing is None and stopped is state
        state, tested = loop.test(run, state, stop=False)
        assert len(tested["test_returns"]) == 3
        assert tested["test_return"] == pytest.approx(np.mean(tested["test_returns"]))
        assert tested["test_return_std"] == pytest.approx(np.std(tested["test_returns"]))
        assert len(set(tested["test_returns"])) == 3  # three different starts
        assert (tmp_path / "run" / "videos" / "test_000001.mp4").stat().st_size > 0
        assert (tmp_path / "run" / "videos" / "openloop_000001.mp4").stat().st_size > 0
        loop.save_state(run, state)
        saved = state
    with loop.open_run(cfg, ENV, tmp_path / "run", seed=0) as run:
        loaded = loop.load_state(run)
    assert (loaded.episodes, loaded.updates, loaded.env_steps) == (1, 3, 100)
    np.testing.assert_array_equal(loaded.key, saved.key)
    jax.tree.map(np.testing.assert_array_equal, loaded.train.params, saved.train.params)


def _episode_files(logdir):
    files = sorted((logdir / "episodes").glob("episode_*.npz"))
    return [(f.name, replay.load_episode(f)) for f in files]


def _rounds(logdir):
    keep = ("episode", "env_steps", "updates", "train_return", "train_returns", "test_return",
            "test_returns", "loss", "image_loss", "reward_loss", "kl_loss", "grad_norm")
    lines = (logdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in keep} for line in lines]


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """A run stopped after its third round and resumed to the end writes the same episode files,
    bit for bit, and logs the same returns and losses per round as a run that was never stopped.

    With 2 worker environments, the harder case for the seeding rule (episode k of the run resets
    with seed k whatever the round); tests/test_rollout.py shows that 1 in-process environment plays
    the same episodes as 2 workers from the same seeds."""
    rounds, num_envs = 5, 2
    cfg = tiny(num_envs=num_envs, seed_episodes=2, test_every=2, test_episodes=1)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    episodes = lambda r: dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, episodes=r * num_envs))
    loop.train(episodes(rounds), ENV, whole, seed=3, progress=False)
    loop.train(episodes(3), ENV, parts, seed=3, progress=False)
    assert len(_rounds(parts)) == 3
    # Asked for no more episodes, the run answers from its checkpoint: no environment starts.
    assert loop.episodes_if_complete(episodes(3), ENV, parts, 3) == 3 * num_envs
    assert loop.episodes_if_complete(episodes(3), ENV, tmp_path / "new", 3) is None
    with rundir.lock(parts):  # an incomplete run is left to the full path, without a look (or lock)
        assert loop.episodes_if_complete(episodes(4), ENV, parts, 3) is None
    assert not (tmp_path / "new").exists()
    with monkeypatch.context() as m:
        m.setattr(rollout, "make_envs", lambda *a: pytest.fail("environments started"))
        capsys.readouterr()
        assert loop.train(episodes(3), ENV, parts, seed=3, progress=False) == {}
        assert f"already holds {3 * num_envs} episodes" in capsys.readouterr().out
        with pytest.raises(rundir.RunError, match="seed 3, not cartpole_swingup seed 4"):
            loop.train(episodes(3), ENV, parts, seed=4, progress=False)
    # An episode file missing: the full path decides (it would collect the episode again).
    last = replay.episode_files(parts / "episodes")[-1][1]
    last.rename(tmp_path / last.name)
    assert loop.episodes_if_complete(episodes(2), ENV, parts, 3) is None  # 5 files, checkpoint of 6
    (tmp_path / last.name).rename(last)
    # So does a checkpoint whose metadata cannot be read (in a copy: this run goes on).
    copy = tmp_path / "copy"
    shutil.copytree(parts, copy)
    (copy / "checkpoints" / str(3 * num_envs) / "meta" / "metadata").write_text("{not json")
    assert loop.episodes_if_complete(episodes(3), ENV, copy, 3) is None
    # Resumed, the copy goes on from the checkpoint before with all 6 episodes; the damaged one is
    # set aside, so the next save keeps the checkpoint it restored. Without bars (stderr is not a
    # terminal here) process 0 prints a line per round.
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"kept as .*6\.unreadable\); restoring checkpoint 4$"):
        loop.train(episodes(4), ENV, copy, seed=3, progress=True)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["4", "6.unreadable", "8"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"resuming {copy}: 6 episodes, 5 updates so far"  # checkpoint 4's updates
    assert printed[1].startswith("episode 8/8: return ") and "env steps/s overall" in printed[1]
    # A folder that cannot be searched (Path.exists would raise there) is left to the full path.
    real_stat = os.stat
    with monkeypatch.context() as m:
        m.setattr(os, "stat", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied"))
                  if str(path).startswith(str(copy)) else real_stat(path, *a, **k))
        assert loop.episodes_if_complete(episodes(4), ENV, copy, 3) is None
    # A resume with a changed setting warns once, from the run that uses it.
    changed = dataclasses.replace(episodes(rounds), train=dataclasses.replace(
        episodes(rounds).train, max_skipped_updates=cfg.train.max_skipped_updates + 1))
    with pytest.warns(rundir.ResumedWithChangesWarning) as caught:
        loop.train(changed, ENV, parts, seed=3, progress=False)
    assert len([w for w in caught if issubclass(w.category, rundir.ResumedWithChangesWarning)]) == 1

    expected, got = _episode_files(whole), _episode_files(parts)
    assert [name for name, _ in got] == [name for name, _ in expected]
    assert len(got) == rounds * num_envs
    for (_, a), (_, b) in zip(expected, got):
        for key in replay.KEYS:
            np.testing.assert_array_equal(a[key], b[key])
    starts = {episode["obs"][0].tobytes() for _, episode in got}
    assert len(starts) == len(got)  # every episode starts from its own initial state
    assert _rounds(parts) == _rounds(whole)
    assert any("test_return" in r for r in _rounds(whole)) and any("loss" in r for r in _rounds(whole))


def test_a_run_folder_written_before_the_loop_state_still_resumes(tmp_path):
    """tests/data/run_v1: 3 episodes of the tiny preset on cartpole_swingup written by the loop of
    commit cb033b6 (before LoopState and test_episodes existed); it resumes where it stopped."""
    import shutil
    logdir = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data" / "run_v1", logdir)
    stored = (logdir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(stored[-1])["updates"] == 5
    # Its config.json has no test_episodes (read as the default, 5): the preset's 2 is no change to it.
    with warnings.catch_warnings():
        warnings.simplefilter("error", rundir.ResumedWithChangesWarning)
        record = loop.train(tiny(episodes=4), ENV, logdir, seed=0, progress=False)
    assert (record["episode"], record["updates"]) == (4, 10)
    assert record["env_steps"] == json.loads(stored[-1])["env_steps"] + 100
    assert replay.Replay(logdir / "episodes", 0).load() == 4


def test_progress_clocks_leave_out_the_compile_and_name_what_is_measured(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    with logger.Progress(total=4, done=1, seed_episodes=1) as progress:
        progress.start_updates(3, compiling=True)
        assert progress._updates.desc.startswith("compiling the train step")
        with progress.measuring("ops.conv_s2", "x2x31x31x16 k4 o32 float32 forward"):
            assert progress._updates.desc == ("measuring ops.conv_s2 x2x31x31x16 k4 o32 float32 forward "
                                              "(once per machine): ")
            time.sleep(0.3)  # the search and the compile
        # In 80 columns the label leaves the bar its counter and clock.
        monkeypatch.setenv("COLUMNS", "80")
        with progress.measuring("ops.conv_s2", "x2x31x31x16 k4 o32 float32 forward"):
            assert progress._updates.desc == "measuring ops.conv_s2 x2x31x31x16 k4 o3...: "
        monkeypatch.setenv("COLUMNS", "160")
        assert progress._updates.desc.startswith("compiling the train step")
        episodes = progress._episodes
        progress.updated({"loss": 1.0})
        # The rates count from the end of the first update: the compile is not in the time left.
        # The episode bar restarts its clock in place (a new bar would leave the old one's line).
        assert progress._episodes is episodes and episodes.format_dict["initial"] == 1
        for bar in (progress._updates, progress._episodes):
            meter = bar.format_dict
            assert meter["elapsed"] < 0.2, meter
        assert progress._updates.format_dict["initial"] == progress._updates.n == 1
        assert progress._episodes.n == 1 and progress._updates.desc == "training"
        shown = capsys.readouterr().err.replace("\r", "\n").splitlines()
        assert not [line for line in shown if "compiling" in line and "1/3" in line]  # no estimate with the compile
        assert not [line for line in shown if "<-" in line]  # a restart drawn with a negative rate and time left
        progress.updated({"loss": 1.0})
        assert progress._updates.n == 2 and progress._updates.format_dict["initial"] == 1  # restarted once
        # With no update bar open (after a round) the episode bar names the measurement.
        progress.finished_round({"episode": 2, "train_return": 0.0})
        with progress.measuring("planner.batching", "key"):
            assert "planner.batching" in progress._episodes.desc
        assert "planner.batching" not in progress._episodes.desc


@pytest.mark.parametrize("columns, rows, fit", [(100, 30, True), (100, 0, False), (0, 0, False), (40, 30, False)])
def test_bars_only_where_a_terminal_shows_them(tmp_path, columns, rows, fit):
    import struct
    pty, fcntl, termios = (pytest.importorskip(name) for name in ("pty", "fcntl", "termios"))
    leader, follower = pty.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        with open(follower, "w", closefd=False) as terminal:
            assert logger.bars_fit(terminal) is fit
    finally:
        os.close(leader)
        os.close(follower)
    with open(tmp_path / "log", "w") as log_file:
        assert not logger.bars_fit(log_file)


def test_disabled_progress_takes_measurement_reports_silently(capsys):
    """--no-progress and processes other than 0 still pass their bars to autotune.reporting."""
    with logger.Progress(total=4, done=1, seed_episodes=1, enabled=False) as progress:
        progress.start_updates(3, compiling=True)
        with progress.measuring("ops.conv_s2", "key"):
            pass
        progress.updated({"loss": 1.0})
        progress.finished_round({"episode": 2})
        with progress.measuring("planner.batching", "key"):
            pass
    assert capsys.readouterr() == ("", "")


def test_without_bars_lines_say_each_round_and_measurement(capsys):
    """--no-progress on process 0: a line per round and per measured choice, for a log file."""
    record = {"episode": 12, "train_return": 345.24, "test_return": 401.25, "loss": 12.345,
              "steps_per_second": 140.06, "wall_time": 3600 + 10 * 60 + 32.9, "updates": 440}
    with logger.Progress(total=80, done=11, seed_episodes=5, enabled=False, lines=True) as progress:
        progress.start_updates(3, compiling=True)
        with progress.measuring("ops.conv_s2", "x64 forward"):
            pass
        progress.updated({"loss": 1.0})
        progress.finished_round(record)
        progress.finished_round({"episode": 13, "train_return": -2.0, "wall_time": 59.99})
    assert capsys.readouterr().out.splitlines() == [
        "measuring speed choices (once per machine): ops.conv_s2 x64 forward",
        "episode 12/80: return 345.2, test return 401.2, loss 12.35, 140.1 env steps/s overall, 1:10:32",
        "episode 13/80: return -2.0, 0:00:59"]
    with logger.Progress(total=80, done=11, seed_episodes=5, lines=True) as progress:  # bars: no lines
        progress.finished_round(record)
    assert "episode 12/80:" not in capsys.readouterr().out
