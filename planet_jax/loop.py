"""PlaNet's Algorithm 1 as a Python driver around the jitted pieces.

Seed episodes with random actions, then repeat: C training steps on chunks from the replay, one
round of episodes collected with the planner plus exploration noise, and every few episodes a
noise-free test episode with videos. A round is one episode, or with train.num_envs = N > 1, N
episodes collected at once in worker processes (`planet_jax.vec_env`) with one batched planner call
per step; C stays the number of updates per round. Training runs data-parallel over every device
(`planet_jax.parallel`); with one device the mesh has one device and the code path is the same.
Everything a run needs to resume lives in its folder:

  config.json, run.json     the configuration and the task
  episodes/*.npz            every collected episode (the replay)
  checkpoints/<episode>/    train state, RNG key and counters (orbax)
  metrics.jsonl             one JSON object per round; tensorboard/ holds the same scalars
  videos/                   test episodes and open-loop predictions (truth | model | error)
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from planet_jax import agent, checkpoint, config, envs, learner, logger, parallel, replay, vec_env
from planet_jax.objective import Batch

OPENLOOP_CONTEXT = 5
OPENLOOP_LENGTH = 50
# Settings a resumed run may change: none alters what the stored model and replay mean.
RESUMABLE_CHANGES = (("train", "episodes"), ("train", "num_envs"), ("train", "cover_episode_ends"),
                     ("train", "graded_seed_actions"),
                     ("model", "fast_conv"), ("model", "conv_dtype"), ("model", "image_group"))


class RunError(Exception):
    """A problem with the user's input or the run folder, reported in one line (exit code 2)."""


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps so it never stops inside a jitted call.

    A second Ctrl-C while the flag is set stops at once.
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __bool__(self):
        return self.signal_name is not None


