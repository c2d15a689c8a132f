"""Environments as 64x64 pixel tasks with action repeat: the Control Suite, Gymnasium, or your own.

This is plain Python (no jit): it steps simulators and renders frames.

Every environment is an `Environment` (the small protocol below: action bounds, reset with a seed,
step returning frame, reward and whether it ended). `PixelEnv` wraps one and gives the training loop
what it needs: actions in [-1, 1] mapped onto the environment's bounds, action repeat R, frames
resized to (size, size, 3), and the episode's time limit. `make_env` builds one from

  'domain_task'       a DeepMind Control Suite task (e.g. `walker_walk`, `ball_in_cup_catch`), plus
                      the paper's alias `cup_catch`; names are resolved through a table built from
                      `dm_control.suite.ALL_TASKS`, never by splitting the string (domains and tasks
                      contain underscores themselves);
  'gym:<id>'          a Gymnasium environment with a continuous `Box` action space, seen through its
                      `render_mode="rgb_array"` frames (Gymnasium is an optional extra, imported only
                      for these names);
  a callable          a zero-argument callable (e.g. a class) returning an `Environment`.

Action repeat R (paper, Section 5): one agent step applies the same action for R environment steps
and sums their rewards. An episode lasts at most `episode_steps` environment steps (1000 in the
paper), i.e. ceil(episode_steps / R) agent steps, or less if the environment's own time limit
(`max_steps`) is shorter or it reaches a terminal state first.
"""
from __future__ import annotations

import difflib
import importlib
import math
import os
from typing import Any, Callable, NamedTuple, Protocol, Union, runtime_checkable

# Must happen before dm_control (and mujoco) pick a rendering backend: EGL renders headless here.
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
from dm_control import suite  # noqa: E402
from PIL import Image  # noqa: E402

GYM_PREFIX = "gym:"

# The six tasks of the paper's Table 1: name -> (domain, task, action repeat R).
PAPER_TASKS: dict[str, tuple[str, str, int]] = {
    "cartpole_swingup": ("cartpole", "swingup", 8),
    "reacher_easy": ("reacher", "easy", 4),
    "cheetah_run": ("cheetah", "run", 4),
    "finger_spin": ("finger", "spin", 2),
    "cup_catch": ("ball_in_cup", "catch", 4),
    "walker_walk": ("walker", "walk", 2),
}

# Action repeat for tasks without a paper domain, Gymnasium tasks and custom environments.
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
    """An environment name that is neither a suite task, an alias, nor a registered Gymnasium id."""


class UnsupportedEnvError(ValueError):
    """An environment planet_jax cannot use: discrete or unbounded actions, no rgb_array frames, or a
    missing optional dependency (Gymnasium)."""


class NonFiniteActionError(ValueError):
    """An action holding NaN or inf, refused before it reaches the simulator."""


class Step(NamedTuple):
    """What one agent step (R environment steps) of a `PixelEnv` returns.

    obs: uint8 (size, size, 3), the frame after the last environment step.
    reward: the rewards of the environment steps taken, summed.
    terminated: the environment reached a terminal state.
    truncated: a time limit ended the episode (`episode_steps` or the environment's `max_steps`).
    env_steps: environment steps taken in this agent step, 1 .. R (fewer than R only at the end).
    """
    obs: np.ndarray
    reward: float
    terminated: bool
    truncated: bool
    env_steps: int

    @property
    def done(self) -> bool:
        """The episode is over (terminal state or time limit): call reset before stepping again."""
        return self.terminated or self.truncated


@runtime_checkable
class Environment(Protocol):
    """The protocol a simulator implements to be trained on (`make_env(MyEnv)`), registering nothing.

    action_low, action_high: float arrays (A,), the bounds of the action vector.
    reset(seed) -> frame: starts an episode; the same seed always gives the same initial state.
    step(action) -> (frame, reward, terminated): one simulator step with `action`, float64 (A,)
        inside the bounds; terminated says the episode reached a terminal state.
    close(): releases the simulator.
    Frames are uint8 (H, W, 3) of any size (resized to the agent's size with Pillow).

    Optional, used when present:
      max_steps: int, the environment's own time limit in simulator steps (its episodes are
          truncated there, not terminated).
      step_without_frame(action) -> (reward, terminated) and render() -> frame (of the current
          state), both or neither: the wrapper then renders once per agent step instead of once per
          simulator step, for simulators whose rendering costs more than a step (MuJoCo's does).
    `step` (and `step_without_frame`) may also return one more item, truncated, for an environment
    that ends episodes by a time limit of its own that `max_steps` does not describe.
    """
    action_low: np.ndarray
    action_high: np.ndarray

    def reset(self, seed: int) -> np.ndarray: ...

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]: ...

    def close(self) -> None: ...


