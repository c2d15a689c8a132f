"""The world model's networks: encoder, decoder, reward model, RSSM cells, and image preprocessing.

Flax modules are only used to hold the layers; everything else calls them through `apply` on an
explicit parameter pytree (see `init_params`). Images are NHWC, 64x64x3.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import types
from typing import Any, Iterator, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from planet_jax import ops, prng
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
        # fast: matmuls on shifted windows, or XLA's stride-1 conv on 2x2 blocks for narrow layers
        # (planet_jax.ops); same parameters.
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


class Weights(nn.Module):
    """Parameters only: 'kernel' of `kernel_shape` drawn by `kernel_init` and, with `use_bias`, a
    zero 'bias' (kernel_shape[-1],): by default what `nn.Dense` and `nn.ConvTranspose` of the same
    name hold (LeCun normal, zeros). Returns (kernel, bias or None), for layers that are computed
    together (`ops.dense_conv_transpose_1x1`, `GRUCell`'s gates)."""
    kernel_shape: tuple[int, ...]
    kernel_init: Any = nn.linear.default_kernel_init
    use_bias: bool = True

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", self.kernel_init, self.kernel_shape, jnp.float32)
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", nn.initializers.zeros_init(), self.kernel_shape[-1:], jnp.float32)


# The decoder's parameters that `Decoder.head` uses; `Decoder.body` uses the rest.
DECODER_HEAD = ("dense", "deconv0")


def decoder_body_params(params: Params) -> Params:
    """The part of params['decoder'] that `decode_body` uses (all but `DECODER_HEAD`'s layers)."""
    return {name: p for name, p in params["decoder"].items() if name not in DECODER_HEAD}


class Decoder(nn.Module):
    """Mean of p(o_t | h_t, s_t): dense 1024 (x depth/32) -> deconv 128 (k5), 64 (k5), 32 (k6), 3 (k6).

    `head` is the dense layer and the first transposed conv (on its 1x1 output), before that conv's
    ReLU; `body` the rest. The parameters are flax's `Dense` ('dense') and `ConvTranspose`
    ('deconv0'..'deconv3') either way.
    """
    depth: int
    feature_size: int
    fast: bool = True
    dtype: str = "float32"

    def setup(self):
        d = self.depth
        self.dense = Weights((self.feature_size, 32 * d))
        self.deconv0 = Weights((5, 5, 32 * d, 4 * d))
        # fast: an exact reformulation of the stride-2 transposed conv (planet_jax.ops); the
        # parameters are the same either way.
        self.deconv1 = Deconv(2 * d, 5, self.fast, dtype=self.dtype)
        self.deconv2 = Deconv(d, 6, self.fast, dtype=self.dtype)
        self.deconv3 = Deconv(3, 6, self.fast, dtype=self.dtype)

    def __call__(self, feat: jax.Array) -> jax.Array:
        return self.body(self.head(feat))

    def head(self, feat: jax.Array) -> jax.Array:
        """(N, |h|+|s|) -> (N, 5, 5, 4 depth), before the ReLU."""
        (w_d, b_d), (kernel, bias) = self.dense(), self.deconv0()
        if self.fast:  # one affine map: no nonlinearity between the two layers
            return ops.dense_conv_transpose_1x1(feat, w_d, b_d, kernel, bias, self.dtype)
        x = jnp.dot(feat, w_d) + b_d
        return ops.conv_transpose_s2_plain(x.reshape(x.shape[:-1] + (1, 1, -1)), kernel, bias)

    def body(self, x: jax.Array) -> jax.Array:
        """`head`'s output (N, 5, 5, 4 depth) -> (N, 64, 64, 3) mean images."""
        x = relu(self.deconv1(relu(x)))
        return self.deconv3(relu(self.deconv2(x)))


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


class GRUCell(nn.Module):
    """`flax.linen.GRUCell`'s gated recurrent unit with its parameters ('ir', 'iz', 'in' with biases,
    'hr', 'hz' without, 'hn' with; the same initialisers, so the same values for the same key), its
    gates' input products computed as one matmul and its state's as another, as `torch.nn.GRUCell`
    does, instead of six. The cell is the reset-after variant of Cho et al. (2014) that flax,
    PyTorch and cuDNN compute (the reset gate applied after the state's product):

        r = sigmoid(x W_ir + b_ir + h W_hr),  z = sigmoid(x W_iz + b_iz + h W_hz),
        n = tanh(x W_in + b_in + r * (h W_hn + b_hn)),  h' = (1 - z) * n + z * h.

    Called as flax's cell: (h (..., features), x (..., in)) -> (h', h'), float32; `features` must
    be h's last axis (flax's cell reads it from h). None of flax's options (gate and activation
    functions, initialisers, dtype, param_dtype, initialize_carry). Its matmul operands are rounded
    as `dense_operands` asks (the type in force when the cell is traced)."""
    features: int

    @nn.compact
    def __call__(self, h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        n, d = self.features, x.shape[-1]
        inputs = [Weights((d, n), name=k)() for k in ("ir", "iz", "in")]
        state = [Weights((n, n), nn.initializers.orthogonal(), k == "hn", name=k)() for k in ("hr", "hz", "hn")]
        dtype = _DENSE_OPERANDS.get()
        x_rzn = ops.dot(x, jnp.concatenate([w for w, _ in inputs], -1), dtype) + jnp.concatenate([b for _, b in inputs])
        h_rzn = ops.dot(h, jnp.concatenate([w for w, _ in state], -1), dtype)
        x_r, x_z, x_n = jnp.split(x_rzn, 3, -1)
        h_r, h_z, h_n = jnp.split(h_rzn, 3, -1)
        r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
        candidate = jnp.tanh(x_n + r * (h_n + state[2][1]))
        h_new = (1.0 - z) * candidate + z * h
        return h_new, h_new


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
            h_t, _ = GRUCell(cfg.h_size, name="gru")(h_tm1, x)
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
        "decoder": Decoder(cfg.cnn_depth, cfg.feature_size, cfg.fast_conv, cfg.conv_dtype),
        "reward": RewardModel(cfg.reward_hidden, cfg.reward_layers),
        "transition": Transition(cfg),
        "posterior": Posterior(cfg),
    })


