"""How training and collection scale: sequences per second over devices, seconds per round over envs.

  python -m experiments.scaling train --devices 1 2 4            # forced host devices on a CPU
  python -m experiments.scaling collect --envs 1 4               # tiny preset, 100 env steps

`train` runs the data-parallel train step (`learner.make_train_step(cfg, mesh)`) in one process per
device count; on a CPU the devices are forced with XLA_FLAGS=--xla_force_host_platform_device_count,
which splits the same cores into several XLA devices (a check of the sharded path's overhead, not a
speed-up). On GPUs or TPUs, --devices takes the first n real devices. `collect` times collection
rounds (`rollout.run_episodes`) with the tiny model's planner choosing the actions, with 1
in-process environment or N worker processes. Prints one JSON line per measurement.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from experiments import cli


def _train_worker(args) -> dict:
    import jax
    import numpy as np

    from planet_jax import config, learner, objective, parallel

    cfg = config.override(config.PRESETS[args.preset](), [f"train.batch_size={args.batch}",
                                                          f"train.chunk_length={args.chunk}"])
    mesh = parallel.make_mesh(jax.devices()[:args.devices])
    parallel.check_batch_size(args.batch, mesh)
    rng = np.random.default_rng(0)
    batch = objective.Batch(rng.integers(0, 256, (args.batch, args.chunk, 64, 64, 3), dtype=np.uint8),
                            rng.uniform(-1, 1, (args.batch, args.chunk, 6)).astype(np.float32),
                            rng.normal(size=(args.batch, args.chunk)).astype(np.float32))
    state = parallel.replicate(learner.init_train_state(cfg, 6, jax.random.PRNGKey(0)), mesh)
    step = learner.make_train_step(cfg, mesh)
    batch, key = parallel.shard_batch(batch, mesh), parallel.replicate(jax.random.PRNGKey(1), mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"measure": "train_step", "devices": args.devices, "platform": jax.devices()[0].platform,
            "preset": args.preset, "batch": args.batch, "chunk": args.chunk,
            "median_seconds": median, "min_seconds": min(times), "compile_seconds": compile_seconds,
            "sequences_per_second": args.batch / median}


def _collect(args, num_envs: int) -> dict:
    import jax

    from planet_jax import agent, config, learner, loop, rollout

    cfg = config.override(config.tiny(), [f"train.num_envs={num_envs}", f"train.episode_steps={args.steps}"])
    pool = rollout.make_envs(loop.env_factory(args.env, cfg), num_envs, args.env)
    params = learner.init_train_state(cfg, pool.action_dim, jax.random.PRNGKey(0)).params
    policy = agent.make_policy(cfg, pool.action_dim)
    times, timings = [], []
    try:
        for r in range(args.rounds + 1):  # round 0 compiles the policy and opens the renderers
            act = agent.Actor(policy, cfg, pool.action_dim, num_envs, params, jax.random.PRNGKey(r),
                              cfg.train.expl_noise)
            seeds = [rollout.episode_seed(0, r * num_envs + i) for i in range(num_envs)]
            t0 = time.perf_counter()
            _, played = rollout.run_episodes(pool, act, seeds)
            if r:
                times.append(time.perf_counter() - t0)
                timings.append(played)
    finally:
        pool.close()
    median = statistics.median(times)
    return {"measure": "collection_round", "envs": num_envs, "env": args.env, "env_steps_per_episode": args.steps,
            "median_seconds": median, "min_seconds": min(times),
            "act_seconds": statistics.median(t.act_seconds for t in timings),
            "env_seconds": statistics.median(t.env_seconds for t in timings),
            "env_steps_per_second": timings[-1].env_steps / median}


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m experiments.scaling", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train-step throughput over 1..n devices")
    train.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    train.add_argument("--preset", default="tiny")
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--chunk", type=int, default=32)
    train.add_argument("--iters", type=int, default=10)
    worker = sub.add_parser("_train_worker")
    for name, default in (("--devices", 1), ("--batch", 16), ("--chunk", 32), ("--iters", 10)):
        worker.add_argument(name, type=int, default=default)
    worker.add_argument("--preset", default="tiny")
    collect = sub.add_parser("collect", help="wall time per collection round for 1..N environments")
    collect.add_argument("--envs", type=int, nargs="+", default=[1, 4])
    collect.add_argument("--env", default="cartpole_swingup")
    collect.add_argument("--steps", type=int, default=100, help="environment steps per episode")
    collect.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    if args.command == "_train_worker":
        print(json.dumps(_train_worker(args)))
    elif args.command == "train":
        for n in args.devices:
            # Only the CPU backend reads this flag; on GPUs and TPUs the first n real devices are used.
            flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
            env = dict(os.environ, XLA_FLAGS=flags.strip())
            cmd = [sys.executable, "-m", "experiments.scaling", "_train_worker", "--devices", str(n),
                   "--batch", str(args.batch), "--chunk", str(args.chunk), "--iters", str(args.iters),
                   "--preset", args.preset]
            result = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if result.returncode:
                print(result.stderr, file=sys.stderr)
                return result.returncode
            print(result.stdout.strip().splitlines()[-1], flush=True)
    else:
        for n in args.envs:
            print(json.dumps(_collect(args, n)), flush=True)
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_pages()
    raise SystemExit(main())