EnvSpec = Union[str, Callable[[], Environment]]


def task_names() -> list[str]:
    """All valid Control Suite environment names, sorted (Gymnasium ids are written `gym:<id>`)."""
    return sorted(_TASKS)


def _resolve(name: str) -> tuple[str, str]:
    try:
        return _TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, task_names(), n=1)
        if close:  # a typo: the guess, without the whole list of tasks burying it
            raise UnknownTaskError(f"unknown task {name!r}: did you mean {close[0]!r}? "
                                   f"(or {GYM_PREFIX}<Gymnasium id>)") from None
        raise UnknownTaskError(
            f"unknown task {name!r}; valid names: {', '.join(task_names())}, "
            f"or {GYM_PREFIX}<Gymnasium id>") from None


def default_action_repeat(name: str) -> int:
    """Paper action repeat R for the Control Suite task `name`: the task's value, else its domain's,
    else 2; 2 for `gym:` names. UnknownTaskError for any other name."""
    if name.startswith(GYM_PREFIX):
        return _DEFAULT_REPEAT
    if name in PAPER_TASKS:
        return PAPER_TASKS[name][2]
    domain, _ = _resolve(name)
    return _DOMAIN_REPEAT.get(domain, _DEFAULT_REPEAT)


def env_name(env: EnvSpec) -> str:
    """The name recorded for `env` in a run folder: the string itself; for a callable its `name`
    attribute if it has a string one, else its qualified name (a class's or function's)."""
    if isinstance(env, str):
        return env
    name = getattr(env, "name", None)
    if isinstance(name, str):
        return name
    return getattr(env, "__qualname__", None) or type(env).__qualname__


class ControlSuiteEnv:
    """A dm_control suite task as an `Environment`, rendered by MuJoCo at (size, size) from camera 0.

    `reset(seed)` re-seeds the task's RandomState in place, which draws the initial state; dm_control
    resets the physics fully, so this equals building the task with `task_kwargs={"random": seed}`
    without paying for a new rendering context.
    """

    def __init__(self, domain: str, task: str, size: int):
        self._env = suite.load(domain, task, task_kwargs={"random": 0})
        self._size = size
        spec = self._env.action_spec()
        self._shape = spec.shape
        self.action_low = np.broadcast_to(np.asarray(spec.minimum, np.float64), spec.shape).ravel()
        self.action_high = np.broadcast_to(np.asarray(spec.maximum, np.float64), spec.shape).ravel()
        # dm_control keeps its time limit private; without it the wrapper's episode_steps still applies.
        limit = getattr(self._env, "_step_limit", math.inf)
        self.max_steps = int(limit) if math.isfinite(limit) else None
        self._steps = 0

    def render(self) -> np.ndarray:
        return np.asarray(self._env.physics.render(self._size, self._size, camera_id=0), np.uint8)

    def reset(self, seed: int) -> np.ndarray:
        self._env.task.random.seed(seed)
        self._env.reset()
        self._steps = 0
        return self.render()

    def step_without_frame(self, action: np.ndarray) -> tuple[float, bool]:
        timestep = self._env.step(action.reshape(self._shape))
        self._steps += 1
        # The suite also ends episodes at its time limit (max_steps): that is a truncation.
        terminated = timestep.last() and (self.max_steps is None or self._steps < self.max_steps)
        return float(timestep.reward or 0.0), bool(terminated)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        reward, terminated = self.step_without_frame(action)
        return self.render(), reward, terminated

    def close(self) -> None:
        self._env.close()


def _import_gymnasium(name: str):
    # rgb_array frames need no display; without this SDL (under Gymnasium's pygame renderers) looks
    # for one and prints an error line on a headless machine.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    try:
        return importlib.import_module("gymnasium")
    except ImportError:
        raise UnsupportedEnvError(f"{name} needs Gymnasium: pip install -e '.[gym]' "
                                  "(or pip install 'gymnasium[classic-control]')") from None


