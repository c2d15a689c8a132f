"""planet_jax.rollout: one episode runner for one environment in-process or N in worker processes."""
import functools
import os
import signal
import time

import numpy as np
import pytest

from planet_jax import envs, rollout

ENV = "cartpole_swingup"
make = functools.partial(envs.make_env, ENV, 0, 40)  # R = 8: 5 agent steps per episode


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wave(obs):
    """Actions that depend on the row and on how many calls came before, not on the batch size."""
    wave.t += 1
    return np.sin(wave.t + np.arange(len(obs)))[:, None] * 0.9


def play_alone(seed, actions):
    """Frames and rewards of one fresh environment reset with `seed` and driven by actions[1:]."""
    env = make()
    frames, rewards = [env.reset(seed)], [0.0]
    for action in actions[1:]:
        step = env.step(action)
        frames.append(step.obs)
        rewards.append(step.reward)
    env.close()
    return np.stack(frames), np.asarray(rewards, np.float32)


def test_seeds_are_distinct_streams():
    seeds = {rollout.episode_seed(0, k) for k in range(50)} | {rollout.test_seed(0, 10, i) for i in range(50)}
    assert len(seeds) == 100
    assert rollout.episode_seed(3, 7) == rollout.episode_seed(3, 7) != rollout.episode_seed(4, 7)


def test_one_and_two_environments_play_the_same_episodes():
    """The same seeds and actions give the same episodes whether one environment in this process or
    two worker processes play them, and each matches a fresh environment replaying its actions."""
    seeds = [rollout.episode_seed(5, 0), rollout.episode_seed(5, 1)]
    alone = []
    single = rollout.make_envs(make, 1)
    try:
        for seed in seeds:
            wave.t = 0
            alone += rollout.run_episodes(single, wave, [seed])[0]
    finally:
        single.close()
    pool = rollout.make_envs(make, 2)
    try:
        wave.t = 0
        together, played = rollout.run_episodes(pool, wave, seeds)
    finally:
        pool.close()
    assert played.env_steps == 2 * 40 and len(together) == 2
    for i, (a, b) in enumerate(zip(alone, together)):
        assert len(a["reward"]) == 6
        if i == 0:  # row 0 sees the same actions in both; row 1 got row 0's wave when alone
            for key in ("obs", "action", "reward"):
                np.testing.assert_array_equal(a[key], b[key])
        frames, rewards = play_alone(seeds[i], b["action"])
        np.testing.assert_array_equal(frames, b["obs"])
        np.testing.assert_array_equal(rewards, b["reward"])
        assert played.returns[i] == pytest.approx(float(np.sum(rewards)))
    assert not np.array_equal(together[0]["obs"][0], together[1]["obs"][0])


def test_partial_round_worker_errors_and_shutdown():
    pool = rollout.make_envs(make, 2, ENV)
    pids = pool.worker_pids
    try:
        assert (pool.action_dim, pool.action_repeat, pool.max_agent_steps) == (1, 8, 5)
        # One episode in environment 0 only: the policy still sees both rows, the idle one as zeros.
        seen = []

        def act(obs):
            seen.append(obs.copy())
            return np.full((2, 1), 0.5)

        # A stop request ends the round at the next step, keeping nothing.
        assert rollout.run_episodes(pool, act, [1, 2], stop=True) == (None, None) and not seen
        episodes, played = rollout.run_episodes(pool, act, [rollout.episode_seed(7, 0)])
        assert len(episodes) == 1 and len(seen) == 5 and seen[0].shape == (2, 64, 64, 3)
        assert not seen[0][1].any() and played.env_steps == 40

        # A worker that dies is reported, not waited for forever.
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(rollout.EnvError, match="worker 1 .* exited unexpectedly"):
            pool.step(np.zeros((2, 1)), [1])
        # An exception inside a worker comes back with its cause and traceback; episode 0 is over.
        with pytest.raises(rollout.EnvError) as info:
            pool.step(np.zeros((2, 1)), [0])
        message = str(info.value)
        assert "worker 0" in message and "reset() first" in message and "Traceback" in message
    finally:
        pool.close()
    deadline = time.time() + 5
    while not all(_gone(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids) and pool.worker_pids == []


def test_bad_input_from_a_worker_is_raised_as_it_was():
    with pytest.raises(envs.UnknownTaskError, match="walker_walk"):
        rollout.make_envs(functools.partial(envs.make_env, "walker_wlk"), 2)
    with pytest.raises(ValueError, match="num_envs must be positive"):
        rollout.make_envs(make, 0)
