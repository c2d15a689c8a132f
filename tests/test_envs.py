"""Tests for planet_jax.envs: the PixelEnv wrapper on small numpy environments, and real dm_control tasks."""
import math
import re
from pathlib import Path

import numpy as np
import pytest

from planet_jax import envs, replay
from planet_jax.envs import (PAPER_TASKS, NonFiniteActionError, UnknownTaskError, default_action_repeat,
                             make_env, task_names)
from dm_control import suite  # after planet_jax.envs, which picks the EGL backend

DOCS = Path(__file__).resolve().parents[1] / "docs" / "environments.md"


class Recorder:
    """A tiny Environment: records every action it gets; its frame encodes (episode, t) in pixel (0, 0).

    It terminates after `end_after` simulator steps (None: never) and has the time limit `max_steps`.
    """
    action_low = np.array([0.0, -3.0])
    action_high = np.array([2.0, 1.0])

    def __init__(self, end_after=None, max_steps=None, frame_size=(8, 8)):
        self.end_after, self.frame_size = end_after, frame_size
        if max_steps is not None:
            self.max_steps = max_steps
        self.actions, self.seeds, self.episode, self.t = [], [], -1, 0

    def frame(self):
        frame = np.zeros(self.frame_size + (3,), np.uint8)
        frame[0, 0] = (self.episode % 256, self.t % 256, self.t // 256)
        return frame

    def reset(self, seed):
        self.seeds.append(seed)
        self.episode, self.t = self.episode + 1, 0
        return self.frame()

    def step(self, action):
        self.actions.append(action.copy())
        self.t += 1
        return self.frame(), float(self.t), self.end_after is not None and self.t >= self.end_after

    def close(self):
        pass


def test_action_mapping_onto_asymmetric_bounds_is_exact():
    inner = Recorder()
    env = make_env(lambda: inner, action_repeat=1, size=8)
    env.reset(0)
    agent_actions = [[-1, -1], [1, 1], [0, 0], [0.5, -0.5], [7.0, -9.0], [-0.25, 0.75]]
    for a in agent_actions:
        env.step(np.array(a, np.float32))
    # low + (a + 1) / 2 * (high - low) by hand, for bounds [0, 2] and [-3, 1]; out of range clipped.
    expected = [[0, -3], [2, 1], [1, -1], [1.5, -2], [2, -3], [0.75, 0.5]]
    np.testing.assert_array_equal(np.array(inner.actions), np.array(expected, np.float64))
    assert all(a.dtype == np.float64 and a.shape == (2,) for a in inner.actions)


@pytest.mark.parametrize("bad", [[np.nan, 0.0], [0.0, np.inf], [-np.inf, np.nan]])
def test_non_finite_action_is_refused_before_the_simulator(bad):
    inner = Recorder()
    env = make_env(lambda: inner, size=8)
    env.reset(0)
    with pytest.raises(NonFiniteActionError) as info:
        env.step(np.array(bad))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message and "non-finite" in message
    assert all(("nan" if np.isnan(v) else "inf") in message for v in bad if not np.isfinite(v))
    assert inner.actions == []  # the simulator was never stepped
    env.step(np.zeros(2))  # the episode goes on with a good action
    assert len(inner.actions) == 2


def test_custom_environment_class_through_make_env():
    class Canvas(Recorder):
        def __init__(self):
            super().__init__(max_steps=50, frame_size=(30, 40))

    env = make_env(Canvas)
    assert env.name == envs.env_name(Canvas)
    assert env.name == "test_custom_environment_class_through_make_env.<locals>.Canvas"
    assert env.action_dim == 2 and env.action_repeat == 2  # the default R for custom environments
    assert env.max_agent_steps == 25  # ceil(min(1000, max_steps 50) / 2)
    obs = env.reset(0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8  # resized from 30x40
    steps = []
    while not steps or not steps[-1].done:
        steps.append(env.step(np.zeros(2)))
    assert len(steps) == 25 and [s.env_steps for s in steps] == [2] * 25
    assert steps[-1].truncated and not steps[-1].terminated  # its own time limit is a truncation
    assert not any(s.done for s in steps[:-1])
    # rewards are t = 1, 2, ...: agent step k sums t = 2k + 1 and 2k + 2
    assert [s.reward for s in steps] == [float(4 * k + 3) for k in range(25)]


class Named:
    name = "my_sim"


def test_env_name():
    assert envs.env_name("walker_walk") == "walker_walk"
    assert envs.env_name("gym:Pendulum-v1") == "gym:Pendulum-v1"
    assert envs.env_name(Recorder) == "Recorder"
    assert envs.env_name(Named) == "my_sim"


def test_early_termination_inside_the_repeats():
    inner = Recorder(end_after=11)
    env = make_env(lambda: inner, action_repeat=4, episode_steps=100, size=8)
    env.reset(0)
    steps = [env.step(np.zeros(2)) for _ in range(3)]
    assert [s.env_steps for s in steps] == [4, 4, 3]
    assert [s.terminated for s in steps] == [False, False, True]
    assert not any(s.truncated for s in steps)
    assert steps[-1].reward == 9 + 10 + 11 and steps[-1].obs[0, 0, 1] == 11  # the frame after step 11
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2))
    assert len(inner.actions) == 11