def prepare_logdir(logdir: Path, cfg: config.Config, env_name: str, seed: int) -> config.Config:
    """Creates or checks the run folder; returns the config to use (the stored one when resuming)."""
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunError(f"cannot write to logdir {logdir}: {err.strerror or err}") from None
    run_file, cfg_file = logdir / "run.json", logdir / "config.json"
    if run_file.exists():
        try:
            run = json.loads(run_file.read_text())
            stored = config.from_dict(json.loads(cfg_file.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise RunError(f"{logdir} holds a run whose run.json/config.json cannot be read ({err}); "
                           "use another --logdir") from None
        if run.get("env") != env_name or run.get("seed") != seed:
            raise RunError(f"{logdir} holds a run of env {run.get('env')} seed {run.get('seed')}, "
                           f"not {env_name} seed {seed}; use another --logdir")
        asked = config.to_dict(cfg)
        differences = [
            f"{section}.{name} ({old!r} stored, {asked[section][name]!r} asked)"
            for section, fields in config.to_dict(stored).items()
            for name, old in fields.items()
            if (section, name) not in RESUMABLE_CHANGES and asked[section][name] != old]
        if differences:
            raise RunError(f"{logdir} holds a run with another config: {', '.join(differences[:3])}; "
                           "resume with the same flags or use another --logdir")
        # Only RESUMABLE_CHANGES differ (e.g. the episode count raised to extend a finished run),
        # so the asked config is the stored one with those changes.
        return cfg
    cfg_file.write_text(json.dumps(config.to_dict(cfg), indent=2))
    run_file.write_text(json.dumps({"env": env_name, "seed": seed}))
    return cfg


def run_episode(env: envs.PixelEnv, act: Callable[[np.ndarray], np.ndarray], seed: int,
                stop: StopFlag | None = None) -> tuple[dict[str, np.ndarray] | None, dict[str, float]]:
    """Steps one episode from `env.reset(seed)` with `act(obs) -> action`; returns the episode (None if
    stopped) and timings."""
    obs = env.reset(seed)
    frames, actions, rewards = [obs], [np.zeros(env.action_dim, np.float32)], [0.0]
    act_time = env_time = 0.0
    done = False
    while not done:
        if stop:
            return None, {}
        t0 = time.perf_counter()
        action = np.asarray(act(obs), np.float32)
        t1 = time.perf_counter()
        step = env.step(action)
        obs, reward, done = step.obs, step.reward, step.done
        env_time += time.perf_counter() - t1
        act_time += t1 - t0
        frames.append(obs)
        actions.append(action)
        rewards.append(reward)
    episode = {"obs": np.stack(frames), "action": np.stack(actions),
               "reward": np.asarray(rewards, np.float32)}
    return episode, {"return": float(np.sum(rewards)), "act_seconds": act_time, "env_seconds": env_time}


class PlannerActor:
    """Wraps the jitted policy: keeps the belief of N environments between steps."""

    def __init__(self, policy, cfg: config.Config, action_dim: int):
        self._policy, self._cfg, self._action_dim = policy, cfg, action_dim

    def start_batch(self, params, key: jax.Array, noise: float, num_envs: int
                    ) -> Callable[[np.ndarray], np.ndarray]:
        """act(obs uint8 (N, 64, 64, 3)) -> actions (N, A): one policy call for all N environments."""
        state = {"belief": agent.initial_belief(self._cfg, num_envs, self._action_dim), "t": 0}

        def act(obs: np.ndarray) -> np.ndarray:
            step_key = jax.random.fold_in(key, state["t"])
            action, state["belief"] = self._policy(params, state["belief"], obs, step_key,
                                                   jnp.float32(noise))
            state["t"] += 1
            return np.asarray(action)

        return act

    def start(self, params, key: jax.Array, noise: float) -> Callable[[np.ndarray], np.ndarray]:
        """act(obs uint8 (64, 64, 3)) -> action (A,) for one environment."""
        act = self.start_batch(params, key, noise, 1)
        return lambda obs: act(obs[None])[0]


def collect(env: envs.PixelEnv, venv: vec_env.VecEnv | None, act: Callable[[np.ndarray], np.ndarray],
            first_index: int, count: int, seed: int, stop: StopFlag | None = None
            ) -> tuple[list[dict[str, np.ndarray]] | None, dict[str, Any]]:
    """One round: `count` episodes with `act(obs (N, 64, 64, 3)) -> (N, A)`.

    Environment i plays episode first_index + i from `vec_env.episode_seed(seed, first_index + i)`:
    without `venv` (num_envs = 1) the in-process `env` plays one episode, else the workers. Returns (episodes or None if stopped, timings
    with the list of returns).
    """
    if venv is None:
        episode, timing = run_episode(env, lambda obs: act(obs[None])[0],
                                      vec_env.episode_seed(seed, first_index), stop)
        if episode is None:
            return None, {}
        return [episode], {"returns": [timing["return"]], "act_seconds": timing["act_seconds"],
                           "env_seconds": timing["env_seconds"]}
    seeds = [vec_env.episode_seed(seed, first_index + i) for i in range(count)]
    return vec_env.run_episodes(venv, act, seeds, stop)


def seed_action_scales(first_index: int, count: int, seed_episodes: int, graded: bool) -> np.ndarray:
    """(count,) bounds c of the uniform random actions U(-c, c) of episodes first_index, ... of a seed
    round: 1 each, or with `graded` (train.graded_seed_actions) (i + 1) / S for episode i of S."""
    if not graded:
        return np.ones(count)
    return np.minimum((first_index + np.arange(count) + 1) / seed_episodes, 1.0)


def _crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]: 'every k episodes' when a round adds several."""
    return max(after, 0) // every > max(before, 0) // every


def train(cfg: config.Config, env_spec: envs.EnvSpec, logdir: str | Path, seed: int = 0,
          progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) training in `logdir`; returns the last record written.

    Several processes (after `parallel.initialize_distributed()`) each run this function: they train
    one model together, each collecting into its own replay; only process 0 writes run files, logs
    and videos.
    """
    cfg.validate()
    logdir = Path(logdir)
    mesh = parallel.make_mesh()
    try:
        parallel.check_batch_size(cfg.train.batch_size, mesh)
    except ValueError as err:
        raise RunError(str(err)) from None
    env_name = envs.env_name(env_spec)
    env = envs.make_env(env_spec, cfg.train.action_repeat, cfg.train.episode_steps)
    if cfg.train.chunk_length > env.max_agent_steps + 1:
        env.close()
        raise RunError(f"train.chunk_length ({cfg.train.chunk_length}) is longer than an episode of "
                       f"{env_name} ({env.max_agent_steps + 1} frames at action repeat {env.action_repeat})")
    primary = parallel.is_primary()
    if primary:
        cfg = prepare_logdir(logdir, cfg, env_name, seed)
    tc = cfg.train
    # Each process collects its own episodes; process 0's are the run's episodes/ folder.
    local_seed = parallel.process_seed(seed)
    replay_dir = logdir / "episodes" if primary else logdir / "episodes" / f"process_{jax.process_index():03d}"
    memory = replay.Replay(replay_dir, local_seed)
    memory.load()
    ckpt = checkpoint.Checkpointer(logdir / "checkpoints")
    state = learner.init_train_state(cfg, env.action_dim, jax.random.PRNGKey(seed))
    key = jax.random.PRNGKey(seed + 1)
    counters = {"updates": 0, "wall_time": 0.0}
    if ckpt.latest_step() is not None:
        try:
            restored, meta = ckpt.restore({"train": state, "key": key})
        except checkpoint.CheckpointError as err:
            raise RunError(str(err)) from None
        state, key = restored["train"], restored["key"]
        counters = {"updates": meta["updates"], "wall_time": meta["wall_time"]}
        memory.load_state_dict(meta["replay_rng"])
    state = parallel.replicate(state, mesh)

    train_step = learner.make_train_step(cfg, mesh)
    compiled_step = None  # compiled at the first update (learner.compile_train_step)
    actor = PlannerActor(agent.make_policy(cfg, env.action_dim), cfg, env.action_dim)
    log = logger.Logger(logdir) if primary else None
    if primary:
        (logdir / "videos").mkdir(exist_ok=True)
    rng = np.random.default_rng([local_seed, memory.num_episodes])
    start_time = time.time()
    record: dict[str, Any] = {}

    saved = {"at": None}

    def save():
        if saved["at"] == (memory.num_episodes, counters["updates"]):
            return
        saved["at"] = (memory.num_episodes, counters["updates"])
        meta = {"episode": memory.num_episodes, "updates": counters["updates"],
                "env_steps": memory.num_steps * env.action_repeat,
                "wall_time": counters["wall_time"] + time.time() - start_time,
                "replay_rng": memory.state_dict()}
        ckpt.save(memory.num_episodes, {"train": state, "key": key}, meta)

    bar = tqdm(total=tc.episodes, initial=min(memory.num_episodes, tc.episodes), unit="ep",
               disable=not (progress and primary), dynamic_ncols=True)
    stop = StopFlag()
    venv = None
    try:
        if tc.num_envs > 1:
            venv = vec_env.VecEnv(env_name, tc.num_envs, tc.action_repeat, tc.episode_steps)
        with stop:
            while memory.num_episodes < tc.episodes and not stop:
                t_start = time.perf_counter()
                record = {}
                before = memory.num_episodes
                if before < tc.seed_episodes:
                    scales = seed_action_scales(before, tc.num_envs, tc.seed_episodes,
                                                tc.graded_seed_actions)
                    act = lambda obs: rng.uniform(-1, 1, (len(obs), env.action_dim)) * scales[:len(obs), None]
                else:
                    metrics = []
                    for _ in range(tc.collect_interval):
                        if stop:
                            break
                        local = memory.sample(parallel.local_batch_size(tc.batch_size), tc.chunk_length,
                                              tc.cover_episode_ends)
                        batch = parallel.shard_batch(Batch(**local), mesh)
                        key, k_train = jax.random.split(key)
                        k_train = parallel.replicate(k_train, mesh)
                        if compiled_step is None:
                            compiled_step = learner.compile_train_step(train_step, state, batch, k_train)
                        state, m = compiled_step(state, batch, k_train)
                        metrics.append(m)
                        counters["updates"] += 1
                    if stop:
                        break
                    metrics = jax.device_get(metrics)
                    record.update({k: np.mean([m[k] for m in metrics], 0) for k in metrics[0]})
                    record["train_seconds"] = time.perf_counter() - t_start
                    key, k_act = jax.random.split(key)
                    if jax.process_count() > 1:
                        k_act = jax.random.fold_in(k_act, jax.process_index())
                    act = actor.start_batch(parallel.local_copy(state.params), k_act, tc.expl_noise,
                                            tc.num_envs)
                count = min(tc.num_envs, tc.episodes - before)
                episodes, timing = collect(env, venv, act, before, count, local_seed, stop)
                if episodes is None:
                    break
                for episode in episodes:
                    memory.add(episode)
                record.update({"episode": memory.num_episodes, "train_return": float(np.mean(timing["returns"])),
                               "act_seconds": timing["act_seconds"], "env_seconds": timing["env_seconds"]})
                if len(episodes) > 1:
                    record["train_returns"] = timing["returns"]
                trained = before >= tc.seed_episodes
                if trained and _crossed(before - tc.seed_episodes, memory.num_episodes - tc.seed_episodes,
                                        tc.test_every):
                    key, k_test = jax.random.split(key)
                    if primary:  # acting uses this process's replica only; the others go on
                        record.update(test_episode(cfg, env, actor, parallel.local_copy(state.params),
                                                   k_test, logdir / "videos", memory.num_episodes, stop,
                                                   vec_env.episode_seed(seed + 1, memory.num_episodes)))
                elapsed = time.perf_counter() - t_start
                steps = sum(len(episode["reward"]) - 1 for episode in episodes) * env.action_repeat
                record.update({"env_steps": memory.num_steps * env.action_repeat,
                               "updates": counters["updates"],
                               "wall_time": counters["wall_time"] + time.time() - start_time,
                               "steps_per_second": steps / elapsed})
                if log is not None:
                    log.write(record)
                bar.update(len(episodes))
                bar.set_postfix({k: round(float(record[k]), 1) for k in
                                 ("train_return", "test_return", "steps_per_second") if k in record})
                if _crossed(before, memory.num_episodes, tc.checkpoint_every):
                    save()
            save()
    finally:
        bar.close()
        if log is not None:
            log.close()
        ckpt.close()
        env.close()
        if venv is not None:
            venv.close()
    if stop:
        print(f"stopped by {stop.signal_name}: saved a checkpoint after {memory.num_episodes} episodes "
              f"in {logdir}; run the same command to resume")
    return record


def test_episode(cfg: config.Config, env: envs.PixelEnv, actor: PlannerActor, params, key: jax.Array,
                 video_dir: Path, episode_index: int, stop: StopFlag | None = None, env_seed: int = 0
                 ) -> dict[str, float]:
    """One noise-free episode from `env.reset(env_seed)`; writes its video and the open-loop
    prediction video."""
    k_act, k_video = jax.random.split(key)
    episode, timing = run_episode(env, actor.start(params, k_act, 0.0), env_seed, stop)
    if episode is None:
        return {}
    logger.write_video(video_dir / f"test_{episode_index:06d}.mp4", episode["obs"])
    length = min(OPENLOOP_LENGTH, len(episode["action"]))
    if length > OPENLOOP_CONTEXT:
        frames = agent.openloop_video(params, cfg.model, jnp.asarray(episode["obs"][:length]),
                                      jnp.asarray(episode["action"][:length]), k_video, OPENLOOP_CONTEXT)
        logger.write_video(video_dir / f"openloop_{episode_index:06d}.mp4", np.asarray(frames), fps=10)
    return {"test_return": timing["return"]}


def load_run(logdir: str | Path) -> tuple[config.Config, str, int]:
    """(config, env name, seed) of an existing run folder."""
    logdir = Path(logdir)
    try:
        run = json.loads((logdir / "run.json").read_text())
        cfg = config.from_dict(json.loads((logdir / "config.json").read_text()))
        return cfg, run["env"], int(run["seed"])
    except FileNotFoundError:
        raise RunError(f"{logdir} is not a planet_jax run folder (no run.json/config.json)") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RunError(f"cannot read the run in {logdir}: {err}") from None


def load_params(logdir: str | Path, action_dim: int):
    """World-model parameters of the last checkpoint of the run in `logdir` (for an env with
    `action_dim` actions); RunError if there is none or it cannot be read."""
    logdir = Path(logdir)
    cfg, _, _ = load_run(logdir)
    ckpt = checkpoint.Checkpointer(logdir / "checkpoints")
    try:
        if ckpt.latest_step() is None:
            raise RunError(f"{logdir} has no checkpoint yet")
        template = {"train": learner.init_train_state(cfg, action_dim, jax.random.PRNGKey(0)),
                    "key": jax.random.PRNGKey(0)}
        try:
            restored, _ = ckpt.restore(template)
        except checkpoint.CheckpointError as err:
            raise RunError(str(err)) from None
        return restored["train"].params
    finally:
        ckpt.close()


def evaluate(logdir: str | Path, episodes: int, seed: int = 12345) -> list[float]:
    """Runs noise-free episodes with the last checkpoint; writes videos/eval_*.mp4; returns the returns."""
    if episodes <= 0:
        raise ValueError(f"--episodes must be positive, got {episodes}")
    logdir = Path(logdir)
    cfg, env_name, _ = load_run(logdir)
    env = envs.make_env(env_name, cfg.train.action_repeat, cfg.train.episode_steps)
    try:
        params = load_params(logdir, env.action_dim)
        actor = PlannerActor(agent.make_policy(cfg, env.action_dim), cfg, env.action_dim)
        (logdir / "videos").mkdir(exist_ok=True)
        returns = []
        for i, key in enumerate(jax.random.split(jax.random.PRNGKey(seed), episodes)):
            episode, timing = run_episode(env, actor.start(params, key, 0.0), vec_env.episode_seed(seed, i))
            logger.write_video(logdir / "videos" / f"eval_{i:03d}.mp4", episode["obs"])
            returns.append(timing["return"])
        return returns
    finally:
        env.close()
