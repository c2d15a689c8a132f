"""Tests for planet_jax.envs against real dm_control tasks (each episode here is a few renders)."""
import numpy as np
import pytest

from planet_jax.envs import (PAPER_TASKS, UnknownTaskError, default_action_repeat, make_env,
                             task_names)
from dm_control import suite  # after planet_jax.envs, which picks the EGL backend


def raw_rewards(domain, task, seed, actions, episode_steps):
    """Per-environment-step rewards of a plain suite env driven by `actions` (one per env step)."""
    env = suite.load(domain, task, task_kwargs={"random": seed})
    env.reset()
    rewards = [env.step(a).reward or 0.0 for a in actions[:episode_steps]]
    env.close()
    return rewards


def run_episode(env, actions):
    """Steps `env` until done; returns the frames (including the reset frame), rewards, dones."""
    frames, rewards, dones = [env.reset()], [], []
    for action in actions:
        obs, reward, done = env.step(action)
        frames.append(obs)
        rewards.append(reward)
        dones.append(done)
        if done:
            break
    return frames, rewards, dones


@pytest.mark.parametrize("name, episode_steps, repeat, agent_steps, groups", [
    # cartpole: paper R = 8, 40 env steps -> 5 agent steps of 8 env steps each.
    ("cartpole_swingup", 40, 8, 5, [8, 8, 8, 8, 8]),
    # walker: paper R = 2, 9 env steps -> 5 agent steps, the last one cut to 1 env step.
    ("walker_walk", 9, 2, 5, [2, 2, 2, 2, 1]),
])
def test_action_repeat_frames_and_summed_rewards(name, episode_steps, repeat, agent_steps, groups):
    seed = 3
    env = make_env(name, seed=seed, episode_steps=episode_steps)
    assert env.action_repeat == repeat
    assert env.max_agent_steps == agent_steps
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (agent_steps + 2, env.action_dim))
    frames, rewards, dones = run_episode(env, actions)
    env.close()

    assert len(rewards) == agent_steps
    assert dones == [False] * (agent_steps - 1) + [True]
    for frame in frames:
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert frames[0].std() > 0  # a real image, not a blank buffer
    assert not np.array_equal(frames[0], frames[-1])

    domain, task, _ = PAPER_TASKS[name]
    per_env_step = np.repeat(actions[:agent_steps], groups, axis=0)
    raw = raw_rewards(domain, task, seed, per_env_step, episode_steps)
    expected = np.add.reduceat(raw, np.cumsum([0] + groups[:-1]))
    np.testing.assert_allclose(rewards, expected, rtol=1e-12, atol=1e-12)


def test_actions_are_clipped_to_bounds():
    outputs = []
    for action in ([1.0], [7.5]):
        env = make_env("cartpole_swingup", seed=1, episode_steps=16)
        env.reset()
        outputs.append(env.step(np.array(action)))
        env.close()
    (obs_a, reward_a, _), (obs_b, reward_b, _) = outputs
    assert reward_a == reward_b
    np.testing.assert_array_equal(obs_a, obs_b)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownTaskError) as info:
        make_env("walker_wlak", seed=0)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert "walker_walk" in message and "cup_catch" in message and "ball_in_cup_catch" in message
    with pytest.raises(UnknownTaskError):
        default_action_repeat("nope")


def test_task_names_cover_suite_and_alias():
    names = task_names()
    assert names == sorted(names)
    assert len(names) == len(suite.ALL_TASKS) + 1
    for name in ("cup_catch", "ball_in_cup_catch", "point_mass_easy", "cartpole_swingup_sparse",
                 "walker_walk", "humanoid_CMU_run"):
        assert name in names


def test_cup_catch_alias_works():
    env = make_env("cup_catch", seed=0, episode_steps=8)
    assert env.action_repeat == 4 and env.action_dim == 2 and env.max_agent_steps == 2
    obs = env.reset()
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    obs, reward, done = env.step(np.zeros(2))
    assert obs.shape == (64, 64, 3) and isinstance(reward, float) and not done
    env.close()


def test_default_action_repeat():
    expected = {"cartpole_swingup": 8, "reacher_easy": 4, "cheetah_run": 4, "finger_spin": 2,
                "cup_catch": 4, "walker_walk": 2,
                # other tasks of a paper domain inherit the domain's value, the rest get 2
                "cartpole_balance": 8, "ball_in_cup_catch": 4, "reacher_hard": 4,
                "point_mass_easy": 2, "hopper_hop": 2}
    assert {name: default_action_repeat(name) for name in expected} == expected
    env = make_env("cartpole_balance", seed=0, episode_steps=20)
    assert env.action_repeat == 8 and env.max_agent_steps == 3
    env.close()
    env = make_env("cartpole_balance", seed=0, action_repeat=3, episode_steps=20)
    assert env.action_repeat == 3 and env.max_agent_steps == 7
    env.close()


@pytest.mark.parametrize("kwargs", [{"episode_steps": 0}, {"episode_steps": -5},
                                    {"action_repeat": -1}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="episode_steps|action_repeat"):
        make_env("cartpole_swingup", seed=0, **kwargs)


def test_custom_size():
    env = make_env("reacher_easy", seed=0, episode_steps=4, size=32)
    assert env.reset().shape == (32, 32, 3)
    env.close()