class GymnasiumEnv:
    """A Gymnasium environment with a `Box` action space as an `Environment` (Gymnasium >= 0.29).

    Frames come from `render_mode="rgb_array"`, rendered at (size, size) where the environment takes a
    width and height (Gymnasium's MuJoCo tasks do), otherwise at its own size. `terminated` is passed
    on as the terminal state; the `TimeLimit` wrapper's `max_episode_steps` becomes `max_steps`, and
    any other `truncated` is passed on as a truncation.
    """

    def __init__(self, env_id: str, size: int):
        name = GYM_PREFIX + env_id
        gym = _import_gymnasium(name)
        try:
            try:
                env = gym.make(env_id, render_mode="rgb_array", width=size, height=size)
            except TypeError:  # the environment's constructor takes no width/height
                env = gym.make(env_id, render_mode="rgb_array")
        except (gym.error.UnregisteredEnv, gym.error.DeprecatedEnv) as err:
            raise UnknownTaskError(f"unknown Gymnasium environment {name!r}: {_one_line(err)}") from None
        except gym.error.Error as err:
            raise UnsupportedEnvError(f"{name} cannot be made: {_one_line(err)}") from None
        space = env.action_space
        problem = None
        if not isinstance(space, gym.spaces.Box):
            problem = (f"has a {type(space).__name__} action space; only continuous actions are "
                       "supported (a gymnasium.spaces.Box)")
        elif not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            problem = "has unbounded actions; PlaNet maps actions in [-1, 1] onto finite bounds"
        elif "rgb_array" not in env.metadata.get("render_modes", []):
            problem = "cannot render rgb_array frames"
        if problem is not None:
            env.close()
            raise UnsupportedEnvError(f"{name} {problem}")
        self._env = env
        self._space = space
        self.action_low = np.asarray(space.low, np.float64).ravel()
        self.action_high = np.asarray(space.high, np.float64).ravel()
        self.max_steps = env.spec.max_episode_steps if env.spec is not None else None

    def render(self) -> np.ndarray:
        return np.asarray(self._env.render())

    def reset(self, seed: int) -> np.ndarray:
        self._env.reset(seed=int(seed))
        return self.render()

    def step_without_frame(self, action: np.ndarray) -> tuple[float, bool, bool]:
        _, reward, terminated, truncated, _ = self._env.step(
            action.astype(self._space.dtype).reshape(self._space.shape))
        return float(reward), bool(terminated), bool(truncated)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        reward, terminated, truncated = self.step_without_frame(action)
        return self.render(), reward, terminated, truncated

    def close(self) -> None:
        self._env.close()


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class PixelEnv:
    """An `Environment` seen through (size, size, 3) uint8 frames, with action repeat and a time limit.

    Attributes:
      name: the environment's name (`env_name` of what it was made from).
      action_dim: A, the size of the action vector.
      action_repeat: R, environment steps per agent step.
      max_agent_steps: ceil(min(episode_steps, the environment's max_steps) / R), the agent steps
          of an episode that no terminal state ends.
    """

    def __init__(self, env: Environment, name: str, action_repeat: int, episode_steps: int, size: int):
        self._env = env
        self.name = name
        self.action_repeat = action_repeat
        self.size = size
        self._low = np.asarray(env.action_low, np.float64).ravel()
        self._high = np.asarray(env.action_high, np.float64).ravel()
        if self._low.shape != self._high.shape or self._low.size == 0:
            raise ValueError(f"{name}: action_low and action_high must be non-empty and of one shape, "
                             f"got {self._low.shape} and {self._high.shape}")
        if not (np.all(np.isfinite(self._low)) and np.all(np.isfinite(self._high))
                and np.all(self._low <= self._high)):
            raise ValueError(f"{name}: action bounds must be finite with low <= high, "
                             f"got {self._low.tolist()} and {self._high.tolist()}")
        self.action_dim = self._low.size
        own_limit = getattr(env, "max_steps", None)
        self.time_limit = min(episode_steps, own_limit) if own_limit else episode_steps
        self.max_agent_steps = math.ceil(self.time_limit / action_repeat)
        self._fast = all(callable(getattr(env, method, None)) for method in ("step_without_frame", "render"))
        self._env_steps = 0
        self._done = True

    def _frame(self, frame: Any) -> np.ndarray:
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"{self.name} returned a frame of shape {frame.shape} and dtype {frame.dtype}; "
                             "environments return uint8 (H, W, 3) frames")
        if frame.shape[:2] != (self.size, self.size):
            frame = np.asarray(Image.fromarray(frame).resize((self.size, self.size), Image.BILINEAR))
        return frame

    def reset(self, seed: int) -> np.ndarray:
        """Starts an episode from `seed` (the same seed, the same initial state); returns the first
        frame o_0, uint8 (size, size, 3)."""
        frame = self._env.reset(int(seed))
        self._env_steps = 0
        self._done = False
        return self._frame(frame)

    def action_to_env(self, action) -> np.ndarray:
        """float64 (A,) inside the environment's bounds for `action` in [-1, 1] (clipped first):
        low + (a + 1) / 2 * (high - low), so -1 -> low and 1 -> high exactly.

        Raises:
          ValueError for a shape other than (A,); NonFiniteActionError for NaN or inf entries.
        """
        a = np.asarray(action, np.float64)
        if a.shape != (self.action_dim,):
            raise ValueError(f"{self.name}: action must have shape ({self.action_dim},), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise NonFiniteActionError(f"{self.name}: non-finite action {a.tolist()} refused before it "
                                       "reached the simulator")
        a = np.clip(a, -1.0, 1.0)
        return np.clip(self._low + (a + 1.0) * 0.5 * (self._high - self._low), self._low, self._high)

    def step(self, action) -> Step:
        """Applies `action` for up to R environment steps (fewer when the episode ends).

        Args:
          action: float (A,) in [-1, 1]; clipped, then mapped linearly onto the environment's bounds
            (`action_to_env`).
        Returns:
          Step(obs uint8 (size, size, 3), summed reward, terminated, truncated, env_steps).
        Raises:
          NonFiniteActionError (before any simulator step) for NaN or inf in `action`;
          RuntimeError when the episode is over (or never started): call reset first.
        """
        if self._done:
            raise RuntimeError(f"{self.name}: step() called on a finished episode; call reset() first")
        a = self.action_to_env(action)
        reward, terminated, truncated, taken, frame = 0.0, False, False, 0, None
        while not (terminated or truncated or taken == self.action_repeat):
            if self._fast:
                r, terminated, *rest = self._env.step_without_frame(a.copy())
            else:
                frame, r, terminated, *rest = self._env.step(a.copy())
            taken += 1
            self._env_steps += 1
            reward += float(r)
            terminated = bool(terminated)
            truncated = not terminated and (self._env_steps >= self.time_limit or bool(rest and rest[0]))
        if self._fast:
            frame = self._env.render()
        self._done = terminated or truncated
        return Step(self._frame(frame), reward, terminated, truncated, taken)

    def close(self) -> None:
        self._env.close()


