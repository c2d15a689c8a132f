"""Train PlaNet on a DeepMind Control Suite or Gymnasium task from pixels.

  python -m experiments.train --env walker_walk
  python -m experiments.train --env cartpole_swingup --preset tiny --logdir /tmp/run
  python -m experiments.train --env gym:Pendulum-v1 --preset cpu --action-repeat 2
  python -m experiments.train --env cheetah_run --set loss.overshooting_distance=50 --set planner.candidates=500
  python -m experiments.train --env walker_walk --num-envs 4       # 4 environments collected at once

Running the same command again with the same --logdir resumes the run. Training uses every local
device (data parallel; train.batch_size must be a multiple of their number). For several hosts, start
this command once per host with --distributed (see planet_jax.parallel). The logic lives in
planet_jax.loop; this file only parses flags.
"""
from __future__ import annotations

from experiments import cli
from planet_jax import config


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m experiments.train", description="Train PlaNet from pixels (Algorithm 1 of the paper).")
    parser.add_argument("--env", default="walker_walk",
                        help="Control Suite domain_task (walker_walk, cup_catch) or gym:<id> (gym:Pendulum-v1)")
    parser.add_argument("--logdir", default=None, help="run folder (default runs/<env>/<seed>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=None, help="total episodes, seed episodes included")
    parser.add_argument("--preset", choices=sorted(config.PRESETS), default="paper")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set planner.candidates=500 (repeatable)")
    parser.add_argument("--num-envs", type=int, default=None, metavar="N",
                        help="environments collected at once, each in a worker process (train.num_envs)")
    parser.add_argument("--action-repeat", type=int, default=None, metavar="R",
                        help="environment steps per agent step (train.action_repeat; default: the task's)")
    parser.add_argument("--test-episodes", type=int, default=None, metavar="N",
                        help="noise-free episodes per evaluation (train.test_episodes)")
    parser.add_argument("--distributed", action="store_true",
                        help="one process of a multi-host run: call jax.distributed.initialize() first, "
                             "with arguments from the launcher's environment")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars: one line per episode round instead (for log files)")
    args = parser.parse_args(argv)
    with cli.usage_errors(parser):
        if args.distributed:
            from planet_jax import parallel
            parallel.initialize_distributed()  # before anything else touches a device
        cfg = config.override(config.PRESETS[args.preset](), args.set)
        flags = {"episodes": args.episodes, "num_envs": args.num_envs, "action_repeat": args.action_repeat,
                 "test_episodes": args.test_episodes}
        cfg = config.override(cfg, [f"train.{name}={value}" for name, value in flags.items() if value is not None])
        cfg.validate()
        logdir = args.logdir or f"runs/{args.env}/{args.seed}"
        # Imported here, not at the top: environment workers are spawned processes that re-import
        # this module, and they need neither JAX nor the loop.
        from planet_jax import loop, runtime
        runtime.use_compilation_cache()
        loop.train(cfg, args.env, logdir, args.seed, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_pages()
    raise SystemExit(main())
