"""The training objective: the variational bound with latent overshooting (paper eqs. 3 and 7).

Per sequence, with free nats F and overshooting distance D:

  loss = image_scale * E_t[-log p(o_t | h_t, s_t)] + reward_scale * E_t[-log p(r_t | h_t, s_t)]
         + (1 / D) * sum_{d=1..D} beta_d * KL_d + global_kl_beta * E_t[KL[q(s_t) || N(0, I)]]

  KL_d = mean over targets t in [d-1, T-1] of max(KL[q(s_t | o<=t) || p_d(s_t)], F)

where p_d(s_t) is the prior reached by d transition steps started from the posterior state before
frame t-d+1 (the zero state before frame 0, the posterior sample at t-d otherwise), with beta_1 = 1
and q a stop-gradient target for d > 1. KL_1 is the standard one-step KL. The Gaussian
log-likelihoods drop their constants: -log N(x; mu, I) = ||x - mu||^2 / 2 + const.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from planet_jax import autotune, networks, ops, rssm
from planet_jax.config import LossConfig, ModelConfig
from planet_jax.replay import Batch
from planet_jax.rssm import Gaussian, RSSMState


def kl_divergence(q: Gaussian, p: Gaussian) -> jax.Array:
    """KL[q || p] in nats, (...) for diagonal Gaussians over s with mean and std (..., |s|): the
    closed form of distrax's MultivariateNormalDiag."""
    return q.distribution().kl_divergence(p.distribution())


def overshooting_kls(params: networks.Params, cfg: ModelConfig, loss_cfg: LossConfig,
                     states: RSSMState, priors: Gaussian, posteriors: Gaussian, a: jax.Array,
                     key: jax.Array) -> jax.Array:
    """KL_d for d = 1..D of one sequence, free nats applied; returns (D,).

    Args: posterior `states`, one-step `priors` and `posteriors` from `rssm.observe` (leading T),
    actions a (T, |a|). Start k (0..T-1) holds the state before frame k; after d steps it predicts
    frame k + d - 1. All T starts advance together through a scan over d, so the cost is
    (D - 1) * T transition steps and no (D, T, ...) copy of the states is built.
    """
    T = a.shape[0]
    D = loss_cfg.overshooting_distance
    free = loss_cfg.free_nats
    kl_1 = jnp.mean(jnp.maximum(kl_divergence(posteriors, priors), free))
    if D == 1:
        return kl_1[None]

    target = jax.tree.map(jax.lax.stop_gradient, posteriors)
    # Pad past the end so every start has D - 1 more steps; padded targets are masked out.
    pad = lambda x, value: jnp.concatenate([x, jnp.full((D,) + x.shape[1:], value, x.dtype)])
    a_pad = pad(a, 0.0)
    target_pad = Gaussian(pad(target.mean, 0.0), pad(target.std, 1.0))
    start = jnp.arange(T)

    # d = 1: h_k is shared with the posterior state; sample s_k from the one-step prior.
    k0, key = jax.random.split(key)
    state_1 = RSSMState(states.h, rssm.sample(cfg, priors, k0))

    def step(state, inputs):
        d, k = inputs
        a_d = jax.lax.dynamic_slice_in_dim(a_pad, d - 1, T)
        keys = jax.random.split(k, T)
        state, p = jax.vmap(lambda st, a_t, kk: rssm.transition_step(params, cfg, st, a_t, kk))(
            state, a_d, keys)
        q = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, d - 1, T), target_pad)
        valid = (start + d - 1 <= T - 1).astype(jnp.float32)
        kl = jnp.maximum(kl_divergence(q, p), free)
        return state, jnp.sum(kl * valid) / jnp.sum(valid)

    distances = jnp.arange(2, D + 1)
    _, kl_rest = jax.lax.scan(step, state_1, (distances, jax.random.split(key, D - 1)))
    return jnp.concatenate([kl_1[None], kl_rest])


