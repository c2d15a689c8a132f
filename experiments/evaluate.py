"""Evaluate a trained run: noise-free test episodes with its last checkpoint.

  python -m experiments.evaluate --logdir runs/walker_walk/0 --episodes 10
"""
from __future__ import annotations

import numpy as np

from experiments import cli


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m experiments.evaluate", description="Run test episodes with a run's last checkpoint.")
    parser.add_argument("--logdir", required=True, help="run folder written by experiments.train")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=12345, help="seed of the test environments")
    args = parser.parse_args(argv)
    with cli.usage_errors(parser):
        # Imported here, not at the top: `python -m experiments.evaluate` may restart itself
        # (cli.restart_with_huge_pages) before main, and JAX would be imported twice.
        from planet_jax import loop, runtime
        runtime.use_compilation_cache()
        returns = loop.evaluate(args.logdir, args.episodes, args.seed)
        episodes = f"{len(returns)} episode{'s' if len(returns) > 1 else ''}"
        print(f"return over {episodes}: mean {np.mean(returns):.1f} std {np.std(returns):.1f}"
              f" (videos in {args.logdir}/videos/eval_*.mp4)")
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_pages()
    raise SystemExit(main())