def test_env_steps_when_episode_steps_is_not_a_multiple_of_repeat():
    inner = Recorder()
    env = make_env(lambda: inner, action_repeat=8, episode_steps=100, size=8)
    assert env.max_agent_steps == 13
    env.reset(0)
    steps = [env.step(np.zeros(2)) for _ in range(13)]
    assert [s.env_steps for s in steps] == [8] * 12 + [4]
    assert sum(s.env_steps for s in steps) == 100 == len(inner.actions)
    assert steps[-1].truncated and not steps[-1].terminated and steps[-1].done
    assert not any(s.done for s in steps[:-1])


def test_step_without_frame_renders_once_per_agent_step():
    """An environment with step_without_frame and render gives the same steps with one render each."""
    class Fast(Recorder):
        renders = 0

        def step_without_frame(self, action):
            _, reward, terminated = self.step(action)
            return reward, terminated

        def render(self):
            self.renders += 1
            return self.frame()

    plain, fast = Recorder(end_after=10), Fast(end_after=10)
    results = []
    for inner in (plain, fast):
        env = make_env(lambda: inner, action_repeat=3, size=8)
        env.reset(0)
        results.append([env.step(np.full(2, 0.5)) for _ in range(4)])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.obs, b.obs)
        assert a[1:] == b[1:]
    assert fast.renders == 4 and results[1][-1].terminated
    np.testing.assert_array_equal(plain.actions, fast.actions)


def test_bad_environments_and_numbers():
    with pytest.raises(TypeError, match="action_low"):
        make_env(lambda: object())
    for kwargs in ({"episode_steps": 0}, {"episode_steps": -5}, {"action_repeat": -1}, {"size": 0},
                   {"action_repeat": 1.5}):
        with pytest.raises(ValueError, match="episode_steps|action_repeat|size"):
            make_env(Recorder, **kwargs)

    class Unbounded(Recorder):
        action_high = np.array([np.inf, 1.0])

    with pytest.raises(ValueError, match="finite"):
        make_env(Unbounded)

    class FloatFrames(Recorder):
        def frame(self):
            return np.zeros((8, 8, 3), np.float32)

    env = make_env(FloatFrames, size=8)
    with pytest.raises(ValueError, match="uint8"):
        env.reset(0)
    with pytest.raises(RuntimeError, match="reset"):  # never started
        make_env(Recorder, size=8).step(np.zeros(2))


