"""Compare a trained run's reward predictions with the simulator's, for fixed action sequences.

  python -m experiments.model_check --logdir runs/cartpole_balance/0
  python -m experiments.model_check --logdir runs/cartpole_balance/0 --starts 8 --warmup 5 --random 8

For each of --starts test episodes: --warmup agent steps of no force, the belief filtered over those
frames, then the model's predicted rewards over the planning horizon for each probe sequence (no
force, full force either way, alternating, random) next to the simulator's. The logic lives in
planet_jax.model_check.
"""
from __future__ import annotations

import numpy as np

from experiments import cli


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m experiments.model_check",
                                description="Model-predicted against true rewards for probe action sequences.")
    parser.add_argument("--logdir", required=True, help="run folder written by experiments.train")
    parser.add_argument("--starts", type=int, default=4, help="episode starts to check")
    parser.add_argument("--warmup", type=int, default=3, help="agent steps of no force before the check")
    parser.add_argument("--random", type=int, default=4, help="uniform random probe sequences")
    parser.add_argument("--samples", type=int, default=8, help="prior rollouts averaged per sequence")
    parser.add_argument("--seed", type=int, default=1, help="first episode seed; start i uses seed + i")
    args = parser.parse_args(argv)
    with cli.usage_errors(parser):
        for name in ("starts", "samples"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
        if args.warmup < 0 or args.random < 0:
            raise ValueError("--warmup and --random must be >= 0")
        import jax

        from planet_jax import envs, loop, model_check, rundir

        cfg, env_name, _ = rundir.read(args.logdir)
        probe_env = envs.make_env(env_name, cfg.train.action_repeat, cfg.train.episode_steps)
        action_dim, repeat, steps = probe_env.action_dim, probe_env.action_repeat, probe_env.max_agent_steps
        probe_env.close()
        if args.warmup + cfg.planner.horizon > steps:
            raise ValueError(f"--warmup {args.warmup} plus the horizon {cfg.planner.horizon} is longer "
                             f"than an episode ({steps} agent steps)")
        params = loop.load_params(args.logdir, action_dim)
        sequences = model_check.probe_sequences(cfg.planner.horizon, action_dim, args.random,
                                                np.random.default_rng(args.seed))
        prefix = np.zeros((args.warmup, action_dim), np.float32)
        correlations, regrets = [], []
        print(f"{env_name}, action repeat {repeat}: sums over H = {cfg.planner.horizon} agent steps "
              f"after {args.warmup} of no force")
        for i in range(args.starts):
            result = model_check.check(params, cfg.model, env_name, args.seed + i, repeat,
                                       cfg.train.episode_steps, prefix, sequences,
                                       jax.random.PRNGKey(args.seed + i), args.samples)
            true, predicted = result.true.sum(1), result.predicted.sum(1)
            correlations.append(model_check.rank_correlation(true, predicted))
            regrets.append(true.max() - true[np.argmax(predicted)])
            print(f"start {i} (seed {args.seed + i}): rank correlation {correlations[-1]:+.2f}")
            for name, t, p, t_steps, p_steps in zip(result.names, true, predicted, result.true,
                                                    result.predicted):
                print(f"  {name:12s} true {t:7.1f}  model {p:7.1f}   first steps true "
                      f"{np.array2string(t_steps[:4], precision=1)} model "
                      f"{np.array2string(p_steps[:4], precision=1)}")
        print(f"mean rank correlation {np.mean(correlations):+.2f}; true return lost by acting on the "
              f"model's favourite sequence: {np.mean(regrets):.1f} (mean over {args.starts} starts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
