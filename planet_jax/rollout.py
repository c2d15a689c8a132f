"""Playing episodes: one environment in this process or N in worker processes, one episode runner.

Plain Python (no jit, no JAX import). `make_envs(env_fn, n)` serves n copies of an environment
behind one interface (`Envs`): in this process when n = 1, else one worker process each, started
with the 'spawn' method (the parent is multithreaded once JAX is imported, and forking it is
unsafe). `run_episodes` is the one place that steps episodes, whatever n is.

Seeding: episode k of a run (its index among the run's episodes) starts from
`reset(episode_seed(run_seed, k))`, whatever the number of environments and however often the run
was interrupted, so a collected episode can be replayed alone from its seed and stored actions.
Test episodes draw from a separate stream (`test_seed`).
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
import traceback
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

Episode = dict[str, np.ndarray]
Act = Callable[[np.ndarray], np.ndarray]

_TEST_STREAM = 1


class EnvError(RuntimeError):
    """An environment worker failed or exited; the message names it and holds its traceback."""


def episode_seed(run_seed: int, index: int) -> int:
    """Reset seed of training episode `index` of a run seeded with `run_seed`, in [0, 2**32)."""
    return int(np.random.SeedSequence([run_seed, index]).generate_state(1)[0])


def test_seed(run_seed: int, evaluation: int, index: int) -> int:
    """Reset seed of test episode `index` of the evaluation after `evaluation` collected episodes:
    a stream apart from the training episodes', so testing never replays a training start."""
    return int(np.random.SeedSequence([run_seed, evaluation, index, _TEST_STREAM]).generate_state(1)[0])


class Envs(Protocol):
    """n environments of one kind (`envs.PixelEnv` members), stepped together.

    Attributes: num_envs (n), action_dim (A), action_repeat (R), max_agent_steps.
    """
    num_envs: int
    action_dim: int
    action_repeat: int
    max_agent_steps: int

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Starts an episode in environments 0 .. len(seeds) - 1, environment i from seeds[i];
        returns their first frames, uint8 (len(seeds), H, W, 3)."""

    def step(self, actions: np.ndarray, active: Sequence[int]) -> list:
        """Steps the environments in `active` with their rows of `actions` (float32 (n, A));
        returns their `envs.Step`s in the order of `active`."""

    def close(self) -> None:
        """Releases the environments (and their processes)."""


class _InProcess:
    """One environment in this process, behind the `Envs` interface."""

    num_envs = 1

    def __init__(self, env_fn: Callable):
        self._env = env_fn()
        self.action_dim = self._env.action_dim
        self.action_repeat = self._env.action_repeat
        self.max_agent_steps = self._env.max_agent_steps

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        if len(seeds) != 1:
            raise ValueError(f"reset needs 1 seed, got {len(seeds)}")
        return self._env.reset(int(seeds[0]))[None]

    def step(self, actions: np.ndarray, active: Sequence[int]) -> list:
        return [self._env.step(actions[i]) for i in active]

    def close(self) -> None:
        self._env.close()


def _worker(conn, env_fn: Callable) -> None:
    """A worker process's loop: ("reset", seed) -> frame, ("step", action) -> Step, ("close", None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
    env = None
    try:
        env = env_fn()
        conn.send(("ok", (env.action_dim, env.action_repeat, env.max_agent_steps)))
        while True:
            command, data = conn.recv()
            if command == "reset":
                conn.send(("ok", env.reset(int(data))))
            elif command == "step":
                conn.send(("ok", env.step(data)))
            elif command == "close":
                break
            else:
                raise ValueError(f"unknown command {command!r}")
    except (EOFError, KeyboardInterrupt, BrokenPipeError):  # the parent is gone
        pass
    except Exception as err:  # reported to the parent
        try:
            conn.send(("error", (err, f"{type(err).__name__}: {err}", traceback.format_exc())))
        except Exception:  # noqa: BLE001 - an unpicklable exception: send its text only
            try:
                conn.send(("error", (None, f"{type(err).__name__}: {err}", traceback.format_exc())))
            except (OSError, EOFError):
                pass
    finally:
        if env is not None:
            env.close()
        conn.close()


