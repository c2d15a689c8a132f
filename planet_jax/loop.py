"""PlaNet's Algorithm 1 as a Python driver around the jitted pieces.

  seed episodes with random actions (S of them), then per round:
    C updates of the world model on chunks from the replay          `update`
    collect episodes with the planner plus exploration noise       `collect`, `store`
    every few episodes, noise-free test episodes with videos       `test`
    log the round and checkpoint the loop's state                  `Logger.write`, `save_state`

A round collects one episode, or train.num_envs = N at once (`planet_jax.rollout`, one batched
planner call per step); C stays the number of updates per round. Training runs data-parallel over
every device (`planet_jax.parallel`); with one device the mesh has one device and the code path is
the same. The loop's state (`LoopState`) is checkpointed after every round, so a run stopped or
killed at any moment loses at most the round in progress, and a resumed run repeats exactly what an
uninterrupted one would have done. Everything a run needs lives in its folder (`planet_jax.rundir`):

  config.json, run.json     the configuration and the task
  episodes/*.npz            every collected episode (the replay)
  checkpoints/<episode>/    train state, RNG key and counters (orbax)
  metrics.jsonl             one JSON object per round; tensorboard/ holds the same scalars
  videos/                   test episodes and open-loop predictions (truth | model | error)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from planet_jax import (agent, autotune, checkpoint, config, envs, learner, logger, parallel, replay, rollout,
                        rundir, runtime)
from planet_jax.rundir import RunError

OPENLOOP_CONTEXT = 5
OPENLOOP_LENGTH = 50


class NonFiniteError(RuntimeError):
    """train.max_skipped_updates updates in a row had a non-finite loss or gradient (exit code 1)."""


class LoopState(NamedTuple):
    """Everything of the training loop that a checkpoint holds, saved and restored as one."""
    train: learner.TrainState
    key: jax.Array
    """The loop's JAX key, split for every update, round of planning and test."""
    episodes: int
    """Episodes collected, seed episodes included (the next episode's index)."""
    updates: int
    """Gradient updates run (skipped ones included)."""
    env_steps: int
    """Simulator steps taken by the collected episodes (agent steps times R, less where an
    episode ended inside a repeat)."""
    wall_time: float
    """Seconds spent training, summed over every invocation of the run."""
    replay_rng: dict
    """The replay sampler's generator state (`Replay.state_dict`)."""
    skipped_in_a_row: int = 0
    """Non-finite updates since the last finite one."""


@dataclasses.dataclass
class Run:
    """What a run holds open while it trains: settings, environments, replay, checkpoints and log.
    Made by `open_run`; `step` is compiled at the first update."""
    cfg: config.Config
    logdir: Path
    seed: int
    mesh: Any
    envs: rollout.Envs
    memory: replay.Replay
    ckpt: checkpoint.Checkpointer
    log: logger.Logger | None
    policy: Callable
    train_step: Callable
    step: Callable | None = None
    clock: tuple[float, float] = (0.0, 0.0)


def env_factory(env: str | Callable, cfg: config.Config) -> Callable[[], envs.PixelEnv]:
    """A picklable zero-argument function that builds the run's environment (`envs.make_env`)."""
    return functools.partial(envs.make_env, env, cfg.train.action_repeat, cfg.train.episode_steps)


def state_template(cfg: config.Config, action_dim: int) -> dict:
    """The pytree a checkpoint stores ({'train': TrainState, 'key'}), freshly initialised; restore
    reads a checkpoint into its structure."""
    return {"train": learner.init_train_state(cfg, action_dim, jax.random.PRNGKey(0)),
            "key": jax.random.PRNGKey(0)}


