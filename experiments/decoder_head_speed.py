"""Side-by-side timing of the decoder's dense layer and first transposed conv, forward and gradients,
as the training loss ran them before (per image group, the conv as `ops.conv_transpose_s2` 'taps')
and as it runs them now (one `ops.dense_conv_transpose_1x1` on the whole batch).

    python -m experiments.decoder_head_speed [--preset paper|cpu] [--rounds 7]

Prints the largest relative gradient difference and the median seconds of each, alternating.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from experiments import cli
from planet_jax import config, ops


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("paper", "cpu"), default="paper")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    cfg = getattr(config, args.preset)()
    d, f = cfg.model.cnn_depth, cfg.model.feature_size
    # The groups the search chose on the machine of docs/performance_speed.md: 2 and 1 sequences.
    batch, length, group = cfg.train.batch_size, cfg.train.chunk_length, 2 if args.preset == "paper" else 1
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    feat = jax.random.normal(k[0], (batch // group, group * length, f))
    params = (jax.random.normal(k[1], (f, 32 * d)) / f ** 0.5, jnp.zeros(32 * d),
              jax.random.normal(k[2], (5, 5, 32 * d, 4 * d)) / (25 * 32 * d) ** 0.5, jnp.zeros(4 * d))
    cotangent = jax.random.normal(k[3], feat.shape[:2] + (5, 5, 4 * d))

    def per_group(p, feat):
        w_d, b_d, kernel, bias = p
        one = lambda fg: jnp.sum(ops.conv_transpose_s2((fg[0] @ w_d + b_d)[:, None, None], kernel, bias,
                                                       impl="taps") * fg[1])
        return jnp.sum(jax.lax.map(one, (feat, cotangent)))

    def whole_batch(p, feat):
        return jnp.sum(ops.dense_conv_transpose_1x1(feat, *p) * cotangent)

    fns = {name: jax.jit(jax.grad(fn, (0, 1))) for name, fn in (("per_group", per_group), ("one_map", whole_batch))}
    a, b = (fn(params, feat) for fn in fns.values())
    diff = max(float(jnp.abs(x - y).max() / jnp.abs(x).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    print(f"largest relative gradient difference: {diff:.2e}")
    seconds = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, feat))
            seconds[name].append(time.perf_counter() - start)
    for name, ts in seconds.items():
        print(f"{args.preset} {name}: median {statistics.median(ts):.4f} s over {len(ts)} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
