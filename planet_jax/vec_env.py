"""N pixel environments stepped at once, each in its own worker process.

This is plain Python (no jit, no JAX import): dm_control stepping and rendering run on the CPU, so
N environments only run in parallel in separate processes. Workers are started with the 'spawn'
method (the parent is multithreaded once JAX is imported, and forking it is unsafe), each owns one
`envs.make_env(...)`, and they answer commands over a pipe:

  ("reset", seed) -> first frame      ("step", action) -> (frame, reward, done)      ("close", None)

A worker that raises sends its traceback back and the parent raises `VecEnvError` naming the
environment; a worker that dies is reported the same way. Workers ignore SIGINT (Ctrl-C reaches the
whole process group; the parent decides when to stop) and are shut down by `close()`, or, as a last
resort, terminated with the parent because they are daemons.

Seeds: episode k of a run (its index in the replay) starts from `episode_seed(seed, k)`, so any
collected episode can be reproduced alone with `envs.make_env(name).reset(episode_seed(seed, k))` and
its stored actions. A round collects episodes k0 .. k0 + N - 1 in environments 0 .. N - 1.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
import traceback
from typing import Callable

import numpy as np

from planet_jax import envs


class VecEnvError(RuntimeError):
    """An environment worker failed or exited; the message holds its traceback."""


def episode_seed(seed: int, index: int) -> int:
    """Task seed of episode `index` of a run seeded with `seed` (deterministic, in [0, 2**32))."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _worker(conn, name: str, action_repeat: int, episode_steps: int, size: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    env = None
    try:
        env = envs.make_env(name, action_repeat, episode_steps, size)
        conn.send(("ok", (env.action_dim, env.action_repeat, env.max_agent_steps)))
        while True:
            command, data = conn.recv()
            if command == "reset":
                conn.send(("ok", env.reset(data)))
            elif command == "step":
                step = env.step(data)
                conn.send(("ok", (step.obs, step.reward, step.done)))
            elif command == "close":
                break
            else:
                raise ValueError(f"unknown command {command!r}")
    except (EOFError, KeyboardInterrupt, BrokenPipeError):  # the parent is gone
        pass
    except Exception as err:  # reported to the parent, which raises VecEnvError
        try:
            conn.send(("error", (f"{type(err).__name__}: {err}", traceback.format_exc())))
        except (OSError, EOFError):
            pass
    finally:
        if env is not None:
            env.close()
        conn.close()