@contextlib.contextmanager
def open_run(cfg: config.Config, env: str | Callable, logdir: str | Path, seed: int) -> Iterator[Run]:
    """Creates or checks the run folder, takes its lock, starts the environments and reads the
    replay and checkpoints; closes them all on exit.

    Raises:
      RunError (one line) for a folder in use, of another run, or unwritable; a chunk longer than
      an episode; a batch that does not divide over the devices.
    """
    logdir = Path(logdir)
    mesh = parallel.make_mesh()
    try:
        parallel.check_batch_size(cfg.train.batch_size, mesh)
    except ValueError as err:
        raise RunError(str(err)) from None
    primary = parallel.is_primary()
    name = envs.env_name(env)
    with contextlib.ExitStack() as stack:
        # The environments first: an unknown task or a chunk longer than an episode must fail
        # before anything is written to the folder.
        tc = cfg.train
        pool = rollout.make_envs(env_factory(env, cfg), tc.num_envs, name)
        stack.callback(pool.close)
        if tc.chunk_length > pool.max_agent_steps + 1:
            raise RunError(f"train.chunk_length ({tc.chunk_length}) is longer than an episode of {name} "
                           f"({pool.max_agent_steps + 1} frames at action repeat {pool.action_repeat})")
        if primary:
            stack.enter_context(rundir.lock(logdir))
            cfg = rundir.prepare(logdir, cfg, name, seed)
        # Each process collects its own episodes; process 0's are the run's episodes/ folder.
        local_seed = parallel.process_seed(seed)
        episodes_dir = logdir / "episodes"
        if not primary:
            episodes_dir = episodes_dir / f"process_{jax.process_index():03d}"
        memory = replay.Replay(episodes_dir, local_seed)
        memory.load()
        ckpt = checkpoint.Checkpointer(logdir / "checkpoints")
        stack.callback(ckpt.close)
        log = None
        if primary:
            (logdir / "videos").mkdir(exist_ok=True)
            log = stack.enter_context(contextlib.closing(logger.Logger(logdir)))
        yield Run(cfg, logdir, local_seed, mesh, pool, memory, ckpt, log,
                  agent.make_policy(cfg, pool.action_dim), learner.make_train_step(cfg, mesh))


def load_state(run: Run) -> LoopState:
    """The state of the last checkpoint, or a fresh one (Algorithm 1: initialise the parameters
    randomly). Episodes stored after the checkpoint (a run killed between writing them and the
    checkpoint) are kept and counted."""
    cfg, memory = run.cfg, run.memory
    if run.ckpt.latest_step() is None:
        train_state = learner.init_train_state(cfg, run.envs.action_dim, jax.random.PRNGKey(run.seed))
        state = LoopState(train_state, jax.random.PRNGKey(run.seed + 1), 0, 0, 0, 0.0, memory.state_dict())
    else:
        try:
            restored, meta = run.ckpt.restore(state_template(cfg, run.envs.action_dim),
                                              set_aside_unreadable=parallel.is_primary())
        except checkpoint.CheckpointError as err:
            raise RunError(str(err)) from None
        memory.load_state_dict(meta["replay_rng"])
        state = LoopState(restored["train"], restored["key"], int(meta["episode"]), int(meta["updates"]),
                          int(meta["env_steps"]), float(meta["wall_time"]), meta["replay_rng"],
                          int(meta.get("skipped_in_a_row", 0)))
    extra = memory.episodes[state.episodes:]
    steps = sum(min((len(e["reward"]) - 1) * run.envs.action_repeat, cfg.train.episode_steps) for e in extra)
    state = state._replace(episodes=memory.num_episodes, env_steps=state.env_steps + steps)
    return state._replace(train=parallel.replicate(state.train, run.mesh))


def save_state(run: Run, state: LoopState) -> None:
    """Checkpoints `state` under its episode count (every process takes part; orbax writes once)."""
    meta = {"episode": state.episodes, "updates": state.updates, "env_steps": state.env_steps,
            "wall_time": state.wall_time, "replay_rng": state.replay_rng,
            "skipped_in_a_row": state.skipped_in_a_row}
    run.ckpt.save(state.episodes, {"train": state.train, "key": state.key}, meta)