def test_early_ending_episodes_in_the_replay(tmp_path):
    """Episodes that terminate after a random number of steps are stored at their length, and sampled
    chunks stay inside one episode; episodes shorter than the chunk are skipped."""
    rng = np.random.default_rng(0)
    inner = Recorder()
    env = make_env(lambda: inner, action_repeat=2, episode_steps=60, size=8)
    memory = replay.Replay(tmp_path, seed=0)
    agent_steps = []
    for _ in range(12):
        inner.end_after = int(rng.integers(1, 70))  # past 60 the time limit ends the episode
        frames, actions, rewards = [env.reset(0)], [np.zeros(2, np.float32)], [0.0]
        step = None
        while step is None or not step.done:
            actions.append(rng.uniform(-1, 1, 2).astype(np.float32))
            step = env.step(actions[-1])
            frames.append(step.obs)
            rewards.append(step.reward)
        assert step.terminated == (inner.end_after < 60)
        agent_steps.append(math.ceil(min(inner.end_after, 60) / 2))
        memory.add({"obs": np.stack(frames), "action": np.stack(actions),
                    "reward": np.asarray(rewards, np.float32)})
    reloaded = replay.Replay(tmp_path, seed=0)
    assert reloaded.load() == 12
    assert [len(e["obs"]) for e in reloaded.episodes] == [n + 1 for n in agent_steps]
    assert sorted(p.name for p in tmp_path.glob("episode_*.npz")) == [
        replay.episode_filename(i, n + 1) for i, n in enumerate(agent_steps)]
    chunk = 8
    batch = memory.sample(300, chunk)
    drawn = set()
    for obs in batch.obs:
        episode = obs[:, 0, 0, 0]
        t = obs[:, 0, 0, 1].astype(int) + 256 * obs[:, 0, 0, 2].astype(int)
        assert (episode == episode[0]).all()  # one episode
        # consecutive agent steps: t advances by R = 2, the last one by 1 after an odd ending
        assert (np.diff(t)[:-1] == 2).all() and np.diff(t)[-1] in (1, 2)
        drawn.add(int(episode[0]))
    long_enough = {i for i, n in enumerate(agent_steps) if n + 1 >= chunk}
    assert drawn == long_enough and len(long_enough) < len(agent_steps)  # short ones skipped
    with pytest.raises(ValueError) as info:
        memory.sample(4, max(agent_steps) + 2)
    assert "\n" not in str(info.value) and "skipped, not padded" in str(info.value)


