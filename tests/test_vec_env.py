"""N environments in worker processes: reproducible episodes, batched collection, clear failures."""
import json
import os
import signal
import time

import numpy as np
import pytest

from experiments import train as train_cli
from planet_jax import envs, replay, vec_env

ENV = "cartpole_swingup"  # tiny preset: 100 environment steps at repeat 8 -> 14-frame episodes


def replay_single(seed, actions, episode_steps=100):
    """Frames and rewards of one in-process environment built with `seed`, driven by `actions[1:]`."""
    env = envs.make_env(ENV, seed, 0, episode_steps)
    frames, rewards = [env.reset()], [0.0]
    for action in actions[1:]:
        obs, reward, _ = env.step(action)
        frames.append(obs)
        rewards.append(reward)
    env.close()
    return np.stack(frames), np.asarray(rewards, np.float32)


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_num_envs_3_collects_3_reproducible_episodes_per_round(tmp_path):
    logdir = tmp_path / "run"
    # 2 seed episodes -> round 1 (random actions) already gives 3; round 2 trains C = 5 steps, then plans.
    code = train_cli.main(["--env", ENV, "--preset", "tiny", "--logdir", str(logdir), "--episodes", "6",
                           "--num-envs", "3", "--set", "train.test_every=100", "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [3, 6]
    assert [r["updates"] for r in records] == [0, 5]  # C updates per round, not per episode
    assert all(len(r["train_returns"]) == 3 for r in records)
    assert records[-1]["env_steps"] == 6 * 13 * 8

    memory = replay.Replay(logdir / "episodes", 0)
    assert memory.load() == 6
    episodes = memory.episodes
    for index, episode in enumerate(episodes):
        frames, rewards = replay_single(vec_env.episode_seed(0, index), episode["action"])
        np.testing.assert_array_equal(frames, episode["obs"])
        np.testing.assert_array_equal(rewards, episode["reward"])
        np.testing.assert_allclose(np.sum(rewards), records[index // 3]["train_returns"][index % 3], rtol=1e-5)
    for first in (0, 3):  # the three episodes of a round start from different states and differ
        starts = [episodes[first + i]["obs"][0] for i in range(3)]
        assert not any(np.array_equal(starts[i], starts[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
        assert len({episodes[first + i]["action"].tobytes() for i in range(3)}) == 3


def test_partial_round_worker_errors_and_shutdown():
    venv = vec_env.VecEnv(ENV, 2, 0, 40)  # 5 agent steps per episode
    pids = venv.worker_pids
    try:
        assert (venv.action_dim, venv.action_repeat, venv.max_agent_steps) == (1, 8, 5)
        # One episode in environment 0 only: the policy still sees both rows, the idle one as zeros.
        seen = []
        rng = np.random.default_rng(0)

        def act(obs):
            seen.append(obs.copy())
            return rng.uniform(-1, 1, (2, 1))

        seed = vec_env.episode_seed(7, 0)
        episodes, timing = vec_env.run_episodes(venv, act, [seed])
        assert len(episodes) == 1 and len(seen) == 5 and seen[0].shape == (2, 64, 64, 3)
        assert not seen[0][1].any()
        frames, rewards = replay_single(seed, episodes[0]["action"], episode_steps=40)
        np.testing.assert_array_equal(frames, episodes[0]["obs"])
        np.testing.assert_array_equal(rewards, episodes[0]["reward"])
        assert timing["returns"] == [pytest.approx(float(np.sum(rewards)))]

        # A worker that dies is reported, not waited for forever.
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(vec_env.VecEnvError, match="worker 1 .* exited unexpectedly"):
            venv.step(np.zeros((2, 1)), [1])
        # An exception inside a worker comes back with its cause and traceback; episode 0 is over.
        with pytest.raises(vec_env.VecEnvError) as info:
            venv.step(np.zeros((2, 1)), [0])
        message = str(info.value)
        assert "worker 0" in message and "reset() first" in message and "Traceback" in message
    finally:
        venv.close()
    deadline = time.time() + 5
    while not all(_gone(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids) and venv.worker_pids == []


def test_unknown_task_fails_before_starting_workers():
    with pytest.raises(envs.UnknownTaskError, match="walker_walk"):
        vec_env.VecEnv("walker_wlk", 2)