def update(run: Run, state: LoopState, stop, progress: logger.Progress
           ) -> tuple[LoopState, dict[str, Any] | None]:
    """C gradient updates on B chunks of L frames each (Algorithm 1, model fitting).

    Returns the new state and the round's metrics (means over its finite updates, and
    skipped_updates), or (state, None) if `stop` became true: the round is then abandoned.
    Raises NonFiniteError once train.max_skipped_updates updates in a row were skipped.
    """
    tc = run.cfg.train
    key, train_state, metrics = state.key, state.train, []
    progress.start_updates(tc.collect_interval, compiling=run.step is None)
    for _ in range(tc.collect_interval):
        if stop:
            return state, None
        local = run.memory.sample(parallel.local_batch_size(tc.batch_size), tc.chunk_length,
                                  tc.cover_episode_ends)
        batch = parallel.shard_batch(local, run.mesh)
        key, k_train = jax.random.split(key)
        k_train = parallel.replicate(k_train, run.mesh)
        if run.step is None:
            run.step = learner.compile_train_step(run.train_step, train_state, batch, k_train)
        train_state, m = run.step(train_state, batch, k_train)
        metrics.append(m)
        progress.updated(m)
    metrics = jax.device_get(metrics)
    skipped = np.asarray([m["skipped"] for m in metrics], bool)
    in_a_row = state.skipped_in_a_row + len(skipped) if skipped.all() else int(np.argmin(skipped[::-1]))
    updates = state.updates + len(metrics)
    if in_a_row >= tc.max_skipped_updates:
        last = run.ckpt.latest_step()
        where = f"checkpoint {run.ckpt.directory / str(last)}" if last is not None else "no checkpoint yet"
        raise NonFiniteError(f"{in_a_row} updates in a row (up to update {updates}) had a non-finite loss "
                             f"or gradient and were skipped; the last good checkpoint is {where}")
    finite = [m for m, s in zip(metrics, skipped) if not s]
    record = {k: np.mean([m[k] for m in finite], 0) for k in metrics[0] if k != "skipped"} if finite else {}
    record["skipped_updates"] = int(skipped.sum())
    state = state._replace(train=train_state, key=key, updates=updates, skipped_in_a_row=in_a_row,
                           replay_rng=run.memory.state_dict())
    return state, record


def seed_action_scales(first_index: int, count: int, seed_episodes: int, graded: bool) -> np.ndarray:
    """(count,) bounds c of the uniform random actions U(-c, c) of episodes first_index, ... of a seed
    round: 1 each, or with `graded` (train.graded_seed_actions) (i + 1) / S for episode i of S."""
    if not graded:
        return np.ones(count)
    return np.minimum((first_index + np.arange(count) + 1) / seed_episodes, 1.0)


def collect(run: Run, state: LoopState, stop
            ) -> tuple[LoopState, list[replay.Episode] | None, rollout.Rollout | None]:
    """One round of episodes: uniform random actions while fewer than S episodes exist, else the
    planner with N(0, expl_noise) exploration noise (Algorithm 1, data collection). Episode k
    starts from `rollout.episode_seed(seed, k)`. Returns (state, episodes, rollout), episodes None
    if stopped."""
    tc, first = run.cfg.train, state.episodes
    count = min(run.envs.num_envs, tc.episodes - first)
    seeds = [rollout.episode_seed(run.seed, first + i) for i in range(count)]
    key = state.key
    if first < tc.seed_episodes:
        scales = seed_action_scales(first, run.envs.num_envs, tc.seed_episodes, tc.graded_seed_actions)
        act = rollout.uniform_actor(np.random.default_rng([run.seed, first]), run.envs.action_dim, scales)
    else:
        key, k_act = jax.random.split(key)
        if jax.process_count() > 1:
            k_act = jax.random.fold_in(k_act, jax.process_index())
        act = agent.Actor(run.policy, run.cfg, run.envs.action_dim, run.envs.num_envs,
                          parallel.local_copy(state.train.params), k_act, tc.expl_noise)
    episodes, played = rollout.run_episodes(run.envs, act, seeds, stop)
    return state._replace(key=key), episodes, played


def store(run: Run, state: LoopState, episodes: list[replay.Episode], played: rollout.Rollout) -> LoopState:
    """Adds the round's episodes to the replay (written to disk) and counts them."""
    for episode in episodes:
        run.memory.add(episode)
    return state._replace(episodes=state.episodes + len(episodes), env_steps=state.env_steps + played.env_steps)


