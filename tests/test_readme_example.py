"""The README's examples run as written: the planner in your own JAX code, and your own environment."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from planet_jax import envs, replay, rollout

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the planner in your own JAX code"


def section_examples(section: str = SECTION) -> list[str]:
    text = README.read_text()
    assert section in text, f"README.md has no section {section!r}"
    body = text.split(section, 1)[1]
    body = re.split(r"^## ", body, maxsplit=1, flags=re.MULTILINE)[0]  # up to the next section
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def test_section_has_the_two_examples():
    examples = section_examples()
    assert len(examples) == 2
    assert "cem(" in examples[0] and "make_planner(" in examples[1]


@pytest.mark.parametrize("index", [0, 1], ids=["cem_user_objective", "planet_planner"])
def test_readme_example_runs(index):
    # Each block runs on its own, in a fresh namespace; its asserts are the checks.
    exec(compile(section_examples()[index], f"README.md example {index}", "exec"), {})


def test_own_environment_example_trains(tmp_path, monkeypatch):
    """The 'Your own environment' example trains the tiny preset on its Dot: episodes that end when
    the dot leaves the canvas are stored at their own length, the loop goes on, and each stored
    episode replays exactly in a fresh Dot from its seed (frames, rewards and simulator steps)."""
    [code] = section_examples("## Your own environment")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md own environment", "exec"), namespace)
    logdir = tmp_path / "runs" / "dot"
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [1, 2, 3, 4] and "test_return" in records[-1]
    memory = replay.Replay(logdir / "episodes", 0)
    assert memory.load() == 4
    full = 100 // 2 + 1  # tiny: 100 simulator steps at R = 2
    lengths = [len(episode["reward"]) for episode in memory.episodes]
    assert all(length <= full for length in lengths) and min(lengths) < full, lengths
    env_steps = 0
    for k, episode in enumerate(memory.episodes):
        env = envs.make_env(namespace["Dot"], 0, 100)
        frames, rewards = [env.reset(rollout.episode_seed(0, k))], [0.0]
        for action in episode["action"][1:]:
            step = env.step(action)
            frames.append(step.obs)
            rewards.append(step.reward)
            env_steps += step.env_steps
        assert step.done  # the stored episode ends where the environment ended it
        np.testing.assert_array_equal(np.stack(frames), episode["obs"])
        np.testing.assert_array_equal(np.asarray(rewards, np.float32), episode["reward"])
    assert records[-1]["env_steps"] == env_steps
