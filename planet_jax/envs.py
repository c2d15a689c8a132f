"""DeepMind Control Suite tasks as 64x64 pixel environments with action repeat.

This is plain Python (no jit): it steps MuJoCo through dm_control and renders frames.

Names: an environment is named `domain_task` (e.g. `walker_walk`, `ball_in_cup_catch`,
`point_mass_easy`), plus the paper's alias `cup_catch` for `ball_in_cup_catch`. Domains and tasks
contain underscores themselves, so names are resolved through a table built from
`dm_control.suite.ALL_TASKS`, never by splitting the string.

Action repeat R (paper, Section 5): one agent step applies the same action for R environment steps
and sums their rewards. An episode lasts `episode_steps` environment steps (1000 in the paper), i.e.
ceil(episode_steps / R) agent steps, or less if the dm_env time limit ends it first.
"""
from __future__ import annotations

import math
import os

# Must happen before dm_control (and mujoco) pick a rendering backend: EGL renders headless here.
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
from dm_control import suite  # noqa: E402

# The six tasks of the paper's Table 1: name -> (domain, task, action repeat R).
PAPER_TASKS: dict[str, tuple[str, str, int]] = {
    "cartpole_swingup": ("cartpole", "swingup", 8),
    "reacher_easy": ("reacher", "easy", 4),
    "cheetah_run": ("cheetah", "run", 4),
    "finger_spin": ("finger", "spin", 2),
    "cup_catch": ("ball_in_cup", "catch", 4),
    "walker_walk": ("walker", "walk", 2),
}

# Action repeat for tasks without a paper domain.
_DEFAULT_REPEAT = 2
# Paper action repeat per domain, so that e.g. cartpole_balance also uses R = 8.
_DOMAIN_REPEAT = {domain: repeat for domain, _, repeat in PAPER_TASKS.values()}


def _task_table() -> dict[str, tuple[str, str]]:
    """Every valid name -> (domain, task): `domain_task` for all suite tasks plus the aliases."""
    table = {f"{domain}_{task}": (domain, task) for domain, task in suite.ALL_TASKS}
    for name, (domain, task, _) in PAPER_TASKS.items():
        table.setdefault(name, (domain, task))
    return table


_TASKS = _task_table()


class UnknownTaskError(ValueError):
    """Raised for an environment name that is neither a suite task nor an alias."""


def task_names() -> list[str]:
    """All valid environment names, sorted."""
    return sorted(_TASKS)


def _resolve(name: str) -> tuple[str, str]:
    try:
        return _TASKS[name]
    except KeyError:
        raise UnknownTaskError(
            f"unknown task {name!r}; valid names: {', '.join(task_names())}") from None


def default_action_repeat(name: str) -> int:
    """Paper action repeat R for `name`: the task's value, else its domain's, else 2."""
    if name in PAPER_TASKS:
        return PAPER_TASKS[name][2]
    domain, _ = _resolve(name)
    return _DOMAIN_REPEAT.get(domain, _DEFAULT_REPEAT)


class PixelEnv:
    """A dm_control task seen through a (size, size, 3) uint8 camera image, with action repeat.

    Attributes:
      name: the environment name it was made from.
      action_dim: A, the size of the action vector.
      action_repeat: R, environment steps per agent step.
      max_agent_steps: ceil(episode_steps / R), agent steps in a full episode.
    """

    def __init__(self, name: str, seed: int, action_repeat: int, episode_steps: int, size: int):
        domain, task = _resolve(name)
        self.name = name
        self.action_repeat = action_repeat
        self.episode_steps = episode_steps
        self.size = size
        self.max_agent_steps = math.ceil(episode_steps / action_repeat)
        self._env = suite.load(domain, task, task_kwargs={"random": seed})
        spec = self._env.action_spec()
        self.action_dim = int(np.prod(spec.shape))
        self._shape = spec.shape
        self._low = np.broadcast_to(np.asarray(spec.minimum, np.float64), spec.shape)
        self._high = np.broadcast_to(np.asarray(spec.maximum, np.float64), spec.shape)
        self._env_steps = 0
        self._done = True

    def _render(self) -> np.ndarray:
        frame = self._env.physics.render(self.size, self.size, camera_id=0)
        return np.asarray(frame, dtype=np.uint8)

    def reset(self) -> np.ndarray:
        """Starts an episode; returns the first frame o_0, uint8 (size, size, 3)."""
        self._env.reset()
        self._env_steps = 0
        self._done = False
        return self._render()

    def step(self, action) -> tuple[np.ndarray, float, bool]:
        """Applies `action` for R environment steps.

        Args:
          action: float (A,) in [-1, 1]; clipped, then mapped linearly onto the spec's bounds.
        Returns:
          (obs uint8 (size, size, 3), reward summed over the repeats, done).
        """
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(self._shape), -1.0, 1.0)
        a = self._low + (a + 1.0) * 0.5 * (self._high - self._low)
        reward = 0.0
        for _ in range(self.action_repeat):
            timestep = self._env.step(a)
            self._env_steps += 1
            reward += timestep.reward or 0.0
            if timestep.last() or self._env_steps >= self.episode_steps:
                self._done = True
                break
        return self._render(), float(reward), self._done

    def close(self) -> None:
        self._env.close()


def make_env(name: str, seed: int, action_repeat: int = 0, episode_steps: int = 1000,
             size: int = 64) -> PixelEnv:
    """Builds the pixel environment `name` seeded with `seed`.

    Args:
      name: one of `task_names()`; otherwise UnknownTaskError listing the valid names.
      seed: seeds the task's random initial states.
      action_repeat: R; 0 means `default_action_repeat(name)`.
      episode_steps: environment steps per episode (1000 in the paper).
      size: image height and width.
    """
    _resolve(name)
    if action_repeat < 0:
        raise ValueError(f"action_repeat must be >= 0 (0 = task default), got {action_repeat}")
    if episode_steps <= 0:
        raise ValueError(f"episode_steps must be positive, got {episode_steps}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    repeat = action_repeat or default_action_repeat(name)
    return PixelEnv(name, seed, repeat, episode_steps, size)