def play_tests(cfg: config.Config, pool: rollout.Envs, policy: Callable, params, key: jax.Array,
               seeds: list[int], stop=None) -> tuple[list[replay.Episode] | None, list[float]]:
    """Noise-free episodes with the planner, one per seed, N at a time on the N environments of
    `pool` (the paper's test episodes). Returns (episodes or None if stopped, returns)."""
    episodes, returns = [], []
    for first in range(0, len(seeds), pool.num_envs):
        key, k_act = jax.random.split(key)
        act = agent.Actor(policy, cfg, pool.action_dim, pool.num_envs, params, k_act, 0.0)
        played, rollout_ = rollout.run_episodes(pool, act, seeds[first:first + pool.num_envs], stop)
        if played is None:
            return None, returns
        episodes += played
        returns += rollout_.returns
    return episodes, returns


def write_videos(cfg: config.Config, params, episode: replay.Episode, key: jax.Array, path: Path,
                 openloop_path: Path | None = None) -> None:
    """The episode's frames as an mp4 at `path`; with `openloop_path`, also the model's open-loop
    prediction of its first frames (OPENLOOP_CONTEXT observed, then imagined under its actions)."""
    logger.write_video(path, episode["obs"])
    length = min(OPENLOOP_LENGTH, len(episode["action"]))
    if openloop_path is not None and length > OPENLOOP_CONTEXT:
        frames = agent.openloop_video(params, cfg.model, jnp.asarray(episode["obs"][:length]),
                                      jnp.asarray(episode["action"][:length]), key, OPENLOOP_CONTEXT)
        logger.write_video(openloop_path, np.asarray(frames), fps=10)


def test(run: Run, state: LoopState, stop) -> tuple[LoopState, dict[str, Any]]:
    """train.test_episodes noise-free episodes; the first one's video and open-loop prediction go
    to videos/. Returns the state (its key advanced) and test_return (mean), test_return_std and
    test_returns, or {} if stopped. Only process 0 plays; the others only advance the key."""
    key, k_act, k_video = jax.random.split(state.key, 3)
    state = state._replace(key=key)
    if run.log is None:
        return state, {}
    params = parallel.local_copy(state.train.params)
    seeds = [rollout.test_seed(run.seed, state.episodes, i) for i in range(run.cfg.train.test_episodes)]
    episodes, returns = play_tests(run.cfg, run.envs, run.policy, params, k_act, seeds, stop)
    if episodes is None:
        return state, {}
    videos = run.logdir / "videos"
    write_videos(run.cfg, params, episodes[0], k_video, videos / f"test_{state.episodes:06d}.mp4",
                 videos / f"openloop_{state.episodes:06d}.mp4")
    return state, {"test_return": float(np.mean(returns)), "test_return_std": float(np.std(returns)),
                   "test_returns": returns}


