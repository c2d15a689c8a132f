"""The world model's networks: encoder, decoder, reward model, RSSM cells, and image preprocessing.

Flax modules are only used to hold the layers; everything else calls them through `apply` on an
explicit parameter pytree (see `init_params`). Images are NHWC, 64x64x3.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from planet_jax.config import ModelConfig
from planet_jax.ops import Conv, Deconv, relu

Params = Any


class Encoder(nn.Module):
    """e_t = enc(o_t): conv 32, 64, 128, 256 (x depth/32), kernel 4, stride 2, ReLU; 64x64x3 -> |e|."""
    depth: int
    fast: bool = True
    dtype: str = "float32"

    @nn.compact
    def __call__(self, o: jax.Array) -> jax.Array:
        # fast: space-to-depth and a stride-1 correlation by matmuls (planet_jax.ops), same parameters.
        layer = lambda i, mult: Conv(mult * self.depth, 4, self.fast, dtype=self.dtype, name=f"conv{i}")

        def first_two(module, x):
            return layer(1, 2)(relu(layer(0, 1)(x)))

        # Rematerialised: the backward recomputes the first layer's output (the largest activation
        # the step would save) from the image, which is kept anyway, instead of keeping it. The first
        # layer is the cheapest to recompute (3 input channels).
        x = relu(nn.remat(first_two)(self, o))
        for i, mult in ((2, 4), (3, 8)):
            x = relu(layer(i, mult)(x))
        return x.reshape(x.shape[:-3] + (-1,))


class Decoder(nn.Module):
    """Mean of p(o_t | h_t, s_t): dense 1024 (x depth/32) -> deconv 128 (k5), 64 (k5), 32 (k6), 3 (k6)."""
    depth: int
    fast: bool = True
    dtype: str = "float32"

    @nn.compact
    def __call__(self, feat: jax.Array) -> jax.Array:
        x = nn.Dense(32 * self.depth, name="dense")(feat)
        x = x.reshape(x.shape[:-1] + (1, 1, 32 * self.depth))
        specs = ((4 * self.depth, 5), (2 * self.depth, 5), (self.depth, 6), (3, 6))
        for i, (channels, kernel) in enumerate(specs):
            # fast: an exact reformulation of the stride-2 transposed conv (planet_jax.ops); the
            # parameters are the same either way.
            x = Deconv(channels, kernel, self.fast, dtype=self.dtype, name=f"deconv{i}")(x)
            if i < len(specs) - 1:
                x = relu(x)
        return x


class RewardModel(nn.Module):
    """Mean of p(r_t | h_t, s_t): an MLP with ReLU hidden layers."""
    hidden: int
    layers: int

    @nn.compact
    def __call__(self, feat: jax.Array) -> jax.Array:
        x = feat
        for _ in range(self.layers):
            x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)[..., 0]


class Transition(nn.Module):
    """h_t = f(h_{t-1}, s_{t-1}, a_{t-1}) and the prior p(s_t | h_t) (raw mean and std outputs).

    f is dense + ReLU then a GRU cell for 'rssm'; 'ssm' has no recurrence (h_t is the dense output);
    'rnn' keeps the GRU and its s is a deterministic readout.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_tm1: jax.Array, s_tm1: jax.Array, a_tm1: jax.Array):
        cfg = self.cfg
        x = nn.relu(nn.Dense(cfg.hidden, name="embed_sa")(jnp.concatenate([s_tm1, a_tm1], -1)))
        if cfg.kind == "ssm":
            h_t = nn.relu(nn.Dense(cfg.h_size, name="ssm_hidden")(x))
        else:
            h_t, _ = nn.GRUCell(cfg.h_size, name="gru")(h_tm1, x)
        y = nn.relu(nn.Dense(cfg.hidden, name="prior_hidden")(h_t))
        return h_t, nn.Dense(2 * cfg.s_size, name="prior_out")(y)