def make_env(env: EnvSpec, action_repeat: int = 0, episode_steps: int = 1000, size: int = 64) -> PixelEnv:
    """Builds the pixel environment for `env`.

    Args:
      env: a Control Suite name from `task_names()`, 'gym:<Gymnasium id>', or a zero-argument callable
        returning an `Environment`.
      action_repeat: R; 0 means `default_action_repeat` (the paper's for suite tasks, else 2).
      episode_steps: environment steps per episode at most (1000 in the paper).
      size: frame height and width.
    Raises:
      UnknownTaskError for an unknown name; UnsupportedEnvError for a discrete action space or a
      missing Gymnasium; ValueError for impossible numbers; TypeError when the callable's result does
      not follow `Environment`.
    """
    for label, value, low in (("action_repeat", action_repeat, 0), ("episode_steps", episode_steps, 1),
                              ("size", size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    name = env_name(env)
    if isinstance(env, str):
        if env.startswith(GYM_PREFIX):
            inner = GymnasiumEnv(env[len(GYM_PREFIX):], size)
        else:
            inner = ControlSuiteEnv(*_resolve(env), size)
        repeat = action_repeat or default_action_repeat(env)
    elif callable(env):
        inner = env()
        if not isinstance(inner, Environment):
            members = ("action_low", "action_high", "reset", "step", "close")
            missing = [member for member in members if not hasattr(inner, member)]
            raise TypeError(f"{name}() returned a {type(inner).__name__} without {', '.join(missing)}; "
                            "see planet_jax.envs.Environment")
        repeat = action_repeat or _DEFAULT_REPEAT
    else:
        raise TypeError(f"env must be a task name or a callable returning an Environment, got {env!r}")
    try:
        return PixelEnv(inner, name, int(repeat), int(episode_steps), int(size))
    except BaseException:
        inner.close()
        raise