def _crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]: 'every k episodes' when a round adds several."""
    return max(after, 0) // every > max(before, 0) // every


def run_round(run: Run, state: LoopState, stop, progress: logger.Progress
              ) -> tuple[LoopState, dict[str, Any] | None]:
    """One round of Algorithm 1: C updates (after the seed episodes), collection, storage, and a
    test when due. Returns the new state and the round's record, or (state, None) if stopped
    before the round was complete (nothing of it is kept then)."""
    tc, before = run.cfg.train, state.episodes
    t_start = time.perf_counter()
    record: dict[str, Any] = {}
    trained = before >= tc.seed_episodes
    if trained:
        state, metrics = update(run, state, stop, progress)
        if metrics is None:
            return state, None
        record.update(metrics, train_seconds=time.perf_counter() - t_start)
    state, episodes, played = collect(run, state, stop)
    if episodes is None:
        return state, None
    state = store(run, state, episodes, played)
    record.update(train_return=float(np.mean(played.returns)), act_seconds=played.act_seconds,
                  env_seconds=played.env_seconds)
    if len(episodes) > 1:
        record["train_returns"] = played.returns
    if trained and _crossed(before - tc.seed_episodes, state.episodes - tc.seed_episodes, tc.test_every):
        state, tested = test(run, state, stop)  # a stop here keeps the round, without its test
        record.update(tested)
    elapsed = time.perf_counter() - t_start
    start, base = run.clock
    state = state._replace(wall_time=base + time.time() - start)
    record.update(episode=state.episodes, env_steps=state.env_steps, updates=state.updates,
                  wall_time=state.wall_time, steps_per_second=played.env_steps / elapsed)
    return state, record


def train(cfg: config.Config, env: str | Callable, logdir: str | Path, seed: int = 0,
          progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) training in `logdir` until train.episodes episodes exist or a SIGINT or
    SIGTERM arrives; returns the last round's record ({} if no round ran: a run already complete, or
    stopped before its first round ended).

    Args:
      cfg: the configuration; a resumed run may change only `rundir.RESUMABLE_CHANGES`.
      env: a task name for `envs.make_env` ('walker_walk', 'gym:Pendulum-v1') or a picklable
        zero-argument callable returning an `envs.Environment` (your own simulator).
      logdir: the run folder; created if needed, resumed if it holds this run.
      seed: the run's seed (parameters, keys, the replay's sampling, episode k's reset seed).
      progress: show progress bars where stderr is a terminal; False, or stderr a file or pipe,
        shows none, and process 0 prints a line per round and per measured speed choice instead
        (`logger.Progress`'s lines). Process 0 ends with a line saying what the folder holds.
    Raises:
      RunError (bad input or folder, exit code 2), NonFiniteError (exit code 1),
      replay.StorageError / checkpoint.CheckpointError when a file cannot be written.

    Several processes (after `parallel.initialize_distributed()`) each run this function: they train
    one model together, each collecting into its own replay; only process 0 writes run files, logs
    and videos.
    """
    cfg.validate()
    record: dict[str, Any] = {}
    held = episodes_if_complete(cfg, env, logdir, seed)
    if held is not None:
        _say_complete(logdir, held, cfg.train.episodes)
        return record
    with open_run(cfg, env, logdir, seed) as run, runtime.StopFlag() as stop:
        tc = run.cfg.train
        state = load_state(run)
        run.clock = (time.time(), state.wall_time)
        # Bars only where a terminal shows them; a log file gets lines (`logger.Progress`).
        show = progress and run.log is not None and logger.bars_fit()
        if state.episodes >= tc.episodes:
            if run.log is not None:
                _say_complete(logdir, state.episodes, tc.episodes)
            return record
        if run.log is not None:
            if state.episodes:
                print(f"resuming {logdir}: {state.episodes} episodes, {state.updates} updates so far", flush=True)
            announce_cpu_cost(run.cfg)
        lines = run.log is not None and not show
        with logger.Progress(tc.episodes, state.episodes, tc.seed_episodes, show, lines) as bar, \
                autotune.reporting(bar.measuring):
            while state.episodes < tc.episodes and not stop:
                state, result = run_round(run, state, stop, bar)
                if result is None:
                    break
                record = result
                if run.log is not None:
                    run.log.write(record)
                save_state(run, state)
                bar.finished_round(record)
    if stop:
        print(f"stopped by {stop.signal_name}: the last checkpoint holds {state.episodes} episodes in "
              f"{logdir}; run the same command to resume")
    elif record and parallel.is_primary():
        print(f"{logdir} holds {state.episodes} episodes ({state.updates} updates, wall time "
              f"{logger.clock(state.wall_time)}); a larger --episodes continues the run")
    return record