class Posterior(nn.Module):
    """q(s_t | h_t, e_t) (raw mean and std outputs)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_t: jax.Array, e_t: jax.Array) -> jax.Array:
        y = nn.relu(nn.Dense(self.cfg.hidden, name="post_hidden")(jnp.concatenate([h_t, e_t], -1)))
        return nn.Dense(2 * self.cfg.s_size, name="post_out")(y)


@functools.cache
def modules(cfg: ModelConfig) -> Mapping[str, nn.Module]:
    """The five networks for `cfg`, built once per configuration (a read-only mapping by part name:
    'encoder', 'decoder', 'reward', 'transition', 'posterior', the keys of the parameter pytree)."""
    return types.MappingProxyType({
        "encoder": Encoder(cfg.cnn_depth, cfg.fast_conv, cfg.conv_dtype),
        "decoder": Decoder(cfg.cnn_depth, cfg.fast_conv, cfg.conv_dtype),
        "reward": RewardModel(cfg.reward_hidden, cfg.reward_layers),
        "transition": Transition(cfg),
        "posterior": Posterior(cfg),
    })


def apply(params: Params, cfg: ModelConfig, part: str, *inputs: jax.Array) -> Any:
    """Runs network `part` (a key of `modules(cfg)`) on `inputs` with its slice of `params`.

    Raises KeyError for an unknown part.
    """
    return modules(cfg)[part].apply({"params": params[part]}, *inputs)


def init_params(cfg: ModelConfig, action_dim: int, key: jax.Array) -> Params:
    """Parameter pytree {'encoder', 'decoder', 'reward', 'transition', 'posterior'} for `action_dim`."""
    mods = modules(cfg)
    keys = dict(zip(mods, jax.random.split(key, len(mods))))
    feat = jnp.zeros((1, cfg.feature_size))
    h, s = jnp.zeros((1, cfg.h_size)), jnp.zeros((1, cfg.s_size))
    dummy_inputs = {
        "encoder": (jnp.zeros((1, 64, 64, 3)),),
        "decoder": (feat,),
        "reward": (feat,),
        "transition": (h, s, jnp.zeros((1, action_dim))),
        "posterior": (h, jnp.zeros((1, cfg.embed_size))),
    }
    return {name: mods[name].init(keys[name], *dummy_inputs[name])["params"] for name in mods}


def encode(params: Params, cfg: ModelConfig, o: jax.Array) -> jax.Array:
    """(..., 64, 64, 3) preprocessed images -> (..., |e|) embeddings."""
    chex.assert_shape(o, (..., 64, 64, 3))
    lead = o.shape[:-3]
    e = apply(params, cfg, "encoder", o.reshape((-1, 64, 64, 3)))
    return e.reshape(lead + (cfg.embed_size,))


def decode(params: Params, cfg: ModelConfig, feat: jax.Array) -> jax.Array:
    """(..., |h|+|s|) features -> (..., 64, 64, 3) mean images."""
    chex.assert_shape(feat, (..., cfg.feature_size))
    lead = feat.shape[:-1]
    o = apply(params, cfg, "decoder", feat.reshape((-1, cfg.feature_size)))
    return o.reshape(lead + (64, 64, 3))


def reward(params: Params, cfg: ModelConfig, feat: jax.Array) -> jax.Array:
    """(..., |h|+|s|) features -> (...) predicted rewards."""
    chex.assert_shape(feat, (..., cfg.feature_size))
    return apply(params, cfg, "reward", feat)


# Random bits per dequantisation noise value: two values from each 32-bit threefry word.
NOISE_BITS = 16


def dequantisation_noise(key: jax.Array, shape: tuple[int, ...], bins: float) -> jax.Array:
    """Uniform noise on (0, 1 / bins), float32 of `shape` (at least 2 axes, e.g. (..., H, W, C)).

    Each value is (u + 1/2) / (2^16 bins) for a uniform 16-bit integer u: the midpoints of 2^16
    equal cells of the bin, so its mean is exactly half a bin. A float32 `jax.random.uniform` would
    draw one 32-bit threefry word per value; this draws one per two values (the high and low halves
    of a word go to the two halves of axis -2, so each value depends on the part of the key stream
    of its own leading index, which keeps a batch split over devices local).
    """
    half = shape[:-2] + ((shape[-2] + 1) // 2, shape[-1])
    words = jax.random.bits(key, half, jnp.uint32)
    u = jnp.concatenate([words >> NOISE_BITS, words & (2 ** NOISE_BITS - 1)], axis=-2)
    return (u[..., :shape[-2], :].astype(jnp.float32) + 0.5) / (2 ** NOISE_BITS * bins)


def preprocess(o: jax.Array, key: jax.Array | None, bit_depth: int = 5) -> jax.Array:
    """uint8 images -> floats in [-0.5, 0.5]: keep `bit_depth` bits, add uniform dequantisation noise.

    o: uint8 (..., H, W, C). floor(o / 2^(8 - b)) / 2^b + U(0, 1 / 2^b) - 0.5 (paper's preprocessing
    with b = 5; the noise at 16-bit resolution within the bin, `dequantisation_noise`). Without a
    key the noise is replaced by its mean, half a bin (for evaluation and video).
    """
    bins = 2.0 ** bit_depth
    x = jnp.floor(o.astype(jnp.float32) / 2 ** (8 - bit_depth)) / bins
    noise = 0.5 / bins if key is None else dequantisation_noise(key, o.shape, bins)
    return x + noise - 0.5


def embed(params: Params, cfg: ModelConfig, o: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """e_t = enc(o_t) of raw frames: `preprocess` (cfg.bit_depth bits) then `encode`.

    o: uint8 (..., 64, 64, 3); key: for the dequantisation noise, or None for its mean (acting,
    evaluation, video). Returns float32 (..., |e|). Raises AssertionError on other image shapes.
    """
    return encode(params, cfg, preprocess(o, key, cfg.bit_depth))


def postprocess(x: jax.Array) -> jax.Array:
    """Model images in [-0.5, 0.5] -> uint8 for video."""
    return jnp.clip(jnp.floor((x + 0.5) * 256.0), 0, 255).astype(jnp.uint8)
