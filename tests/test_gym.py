"""Gymnasium tasks through planet_jax.envs (`gym:<id>`), against plain Gymnasium environments."""
import json
import sys

import numpy as np
import pytest

from experiments import train as train_cli
from planet_jax import envs
from planet_jax.envs import NonFiniteActionError, UnknownTaskError, UnsupportedEnvError, make_env

PENDULUM = "gym:Pendulum-v1"


def gymnasium():
    return pytest.importorskip("gymnasium")


def test_pendulum_seeded_reset_and_attributes():
    gymnasium()
    env = make_env(PENDULUM)
    assert env.name == PENDULUM and env.action_dim == 1 and env.action_repeat == 2
    assert env.max_agent_steps == 100  # Pendulum-v1's TimeLimit is 200 steps
    a, b, other = env.reset(5), env.reset(5), env.reset(6)
    env.step(np.ones(1))
    again = env.reset(5)
    env.close()
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and a.std() > 0
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, other)


def test_pendulum_rewards_and_time_limit_match_plain_gymnasium():
    """Actions in [-1, 1] become torques in [-2, 2]; R = 8 sums 8 rewards; the TimeLimit truncates."""
    gym = gymnasium()
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1.5, 1.5, (25, 1))  # some outside [-1, 1]: clipped
    env = make_env(PENDULUM, action_repeat=8)
    assert env.max_agent_steps == 25
    env.reset(3)
    steps = [env.step(a) for a in actions]
    env.close()

    plain = gym.make("Pendulum-v1")
    plain.reset(seed=3)
    expected, ends = [], []
    for a in actions:
        torque = np.clip(a, -1, 1) * 2.0
        total = 0.0
        for _ in range(8):
            _, reward, terminated, truncated, _ = plain.step(torque.astype(np.float32))
            total += reward
        expected.append(total)
        ends.append((terminated, truncated))
    plain.close()
    np.testing.assert_allclose([s.reward for s in steps], expected, rtol=1e-6)
    assert [(s.terminated, s.truncated) for s in steps] == ends  # truncated only at 200 steps
    assert steps[-1].truncated and not steps[-1].terminated and steps[-1].env_steps == 8


def test_non_finite_action_is_refused():
    gymnasium()
    env = make_env(PENDULUM)
    env.reset(0)
    with pytest.raises(NonFiniteActionError, match="non-finite"):
        env.step(np.array([np.inf]))
    env.close()


def test_discrete_action_space_is_one_line():
    gymnasium()
    with pytest.raises(UnsupportedEnvError) as info:
        make_env("gym:CartPole-v1")
    message = str(info.value)
    assert "\n" not in message and "only continuous actions are supported" in message
    assert "gym:CartPole-v1" in message and "Discrete" in message


def test_unknown_gymnasium_id_is_one_line():
    gymnasium()
    with pytest.raises(UnknownTaskError) as info:
        make_env("gym:Pendulumm-v1")
    assert "\n" not in str(info.value) and "Pendulumm-v1" in str(info.value)


def test_missing_gymnasium_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` now raises ImportError
    with pytest.raises(UnsupportedEnvError) as info:
        make_env(PENDULUM)
    message = str(info.value)
    assert "\n" not in message and "pip install -e '.[gym]'" in message
    assert envs.default_action_repeat(PENDULUM) == 2  # naming a gym task needs no import


@pytest.mark.parametrize("env_name, words", [("gym:CartPole-v1", "only continuous actions are supported"),
                                             (PENDULUM, "needs Gymnasium")])
def test_cli_errors_exit_2(env_name, words, tmp_path, capsys, monkeypatch):
    if words == "needs Gymnasium":
        monkeypatch.setitem(sys.modules, "gymnasium", None)
    else:
        gymnasium()
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--env", env_name, "--preset", "tiny", "--logdir", str(tmp_path / "run"),
                        "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


def test_mujoco_task_renders_headless_at_64_and_terminates():
    """InvertedPendulum-v5 renders at 64x64 directly and ends (terminated) when the pole falls."""
    gym = gymnasium()
    pytest.importorskip("mujoco")
    env = make_env("gym:InvertedPendulum-v5", action_repeat=1)
    assert env.action_dim == 1 and env.max_agent_steps == 1000
    assert env._env._env.unwrapped.width == 64  # noqa: SLF001 - rendered at the agent's size, not resized
    first = env.reset(0)
    assert first.shape == (64, 64, 3) and first.std() > 0
    steps = []
    while not steps or not steps[-1].done:
        steps.append(env.step(np.ones(1)))  # full force one way: the pole falls within a few steps
    env.close()

    plain = gym.make("InvertedPendulum-v5")
    plain.reset(seed=0)
    count, terminated = 0, False
    while not terminated:
        _, _, terminated, _, _ = plain.step(np.array([3.0], np.float32))  # action 1 -> the bound 3
        count += 1
    plain.close()
    assert len(steps) == count < 1000
    assert steps[-1].terminated and not steps[-1].truncated


def test_pendulum_trains_resumes_and_evaluates_through_the_cli(tmp_path, capsys):
    """gym:Pendulum-v1 with the tiny preset through the real command line: train 3 episodes (2 seed
    episodes and one trained round), resume to 4, evaluate."""
    gymnasium()
    from experiments import evaluate as evaluate_cli
    logdir = tmp_path / "run"
    base = ["--env", PENDULUM, "--preset", "tiny", "--logdir", str(logdir), "--no-progress"]
    assert train_cli.main(base + ["--episodes", "3"]) == 0
    assert train_cli.main(base + ["--episodes", "4"]) == 0
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [1, 2, 3, 4] and records[-1]["updates"] == 10
    assert records[-1]["env_steps"] == 4 * 100  # tiny: 100 of Pendulum's 200 steps, R = 2
    assert len(list((logdir / "episodes").glob("episode_*_51.npz"))) == 4
    assert evaluate_cli.main(["--logdir", str(logdir), "--episodes", "1"]) == 0
    assert "return over 1 episode: mean" in capsys.readouterr().out
    assert (logdir / "videos" / "eval_000.mp4").stat().st_size > 0
