"""Random bits and normals equal to `jax.random`'s, drawn faster by XLA:CPU.

jax lowers its threefry hash for a CPU as a rolled loop of five iterations: each iteration is one
pass over the whole array of counters, so a large draw reads and writes its state five times, and a
draw inside a compiled loop pays five inner loop iterations. `bits` computes the same hash with
its twenty rounds unrolled (the lowering jax uses on GPUs), which XLA:CPU compiles to one pass, and
hands the words on through an optimisation barrier: without it XLA fused the hash into every
consumer of the words, which then ran it many times over (docs/performance_speed.md, fifteenth
session).

The words are those of `jax.random.bits` (threefry2x32 of each flat index, the partitionable
counters that are jax's default), so every draw here equals jax's for the same key; where that does
not hold (another PRNG, `jax_threefry_partitionable` off, a draw of 2^32 words or more) or off a
CPU, `bits` calls `jax.random.bits` itself, and `normal` turns those words into normals as jax does
(for a dtype other than float32 it calls `jax.random.normal`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011):
# the rotation constants of the even and odd groups of four rounds, and the key schedule's parity.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _key_words(key: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """The two uint32 words of one threefry2x32 key (raw uint32 (2,) or typed), or None when the
    words would not be jax's threefry words."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        key = jax.random.key_data(key)
    elif key.shape != (2,) or key.dtype != jnp.uint32 or jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    return key[0], key[1]


def _unrolled(n: int) -> bool:
    return (jax.default_backend() == "cpu" and bool(jax.config.jax_threefry_partitionable)
            and 0 < n < 2 ** 32)


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry_words(k1: jax.Array, k2: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """threefry2x32((k1, k2), (0, i)) for each row-major flat index i of `shape`, its two output
    words xored: uint32 of `shape`. Computed as (first axis, the rest merged): XLA:CPU runs the
    hash faster along one long minor axis than along a short one (three channels), and the first
    axis, a batch split over devices, keeps its own counters (jax numbers them by axis alike)."""
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:])
    index = (lax.broadcasted_iota(jnp.uint32, (rows, cols), 0) * np.uint32(cols)
             + lax.broadcasted_iota(jnp.uint32, (rows, cols), 1))
    schedule = (k1, k2, k1 ^ k2 ^ _PARITY)
    x0 = jnp.zeros((rows, cols), jnp.uint32) + schedule[0]
    x1 = index + schedule[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left(x1, r)
        x0 = x0 + schedule[(i + 1) % 3]
        x1 = x1 + schedule[(i + 2) % 3] + np.uint32(i + 1)
    return (x0 ^ x1).reshape(shape)


def bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random words of `shape`, equal to `jax.random.bits(key, shape, jnp.uint32)`.

    key: one PRNG key (raw uint32 (2,) or typed; vmap for a batch of keys). Anything else (a batch
    of keys, another PRNG's key) goes to `jax.random.bits`, which raises for what it rejects.
    """
    shape = tuple(shape)
    words = _key_words(key)
    if words is None or not _unrolled(math.prod(shape)):
        return jax.random.bits(key, shape, jnp.uint32)
    return lax.optimization_barrier(_threefry_words(*words, shape))


def normal(key: jax.Array, shape: tuple[int, ...], dtype=float) -> jax.Array:
    """Standard normal draws of `shape`, equal to `jax.random.normal(key, shape, dtype)` (dtype
    float: float32, or float64 with jax's x64 mode, as jax takes it).

    float32 as jax draws them: sqrt(2) erfinv(u) for u uniform on (-1, 1) from the 23 high bits of
    each of `bits`' words (jax's own words where `bits` calls jax); other dtypes are
    `jax.random.normal`'s own. key as for `bits`.
    """
    shape = tuple(shape)
    if jax.dtypes.canonicalize_dtype(dtype) != jnp.float32:
        return jax.random.normal(key, shape, dtype)
    one_to_two = lax.bitcast_convert_type((bits(key, shape) >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)
    low = np.nextafter(np.float32(-1), np.float32(0))
    u = lax.max(low, (one_to_two - np.float32(1)) * (np.float32(1) - low) + low)
    return np.float32(np.sqrt(2)) * lax.erf_inv(u)