class VecEnv:
    """`num_envs` copies of the pixel environment `name`, one per worker process.

    Attributes (as `envs.PixelEnv`): name, num_envs, action_dim, action_repeat, max_agent_steps.
    Use as a context manager or call `close()`.
    """

    def __init__(self, name: str, num_envs: int, action_repeat: int = 0, episode_steps: int = 1000,
                 size: int = 64):
        if num_envs <= 0:
            raise ValueError(f"num_envs must be positive, got {num_envs}")
        if not name.startswith(envs.GYM_PREFIX) and name not in envs.task_names():
            raise envs.UnknownTaskError(f"unknown task {name!r}; valid names: {', '.join(envs.task_names())}")
        self.name, self.num_envs = name, num_envs
        context = mp.get_context("spawn")
        self._conns, self._procs = [], []
        try:
            for i in range(num_envs):
                parent, child = context.Pipe()
                proc = context.Process(target=_worker, args=(child, name, action_repeat, episode_steps, size),
                                       name=f"planet_env_{i}", daemon=True)
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            specs = [self._receive(i) for i in range(num_envs)]
        except BaseException:
            self.close()
            raise
        self.action_dim, self.action_repeat, self.max_agent_steps = specs[0]

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty after `close()`)."""
        return [proc.pid for proc in self._procs]

    def _receive(self, i: int):
        try:
            status, payload = self._conns[i].recv()
        except (EOFError, OSError):
            self._procs[i].join(timeout=1.0)
            raise VecEnvError(f"environment worker {i} ({self.name}) exited unexpectedly "
                              f"(exit code {self._procs[i].exitcode})") from None
        if status == "error":
            message, trace = payload
            raise VecEnvError(f"environment worker {i} ({self.name}) failed: {message}\n"
                              f"worker traceback:\n{trace}")
        return payload

    def _send(self, i: int, command: str, data) -> None:
        try:
            self._conns[i].send((command, data))
        except (BrokenPipeError, OSError):
            self._procs[i].join(timeout=1.0)
            raise VecEnvError(f"environment worker {i} ({self.name}) exited unexpectedly "
                              f"(exit code {self._procs[i].exitcode})") from None

    def reset(self, seeds) -> np.ndarray:
        """Starts an episode in environments 0 .. len(seeds) - 1, environment i from task seed
        seeds[i]; returns their first frames, uint8 (len(seeds), size, size, 3)."""
        if not 0 < len(seeds) <= self.num_envs:
            raise ValueError(f"reset needs 1 to {self.num_envs} seeds, got {len(seeds)}")
        for i, seed in enumerate(seeds):
            self._send(i, "reset", int(seed))
        return np.stack([self._receive(i) for i in range(len(seeds))])

    def step(self, actions: np.ndarray, active) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps the environments whose index is in `active` (all in parallel).

        Args:
          actions: float (N, A), one row per environment; rows not in `active` are ignored.
          active: indices of the environments to step (each inside an unfinished episode).
        Returns:
          frames uint8 (len(active), size, size, 3), rewards (len(active),), dones (len(active),),
          in the order of `active`.
        """
        actions = np.asarray(actions, np.float32)
        if actions.shape != (self.num_envs, self.action_dim):
            raise ValueError(f"actions must have shape {(self.num_envs, self.action_dim)}, got {actions.shape}")
        for i in active:
            self._send(i, "step", actions[i])
        results = [self._receive(i) for i in active]
        frames, rewards, dones = zip(*results)
        return np.stack(frames), np.asarray(rewards, np.float32), np.asarray(dones, bool)

    def close(self) -> None:
        """Stops the workers: asks them to exit, then terminates any that has not after 2 s."""
        for conn in self._conns:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=1.0)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> "VecEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_episodes(env: VecEnv, act: Callable[[np.ndarray], np.ndarray], seeds, stop=None
                 ) -> tuple[list[dict[str, np.ndarray]] | None, dict]:
    """One episode in each of environments 0 .. len(seeds) - 1, all stepped together.

    `act(obs uint8 (N, size, size, 3)) -> actions (N, A)` is called once per step for all N
    environments (unused ones see zero frames, finished ones their last frame; their actions are
    dropped). Returns the episodes in the replay's format (see `planet_jax.replay`), in
    environment order, or None if `stop` became true; and timings: returns (list), act_seconds,
    env_seconds.
    """
    count = len(seeds)
    first = env.reset(seeds)
    obs = np.zeros((env.num_envs,) + first.shape[1:], np.uint8)
    obs[:count] = first
    frames = [[o] for o in first]
    actions = [[np.zeros(env.action_dim, np.float32)] for _ in range(count)]
    rewards = [[0.0] for _ in range(count)]
    active = list(range(count))
    act_time = env_time = 0.0
    while active:
        if stop:
            return None, {}
        t0 = time.perf_counter()
        action = np.asarray(act(obs), np.float32)
        t1 = time.perf_counter()
        new_obs, reward, done = env.step(action, active)
        env_time += time.perf_counter() - t1
        act_time += t1 - t0
        for j, i in enumerate(active):
            obs[i] = new_obs[j]
            frames[i].append(new_obs[j])
            actions[i].append(action[i])
            rewards[i].append(float(reward[j]))
        active = [i for j, i in enumerate(active) if not done[j]]
    episodes = [{"obs": np.stack(frames[i]), "action": np.stack(actions[i]),
                 "reward": np.asarray(rewards[i], np.float32)} for i in range(count)]
    return episodes, {"returns": [float(np.sum(r)) for r in rewards], "act_seconds": act_time,
                      "env_seconds": env_time}