def sequence_loss(params: networks.Params, cfg: ModelConfig, loss_cfg: LossConfig,
                  embeds: jax.Array, a: jax.Array, r: jax.Array,
                  key: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """Latent and reward terms of one sequence (embeds (T, |e|), a, r) and its features (T, |h|+|s|)."""
    k_obs, k_os = jax.random.split(key)
    states, priors, posteriors = rssm.observe(params, cfg, embeds, a, k_obs)
    feat = rssm.features(states)
    reward_nll = 0.5 * jnp.square(networks.reward(params, cfg, feat) - r)
    kl_d = overshooting_kls(params, cfg, loss_cfg, states, priors, posteriors, a, k_os)
    standard_normal = Gaussian(jnp.zeros_like(posteriors.mean), jnp.ones_like(posteriors.std))
    return {
        "reward_loss": jnp.mean(reward_nll),
        "kl_d": kl_d,
        "global_kl": jnp.mean(kl_divergence(posteriors, standard_normal)),
    }, feat


# The group size that `model.image_group = 0` means on a CPU when nothing is measured.
CPU_IMAGE_GROUP = 2
# On a CPU, groups of more images than this are not timed (one call would take seconds).
MAX_CPU_SEARCH_IMAGES = 1024
# A group size other than the default must save this fraction of its time: larger groups hold more
# images' activations at once (peak memory), and the candidates run the layers' default formulations.
IMAGE_GROUP_MIN_GAIN = 0.1


# Named in the group search's cache key once the layers its candidates run (at their default
# formulations) have changed, so that group sizes timed with the old layers are timed again: r2,
# conv_s2's 'mixed' became windows of paired rows; r3, the decoder's gradients taken group by
# group in its forward pass (`image_loss`).
_GROUP_REVISION = " r3"
# The layer passes' revisions (`ops._PASS_REVISION`) that _GROUP_REVISION was last weighed against:
# a test fails when they differ, so that a revised layer default is not missed here.
_GROUP_REVISION_LAYERS = {("conv_transpose_s2", "gradients"): " r2", ("conv_s2", "forward"): " r2",
                          ("conv_s2", "gradients"): " r2"}


def image_group(cfg: ModelConfig, batch: int, length: int, tuner: autotune.Tuner | None = None) -> int:
    """Sequences per encoder/decoder call in the loss for a batch of `batch` sequences of `length`
    frames: `cfg.image_group` when positive; for 0, the divisor of `batch` whose groups ran the
    encoder and decoder body fastest on this machine (`planet_jax.autotune`, cached), or, with the
    search off, CPU_IMAGE_GROUP on a CPU and the whole batch elsewhere.

    Each candidate group size g is timed as the loss runs it: the encoder in a `lax.map` over
    groups of g sequences and the decoder body in `image_loss`'s loop over the same groups, forward
    and gradients, covering as many sequences as the largest candidate group
    (so every candidate does about the same work, and small groups pay their loop and large groups
    their working sets, as in the step); times are scaled to the whole batch, and the default wins
    unless another saves IMAGE_GROUP_MIN_GAIN of its time."""
    if cfg.image_group > 0:
        return cfg.image_group
    cpu = jax.default_backend() == "cpu"
    # The default must divide the batch like every candidate: the largest such group up to CPU_IMAGE_GROUP.
    default = max(g for g in range(1, min(CPU_IMAGE_GROUP, batch) + 1) if batch % g == 0) if cpu else batch
    sizes = [g for g in range(1, batch + 1) if batch % g == 0
             and (not cpu or g * length <= MAX_CPU_SEARCH_IMAGES or g == default)]
    span = max(sizes)
    groups = {g: -(-span // g) for g in sizes}  # groups of g covering at least `span` sequences
    params = functools.cache(functools.partial(_image_params, cfg))  # drawn once, if the search runs
    candidates = {str(g): functools.partial(_timed_groups, cfg, g, groups[g], length, params) for g in sizes}
    calls = {str(g): batch / (g * groups[g]) for g in sizes}
    gflop = _image_flops(cfg) * length / 1e9
    key = (f"B{batch} L{length} depth{cfg.cnn_depth} feat{cfg.feature_size} {cfg.conv_dtype} "
           f"fast{int(cfg.fast_conv)} conv {cfg.conv_impl} decoder body, looped{_GROUP_REVISION}")
    return int((tuner or autotune.Tuner()).choose("objective.image_group", key, candidates, str(default),
                                                  gflop=gflop, calls=calls, min_gain=IMAGE_GROUP_MIN_GAIN))


def _image_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs (2 * multiply-adds) of the encoder and the decoder body (`networks.decode_body`:
    its transposed convs after the first) for one image."""
    d = cfg.cnn_depth
    encoder = sum(2 * size * size * 16 * c_in * c_out for size, c_in, c_out in
                  ((31, 3, d), (14, d, 2 * d), (6, 2 * d, 4 * d), (2, 4 * d, 8 * d)))
    decoder = sum(2 * size * size * k * k * c_in * c_out for size, k, c_in, c_out in
                  ((5, 5, 4 * d, 2 * d), (13, 6, 2 * d, d), (30, 6, d, 3)))
    return encoder + decoder


def _image_params(cfg: ModelConfig) -> networks.Params:
    """Random encoder and decoder parameters, {'encoder', 'decoder'}, to time candidates with.
    Initialised under jit: flax's init run op by op takes seconds at the paper's sizes."""
    mods = networks.modules(cfg)
    key = jax.random.PRNGKey(0)
    return {"encoder": jax.jit(mods["encoder"].init)(key, jnp.zeros((1, 64, 64, 3)))["params"],
            "decoder": jax.jit(mods["decoder"].init)(key, jnp.zeros((1, cfg.feature_size)))["params"]}


def _timed_groups(cfg: ModelConfig, group: int, groups: int, length: int,
                  params: Callable[[], networks.Params]) -> Callable[[], Any]:
    """An autotune candidate: what `loss_fn` runs on images, the encoder in a `lax.map` over `groups`
    groups of `group` sequences of `length` random frames and the decoder body as `image_loss` runs
    it over the same groups, forward and gradients (parameters and the decoder head's output),
    compiled with the conv layers as cfg pins
    them, each pass it leaves 'auto' at its default (so timing a group does not first search layers).
    params() gives the encoder and decoder parameters (`_image_params`, shared by the candidates)."""
    o = autotune.random_array((groups, group * length, 64, 64, 3), 0, uniform=(-0.5, 0.5))
    head = autotune.random_array((groups, group * length, 5, 5, 4 * cfg.cnn_depth), 1)
    params = params()
    grouped = dataclasses.replace(cfg, image_group=group)
    frames = lambda v: v.reshape((groups * group, length) + v.shape[2:])

    def loss(p, head, o):  # o an argument: closed over, it would be a constant inside the program
        embeds = jax.lax.map(lambda o: jnp.sum(jnp.square(networks.encode(p, cfg, o))), o)
        return jnp.sum(embeds) + _image_loss(grouped, "default", networks.decoder_body_params(p),
                                             frames(head), frames(o))

    with ops.conv_impl_scope(cfg.conv_impl, auto="default"):
        grads = jax.jit(jax.grad(loss, (0, 1))).lower(params, head, o).compile()
    return lambda: jax.block_until_ready(grads(params, head, o))


def _groups(xs, cfg: ModelConfig) -> tuple[Any, Any]:
    """The pytree xs of per-frame values (B, T, ...) in groups of g = `image_group(cfg, B, T)`
    sequences: (the B // g whole groups stacked, each with its frames on one axis,
    (B // g, g * T, ...); the B % g sequences left, (B % g, T, ...)), either None when empty;
    (None, xs) when one group holds the batch."""
    batch, length = jax.tree.leaves(xs)[0].shape[:2]
    group = image_group(cfg, batch, length)
    if group >= batch:
        return None, xs
    n, rest = divmod(batch, group)
    grouped = jax.tree.map(lambda v: v[:n * group].reshape((n, group * length) + v.shape[2:]), xs)
    return grouped, jax.tree.map(lambda v: v[n * group:], xs) if rest else None


def _by_groups(fn, xs, cfg: ModelConfig, auto: str = "auto"):
    """fn over the pytree xs of per-frame values (B, T, ...), `image_group(cfg, ...)` sequences at
    a time (see `ModelConfig.image_group`, `_groups`), with the conv layers as `ModelConfig.conv_impl`
    says (`auto` as in `ops.conv_impl_scope`).
    fn maps frames with any leading axes, (..., frame) -> (..., result), as the encoder and decoder do.

    Groups run one after another (`lax.map`), so the encoder's and decoder's large intermediates
    exist for one group of sequences at a time: less peak memory, and working sets that stay in
    cache. The result equals fn on the whole batch.
    """
    length = jax.tree.leaves(xs)[0].shape[1]
    with ops.conv_impl_scope(cfg.conv_impl, auto):
        grouped, tail = _groups(xs, cfg)
        if grouped is None:
            return fn(tail)
        # fn sees whole groups (not lax.map's batch_size, which vmaps fn over each group's entries:
        # that turns the transposed convs' custom backward into per-entry kernel gradients), with
        # their frames on one axis: then an input the backward pass needs is the loop's input
        # itself, which the loop does not stack again (fn's own reshape to one axis would be a
        # new value, stacked per group).
        ys = jax.tree.map(lambda v: v.reshape((-1, length) + v.shape[2:]), jax.lax.map(fn, grouped))
        if tail is not None:
            ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, fn(tail))
        return ys


def _image_nll(cfg: ModelConfig, decoder: networks.Params, head: jax.Array, o: jax.Array) -> jax.Array:
    """-log p(o | h, s) up to its constant, per image: 0.5 ||decode_body(head) - o||^2, (...)."""
    mean = networks.decode_body({"decoder": decoder}, cfg, head)
    return 0.5 * jnp.sum(jnp.square(mean - o), (-3, -2, -1))


def image_loss(params: networks.Params, cfg: ModelConfig, head: jax.Array, obs: jax.Array) -> jax.Array:
    """The image term of the bound: -log p(o_t | h_t, s_t) up to its constant, averaged over the
    batch's images (paper eq. 3's reconstruction term, unit-variance Gaussian).

    head: float32 (B, T, 5, 5, 4 depth), `networks.decode_head` of the features; obs: float32
    (B, T, 64, 64, 3) preprocessed frames (`networks.preprocess`). Returns a float32 scalar, nats
    per image. Runs the decoder body by groups of sequences (`_groups`); differentiated, each
    group's gradients are taken as soon as its forward pass is done, while its activations are
    in cache, and summed (the loss is a sum over groups), so no group's activations are kept for
    a backward pass. obs gets no gradient (data). A `jax.custom_vjp`: reverse mode only
    (`jax.jvp` or `jax.hessian` of it raise, as for the decoder's fast layers).
    """
    return _image_loss(cfg, "auto", networks.decoder_body_params(params), head, obs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _image_loss(cfg: ModelConfig, auto: str, body: networks.Params, head: jax.Array, obs: jax.Array
                ) -> jax.Array:
    """`image_loss` with the decoder body's parameters alone (the head's gradients reach them
    through head); `auto` as in `ops.conv_impl_scope` (the image-group search times its candidates
    with the layers' defaults)."""
    return jnp.mean(_by_groups(lambda xo: _image_nll(cfg, body, *xo), (head, obs), cfg, auto))


def _image_loss_fwd(cfg, auto, body, head, obs):
    value_and_grads = jax.value_and_grad(lambda p, h, o: jnp.sum(_image_nll(cfg, p, h, o)), (0, 1))

    def one_group(total, xo):
        loss, (d_body, d_head) = value_and_grads(body, *xo)
        return jax.tree.map(jnp.add, total, (loss, d_body)), d_head

    total = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, body))
    d_heads = []
    with ops.conv_impl_scope(cfg.conv_impl, auto):
        grouped, tail = _groups((head, obs), cfg)
        if grouped is not None:
            total, d_grouped = jax.lax.scan(one_group, total, grouped)
            d_heads.append(d_grouped.reshape((-1,) + head.shape[1:]))
        if tail is not None:
            total, d_tail = one_group(total, tail)
            d_heads.append(d_tail)
    loss, d_body = total
    count = obs.shape[0] * obs.shape[1]
    return loss / count, (jax.tree.map(lambda g: g / count, d_body), jnp.concatenate(d_heads) / count)


def _image_loss_bwd(cfg, auto, grads, g):
    d_body, d_head = grads
    return jax.tree.map(lambda x: g * x, d_body), g * d_head, None


_image_loss.defvjp(_image_loss_fwd, _image_loss_bwd)


def loss_fn(params: networks.Params, cfg: ModelConfig, loss_cfg: LossConfig, batch: Batch,
            key: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Negative bound averaged over the batch; returns (loss, metrics)."""
    B, T = batch.action.shape[:2]
    chex.assert_shape(batch.obs, (B, T, 64, 64, 3))
    chex.assert_shape(batch.reward, (B, T))
    k_pre, k_seq = jax.random.split(key)
    obs = networks.preprocess(batch.obs, k_pre, cfg.bit_depth)
    embeds = _by_groups(lambda o: networks.encode(params, cfg, o), obs, cfg)
    terms, feat = jax.vmap(sequence_loss, (None, None, None, 0, 0, 0, 0))(
        params, cfg, loss_cfg, embeds, batch.action, batch.reward, jax.random.split(k_seq, B))
    # The decoder's head multiplies its two kernels once per call, so it runs once on all images.
    head = networks.decode_head(params, cfg, feat)
    terms = jax.tree.map(lambda x: jnp.mean(x, 0), terms)
    terms["image_loss"] = image_loss(params, cfg, head, obs)
    D = loss_cfg.overshooting_distance
    beta = jnp.full((D,), loss_cfg.overshooting_beta).at[0].set(1.0)
    kl_loss = jnp.sum(beta * terms["kl_d"]) / D
    loss = (loss_cfg.image_scale * terms["image_loss"] + loss_cfg.reward_scale * terms["reward_loss"]
            + kl_loss + loss_cfg.global_kl_beta * terms["global_kl"])
    return loss, {**terms, "kl_loss": kl_loss, "loss": loss}