def test_docs_example_environment():
    """The class in docs/environments.md ('Your own environment') runs through make_env."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    namespace = {}
    exec(blocks[0], namespace)
    cls = namespace["PointToCenter"]
    env = make_env(cls)
    assert env.name == "PointToCenter" and env.action_dim == 2 and env.max_agent_steps == 100
    first = env.reset(3)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8 and first.std() > 0
    np.testing.assert_array_equal(env.reset(3), first)
    position = env._env.position.copy()  # noqa: SLF001 - checking the example's own state
    steps = [env.step(np.array([1.0, -1.0])) for _ in range(3)]
    # force (0.5, -0.5) held for R = 2 steps of 0.1 * force, three times
    np.testing.assert_allclose(env._env.position, np.clip(position + [0.3, -0.3], -1, 1))  # noqa: SLF001
    assert all(s.reward < 0 and s.env_steps == 2 for s in steps)
    assert not np.array_equal(steps[-1].obs, first)
    env.close()


# --- the Control Suite adapter -------------------------------------------------------------------

def raw_rewards(domain, task, seed, actions, episode_steps):
    """Per-environment-step rewards of a plain suite env driven by `actions` (one per env step)."""
    env = suite.load(domain, task, task_kwargs={"random": seed})
    env.reset()
    rewards = [env.step(a).reward or 0.0 for a in actions[:episode_steps]]
    env.close()
    return rewards


@pytest.mark.parametrize("name, episode_steps, repeat, agent_steps, groups", [
    # cartpole: paper R = 8, 40 env steps -> 5 agent steps of 8 env steps each.
    ("cartpole_swingup", 40, 8, 5, [8, 8, 8, 8, 8]),
    # walker: paper R = 2, 9 env steps -> 5 agent steps, the last one cut to 1 env step.
    ("walker_walk", 9, 2, 5, [2, 2, 2, 2, 1]),
])
def test_action_repeat_frames_and_summed_rewards(name, episode_steps, repeat, agent_steps, groups):
    seed = 3
    env = make_env(name, episode_steps=episode_steps)
    assert env.action_repeat == repeat
    assert env.max_agent_steps == agent_steps
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (agent_steps, env.action_dim))
    frames = [env.reset(seed)]
    steps = [env.step(a) for a in actions]
    env.close()

    assert [s.done for s in steps] == [False] * (agent_steps - 1) + [True]
    assert steps[-1].truncated and not steps[-1].terminated
    assert [s.env_steps for s in steps] == groups
    frames += [s.obs for s in steps]
    for frame in frames:
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert frames[0].std() > 0  # a real image, not a blank buffer
    assert not np.array_equal(frames[0], frames[-1])

    # reset(seed) gives the episode of a suite env built with that seed
    domain, task, _ = PAPER_TASKS[name]
    per_env_step = np.repeat(actions, groups, axis=0)
    raw = raw_rewards(domain, task, seed, per_env_step, episode_steps)
    expected = np.add.reduceat(raw, np.cumsum([0] + groups[:-1]))
    np.testing.assert_allclose([s.reward for s in steps], expected, rtol=1e-12, atol=1e-12)


def test_seeded_reset_is_reproducible():
    env = make_env("cartpole_swingup", episode_steps=16)
    a, b, other = env.reset(5), env.reset(5), env.reset(6)
    env.step(np.ones(1))
    again = env.reset(5)  # after an episode was played
    env.close()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, other)


def test_suite_non_finite_action_is_one_line():
    env = make_env("cartpole_swingup", episode_steps=16)
    env.reset(0)
    with pytest.raises(NonFiniteActionError, match=r"\[nan\]"):
        env.step(np.array([np.nan]))
    assert not env.step(np.zeros(1)).done  # the simulator is fine
    env.close()


def test_actions_are_clipped_to_bounds():
    outputs = []
    for action in ([1.0], [7.5]):
        env = make_env("cartpole_swingup", episode_steps=16)
        env.reset(1)
        outputs.append(env.step(np.array(action)))
        env.close()
    assert outputs[0].reward == outputs[1].reward
    np.testing.assert_array_equal(outputs[0].obs, outputs[1].obs)


def test_unknown_name_lists_valid_names_or_the_close_one():
    with pytest.raises(UnknownTaskError) as info:
        make_env("walker_wlak")
    assert isinstance(info.value, ValueError)
    assert str(info.value) == "unknown task 'walker_wlak': did you mean 'walker_walk'? (or gym:<Gymnasium id>)"
    with pytest.raises(UnknownTaskError) as info:
        default_action_repeat("nope")  # nothing close: every valid name
    message = str(info.value)
    assert "\n" not in message and message.startswith("unknown task 'nope'; valid names: ")
    assert "walker_walk" in message and "cup_catch" in message and "ball_in_cup_catch" in message
    assert message.endswith(", or gym:<Gymnasium id>")


def test_task_names_cover_suite_and_alias():
    names = task_names()
    assert names == sorted(names)
    assert len(names) == len(suite.ALL_TASKS) + 1
    for name in ("cup_catch", "ball_in_cup_catch", "point_mass_easy", "cartpole_swingup_sparse",
                 "walker_walk", "humanoid_CMU_run"):
        assert name in names


def test_cup_catch_alias_works():
    env = make_env("cup_catch", episode_steps=8)
    assert env.action_repeat == 4 and env.action_dim == 2 and env.max_agent_steps == 2
    obs = env.reset(0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    step = env.step(np.zeros(2))
    assert step.obs.shape == (64, 64, 3) and isinstance(step.reward, float) and not step.done
    env.close()


def test_default_action_repeat():
    expected = {"cartpole_swingup": 8, "reacher_easy": 4, "cheetah_run": 4, "finger_spin": 2,
                "cup_catch": 4, "walker_walk": 2,
                # other tasks of a paper domain inherit the domain's value, the rest get 2
                "cartpole_balance": 8, "ball_in_cup_catch": 4, "reacher_hard": 4,
                "point_mass_easy": 2, "hopper_hop": 2, "gym:Pendulum-v1": 2}
    assert {name: default_action_repeat(name) for name in expected} == expected
    env = make_env("cartpole_balance", episode_steps=20)
    assert env.action_repeat == 8 and env.max_agent_steps == 3
    env.close()
    env = make_env("cartpole_balance", action_repeat=3, episode_steps=20)
    assert env.action_repeat == 3 and env.max_agent_steps == 7
    env.close()
    # the suite's own time limit (1000 steps) bounds an episode asked to be longer
    env = make_env("cartpole_balance", episode_steps=5000)
    assert env.max_agent_steps == 125
    env.close()


def test_custom_size():
    env = make_env("reacher_easy", episode_steps=4, size=32)
    assert env.reset(0).shape == (32, 32, 3)
    env.close()