class _Workers:
    """n environments, one per worker process, behind the `Envs` interface.

    A worker that raises a ValueError (bad input, such as a non-finite action) has it raised again
    here as it was; any other failure, or a worker that dies, raises EnvError naming the worker.
    Workers ignore SIGINT and are daemons, so they end with the parent at the latest.
    """

    def __init__(self, env_fn: Callable, num_envs: int, name: str):
        self.num_envs, self._name = num_envs, name
        context = mp.get_context("spawn")
        self._conns, self._procs = [], []
        try:
            for i in range(num_envs):
                parent, child = context.Pipe()
                proc = context.Process(target=_worker, args=(child, env_fn), name=f"planet_env_{i}",
                                       daemon=True)
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

    def _exited(self, i: int) -> EnvError:
        self._procs[i].join(timeout=1.0)
        return EnvError(f"environment worker {i} ({self._name}) exited unexpectedly "
                        f"(exit code {self._procs[i].exitcode})")

    def _receive(self, i: int):
        try:
            status, payload = self._conns[i].recv()
        except (EOFError, OSError):
            raise self._exited(i) from None
        if status == "error":
            err, message, trace = payload
            if isinstance(err, ValueError):
                raise err
            raise EnvError(f"environment worker {i} ({self._name}) failed: {message}\n"
                           f"worker traceback:\n{trace}")
        return payload

    def _send(self, i: int, command: str, data) -> None:
        try:
            self._conns[i].send((command, data))
        except (BrokenPipeError, OSError):
            raise self._exited(i) from None

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        if not 0 < len(seeds) <= self.num_envs:
            raise ValueError(f"reset needs 1 to {self.num_envs} seeds, got {len(seeds)}")
        for i, seed in enumerate(seeds):
            self._send(i, "reset", int(seed))
        return np.stack([self._receive(i) for i in range(len(seeds))])

    def step(self, actions: np.ndarray, active: Sequence[int]) -> list:
        for i in active:
            self._send(i, "step", actions[i])
        return [self._receive(i) for i in active]

    def close(self) -> None:
        """Asks the workers to exit, then terminates any still running after 2 seconds."""
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


def make_envs(env_fn: Callable, num_envs: int, name: str = "env") -> Envs:
    """`num_envs` environments built by `env_fn()` (an `envs.PixelEnv`, e.g.
    `functools.partial(envs.make_env, 'walker_walk')`): in this process for 1, else one worker
    process each, in which case `env_fn` must be picklable (a module-level function or class, or a
    functools.partial of one). `name` labels worker errors.

    Raises:
      ValueError for num_envs < 1; EnvError if a worker fails to start.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be positive, got {num_envs}")
    return _InProcess(env_fn) if num_envs == 1 else _Workers(env_fn, num_envs, name)


class Rollout(NamedTuple):
    """What a call of `run_episodes` measured, besides the episodes themselves."""
    returns: list[float]
    """Sum of rewards of each episode, in environment order."""
    env_steps: int
    """Simulator steps taken by all the episodes together (agent steps times R, less where an
    episode ended inside a repeat)."""
    act_seconds: float
    """Wall time spent in `act`."""
    env_seconds: float
    """Wall time spent stepping the environments."""


def run_episodes(envs: Envs, act: Act, seeds: Sequence[int], stop=None
                 ) -> tuple[list[Episode] | None, Rollout | None]:
    """One episode in each of environments 0 .. len(seeds) - 1, environment i reset with seeds[i],
    all stepped together (Algorithm 1's inner loop over t).

    Args:
      envs: from `make_envs`.
      act: `act(obs uint8 (n, H, W, 3)) -> actions float (n, A)`, called once per step for all n
        environments: environments past len(seeds) see zero frames and finished ones their last
        frame; their actions are dropped.
      seeds: reset seeds, at most n.
      stop: anything whose truth means "stop now" (e.g. `runtime.StopFlag`), checked every step.
    Returns:
      (episodes in the replay's format (see `planet_jax.replay`), in environment order, and a
      Rollout), or (None, None) if `stop` became true first.
    """
    count = len(seeds)
    first = envs.reset(seeds)
    obs = np.zeros((envs.num_envs,) + first.shape[1:], np.uint8)
    obs[:count] = first
    frames = [[o] for o in first]
    actions = [[np.zeros(envs.action_dim, np.float32)] for _ in range(count)]
    rewards = [[0.0] for _ in range(count)]
    active, env_steps = list(range(count)), 0
    act_time = env_time = 0.0
    while active:
        if stop:
            return None, None
        t0 = time.perf_counter()
        action = np.asarray(act(obs), np.float32)
        t1 = time.perf_counter()
        steps = envs.step(action, active)
        env_time += time.perf_counter() - t1
        act_time += t1 - t0
        for i, step in zip(active, steps):
            obs[i] = step.obs
            frames[i].append(step.obs)
            actions[i].append(action[i])
            rewards[i].append(float(step.reward))
            env_steps += int(step.env_steps)
        active = [i for i, step in zip(active, steps) if not step.done]
    episodes = [{"obs": np.stack(frames[i]), "action": np.stack(actions[i]),
                 "reward": np.asarray(rewards[i], np.float32)} for i in range(count)]
    return episodes, Rollout([float(np.sum(r)) for r in rewards], env_steps, act_time, env_time)


def uniform_actor(rng: np.random.Generator, action_dim: int, scales: np.ndarray) -> Act:
    """act(obs (n, ...)) -> actions float64 (n, A), row i uniform in [-c_i, c_i]^A with c = scales
    (at least n entries): seed episodes act uniformly at random in the action box (Algorithm 1)."""
    scales = np.asarray(scales, np.float64)
    return lambda obs: rng.uniform(-1.0, 1.0, (len(obs), action_dim)) * scales[:len(obs), None]