def episodes_if_complete(cfg: config.Config, env: str | Callable, logdir: str | Path, seed: int) -> int | None:
    """The episode count saved with the last checkpoint of this run in `logdir` if it is at least
    train.episodes and the episodes folder holds that many episode files; read without starting
    environments, restoring parameters or loading the replay, so that asking a complete run for no
    more episodes answers at once. None (let the full path decide) otherwise: a folder with no run,
    no checkpoint or fewer episode files yet (an incomplete run, looked at no further), metadata
    that cannot be read, or several processes.

    Neither the checkpoint's arrays nor the episodes are read: damage there is found, as before, by
    the next command that reads them (a larger --episodes, evaluate).

    Raises RunError (one line) for a complete-looking folder in use or of another run, as `train` does.
    """
    logdir = Path(logdir)
    # os.path, not Path.exists: a folder that cannot be searched must reach open_run's one-line error.
    if (jax.process_count() > 1 or not os.path.exists(logdir / "run.json")
            or not os.path.isdir(logdir / "checkpoints")):
        return None
    files = len(replay.episode_files(logdir / "episodes"))
    if files < cfg.train.episodes:  # the usual resume: no second lock, check and checkpoint read
        return None
    with rundir.lock(logdir), warnings.catch_warnings():
        # A resume's changed settings are reported by the run that uses them, not by this look.
        warnings.simplefilter("ignore", rundir.ResumedWithChangesWarning)
        rundir.prepare(logdir, cfg, envs.env_name(env), seed)
        ckpt = checkpoint.Checkpointer(logdir / "checkpoints")
        try:
            step = ckpt.latest_step()
            held = None if step is None else int(ckpt.read_meta(step)["episode"])
        except (checkpoint.CheckpointError, KeyError, TypeError, ValueError):
            return None
        finally:
            ckpt.close()
    return held if held is not None and cfg.train.episodes <= held <= files else None


def _say_complete(logdir: str | Path, held: int, episodes: int) -> None:
    print(f"{logdir} already holds {held} episodes (train.episodes is {episodes}): "
          "nothing to train; a larger --episodes continues the run")


def announce_cpu_cost(cfg: config.Config) -> None:
    """One line at start-up when the paper's network sizes are about to train on a CPU."""
    if jax.default_backend() == "cpu" and cfg.model.cnn_depth >= config.ModelConfig().cnn_depth:
        print("note: the paper's sizes on a CPU take seconds per update, so tens of minutes per "
              f"episode at C = {cfg.train.collect_interval}; --preset cpu is a learning run sized for a "
              "CPU (docs/performance.md)", file=sys.stderr)


def load_params(logdir: str | Path, action_dim: int):
    """World-model parameters of the last checkpoint of the run in `logdir` (for an env with
    `action_dim` actions). Raises RunError if there is none or it cannot be read."""
    logdir = Path(logdir)
    cfg, _, _ = rundir.read(logdir)
    ckpt = checkpoint.Checkpointer(logdir / "checkpoints")
    try:
        if ckpt.latest_step() is None:
            raise RunError(f"{logdir} has no checkpoint yet")
        try:
            restored, _ = ckpt.restore(state_template(cfg, action_dim))
        except checkpoint.CheckpointError as err:
            raise RunError(str(err)) from None
        return restored["train"].params
    finally:
        ckpt.close()


def evaluate(logdir: str | Path, episodes: int, seed: int = 12345, env: str | Callable | None = None
             ) -> list[float]:
    """Noise-free episodes with the last checkpoint of the run in `logdir`, episode i reset with
    `rollout.episode_seed(seed, i)`, on train.num_envs environments at once; writes
    videos/eval_{i:03d}.mp4. Returns the returns. `env` is needed only for a run of your own
    environment (the callable given to `train`); by default the run's task name.

    Raises:
      ValueError for episodes <= 0; RunError for a folder without a readable run or checkpoint.
    """
    if episodes <= 0:
        raise ValueError(f"--episodes must be positive, got {episodes}")
    logdir = Path(logdir)
    cfg, name, _ = rundir.read(logdir)
    pool = rollout.make_envs(env_factory(env or name, cfg), min(cfg.train.num_envs, episodes), name)
    try:
        params = load_params(logdir, pool.action_dim)
        policy = agent.make_policy(cfg, pool.action_dim)
        seeds = [rollout.episode_seed(seed, i) for i in range(episodes)]
        played, returns = play_tests(cfg, pool, policy, params, jax.random.PRNGKey(seed), seeds)
        (logdir / "videos").mkdir(exist_ok=True)
        for i, episode in enumerate(played):
            write_videos(cfg, params, episode, jax.random.PRNGKey(i), logdir / "videos" / f"eval_{i:03d}.mp4")
        return returns
    finally:
        pool.close()