def apply(params: Params, cfg: ModelConfig, part: str, *inputs: jax.Array, method: str | None = None
          ) -> Any:
    """Runs network `part` (a key of `modules(cfg)`) on `inputs` with its slice of `params`; `method`
    names another of its methods than `__call__` (the decoder's 'head' and 'body').

    Raises KeyError for an unknown part, AttributeError for an unknown method.
    """
    return modules(cfg)[part].apply({"params": params[part]}, *inputs, method=method)


# The operand type `dense_operands` asks for, read by `GRUCell`'s own matmuls.
_DENSE_OPERANDS: contextvars.ContextVar[str] = contextvars.ContextVar("dense_operands", default="float32")


@contextlib.contextmanager
def dense_operands(dtype: str) -> Iterator[None]:
    """Rounds the operands of flax's `nn.Dense` layers: within this context, every `nn.Dense` (not
    `DenseGeneral` or `Einsum`) called on this thread multiplies with its input and kernel cast to
    `dtype`, accumulating in float32 (`lax.dot_general`'s preferred_element_type), and adds its bias
    in float32: (..., in) -> float32 (..., out), each operand within 2^-8 relative error for
    'bfloat16'; the layer's own dtype, precision and dot_general are not used. 'float32' leaves the
    layers as they are (inside a 'bfloat16' context it does not undo that one).

    It acts when a layer is called, which for jitted code is when the function is traced: a program
    traced outside the context keeps float32 operands when later called inside it, and the other
    way round (the planner enters it within its own jitted function). flax's GRU cell builds its
    own dense layers, which a method interceptor (`flax.linen.intercept_methods`) reaches without a
    copy of the cell; this module's `GRUCell` reads the type directly. Used by the planner's
    optional bfloat16 rollouts (`PlannerConfig.matmul_dtype`).

    Raises ValueError for a dtype not in config.MATMUL_DTYPES.
    """
    if ops.check_dtype(dtype) == "float32":
        yield
        return

    def rounded_dense(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, nn.Dense) and context.method_name == "__call__"
                and module.has_variable("params", "kernel")):  # initialisation: flax's own
            return next_fun(*args, **kwargs)
        y = ops.dot(args[0] if args else kwargs["inputs"], module.get_variable("params", "kernel"), dtype)
        return y + module.get_variable("params", "bias") if module.use_bias else y

    token = _DENSE_OPERANDS.set(dtype)
    try:
        with nn.intercept_methods(rounded_dense):
            yield
    finally:
        _DENSE_OPERANDS.reset(token)


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
    """(..., |h|+|s|) features -> (..., 64, 64, 3) mean images: `decode_body` of `decode_head`."""
    return decode_body(params, cfg, decode_head(params, cfg, feat))


def decode_head(params: Params, cfg: ModelConfig, feat: jax.Array) -> jax.Array:
    """The decoder's dense layer and first transposed conv: (..., |h|+|s|) features ->
    (..., 5, 5, 4 depth) float32, before that conv's ReLU. Cheaper per image on many images at once
    (`ops.dense_conv_transpose_1x1` multiplies the two kernels once per call)."""
    chex.assert_shape(feat, (..., cfg.feature_size))
    lead = feat.shape[:-1]
    x = apply(params, cfg, "decoder", feat.reshape((-1, cfg.feature_size)), method="head")
    return x.reshape(lead + x.shape[1:])


def decode_body(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The rest of the decoder: `decode_head`'s (..., 5, 5, 4 depth) -> (..., 64, 64, 3) mean images."""
    chex.assert_shape(x, (..., 5, 5, 4 * cfg.cnn_depth))
    lead = x.shape[:-3]
    o = apply(params, cfg, "decoder", x.reshape((-1,) + x.shape[-3:]), method="body")
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
    *lead, w, c = shape
    half = (w + 1) // 2
    words = prng.bits(key, (*lead, half, c))
    u = jnp.concatenate([words >> NOISE_BITS, words & (2 ** NOISE_BITS - 1)], axis=-2)
    return (u[..., :w, :].astype(jnp.float32) + 0.5) / (2 ** NOISE_BITS * bins)


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
