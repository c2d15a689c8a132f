"""The recurrent state-space model as pure functions on a parameter pytree.

One prior step (its noise given) and one posterior step are written once; `observe` (filtering
with the posterior) and `imagine` (open-loop prior rollout) are `lax.scan`s over them, and the
objective's latent overshooting (`transition_step`, the prior step with its noise drawn from a key)
and the planner reuse the same steps.

Time convention (shared with the replay): a sequence is (o_t, a_{t-1}, r_t) for t = 0..T-1, stored
at index t, so `a[t]` is the action that led into frame t and the step at index t computes
h_t = f(h_{t-1}, s_{t-1}, a[t]). The state before the first frame is zeros.

All functions take one example (no batch axis); `vmap` them where a batch is needed. The
`Transition`/`Posterior` networks accept extra leading axes too, so the steps also work batched.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import distrax
import jax
import jax.numpy as jnp

from planet_jax import networks, prng
from planet_jax.config import ModelConfig
from planet_jax.networks import Params


class RSSMState(NamedTuple):
    """Belief state: h (..., |h|) deterministic, s (..., |s|) stochastic sample."""
    h: jax.Array
    s: jax.Array


class Gaussian(NamedTuple):
    """Diagonal Gaussian over s: mean and std, each (..., |s|).

    Kept as arrays so that scans can stack it; `distribution()` is the same Gaussian as a distrax
    distribution, which does the KL and the log-likelihood (samples: `reparameterised`, as
    distrax draws them).
    """
    mean: jax.Array
    std: jax.Array

    def distribution(self) -> distrax.MultivariateNormalDiag:
        """distrax.MultivariateNormalDiag(mean, std): batch shape (...), event shape (|s|,)."""
        return distrax.MultivariateNormalDiag(self.mean, self.std)


def initial_state(cfg: ModelConfig, batch_shape: tuple[int, ...] = ()) -> RSSMState:
    return RSSMState(jnp.zeros(batch_shape + (cfg.h_size,)), jnp.zeros(batch_shape + (cfg.s_size,)))


def features(state: RSSMState) -> jax.Array:
    """(h, s) concatenated: what the decoder and reward model read, (..., |h| + |s|)."""
    return jnp.concatenate([state.h, state.s], -1)


def _gaussian(cfg: ModelConfig, raw: jax.Array) -> Gaussian:
    mean, raw_std = jnp.split(raw, 2, -1)
    if cfg.kind == "rnn":  # deterministic s: unit std makes the KL half the squared mean distance
        return Gaussian(mean, jnp.ones_like(mean))
    return Gaussian(mean, jax.nn.softplus(raw_std) + cfg.min_std)


def sample(cfg: ModelConfig, dist: Gaussian, key: jax.Array) -> jax.Array:
    """s ~ dist, (..., |s|): `reparameterised` with eps = jax.random.normal(key, mean's shape), the
    draw distrax's MultivariateNormalDiag makes for `sample(seed=key)`."""
    return reparameterised(cfg, dist, jax.random.normal(key, dist.mean.shape, dist.mean.dtype))


def reparameterised(cfg: ModelConfig, dist: Gaussian, eps: jax.Array) -> jax.Array:
    """s = mean + std * eps for standard normal noise eps of dist's shape (..., |s|), differentiable
    in mean and std; the mean for the deterministic 'rnn' variant."""
    chex.assert_equal_shape([dist.mean, eps])
    if cfg.kind == "rnn":
        return dist.mean
    return dist.mean + dist.std * eps


def prior(params: Params, cfg: ModelConfig, state_tm1: RSSMState, a_tm1: jax.Array
          ) -> tuple[jax.Array, Gaussian]:
    """h_t = f(h_{t-1}, s_{t-1}, a_{t-1}) and p(s_t | h_t)."""
    h_t, raw = networks.apply(params, cfg, "transition", state_tm1.h, state_tm1.s, a_tm1)
    return h_t, _gaussian(cfg, raw)


def prior_step(params: Params, cfg: ModelConfig, state_tm1: RSSMState, a_tm1: jax.Array,
               eps: jax.Array) -> tuple[RSSMState, Gaussian]:
    """One prior step with its noise given: (h_t, s_t = mean + std * eps of p(s_t | h_t)) and the
    prior itself; eps standard normal, shaped like state_tm1.s (..., |s|)."""
    chex.assert_shape(state_tm1.h, (..., cfg.h_size))
    h_t, p = prior(params, cfg, state_tm1, a_tm1)
    return RSSMState(h_t, reparameterised(cfg, p, eps)), p


def transition_step(params: Params, cfg: ModelConfig, state_tm1: RSSMState, a_tm1: jax.Array,
                    key: jax.Array) -> tuple[RSSMState, Gaussian]:
    """`prior_step` with eps = jax.random.normal(key, state_tm1.s.shape): (h_t, s_t ~ p(s_t | h_t))
    and the prior itself."""
    return prior_step(params, cfg, state_tm1, a_tm1, jax.random.normal(key, state_tm1.s.shape))


def posterior_step(params: Params, cfg: ModelConfig, h_t: jax.Array, e_t: jax.Array,
                   key: jax.Array) -> tuple[RSSMState, Gaussian]:
    """(h_t, s_t ~ q(s_t | h_t, e_t)) and the posterior itself."""
    chex.assert_shape(e_t, (..., cfg.embed_size))
    q = _gaussian(cfg, networks.apply(params, cfg, "posterior", h_t, e_t))
    return RSSMState(h_t, sample(cfg, q, key)), q


def observe_step(params: Params, cfg: ModelConfig, state_tm1: RSSMState, a_tm1: jax.Array,
                 e_t: jax.Array, key: jax.Array) -> tuple[RSSMState, Gaussian, Gaussian]:
    """Filtering step: the posterior state at t, with the prior and posterior of s_t."""
    h_t, p = prior(params, cfg, state_tm1, a_tm1)
    state_t, q = posterior_step(params, cfg, h_t, e_t, key)
    return state_t, p, q


def observe(params: Params, cfg: ModelConfig, e: jax.Array, a: jax.Array, key: jax.Array,
            state0: RSSMState | None = None) -> tuple[RSSMState, Gaussian, Gaussian]:
    """Posterior rollout over a sequence.

    Args: e (T, |e|) embeddings, a (T, |a|) actions (a[t] leads into frame t), key, the state before
    frame 0 (zeros by default). Returns posterior states, priors p(s_t | h_t) and posteriors
    q(s_t | h_t, e_t), each with a leading T axis.
    """
    chex.assert_rank([e, a], 2)
    chex.assert_equal_shape_prefix([e, a], 1)
    state0 = initial_state(cfg) if state0 is None else state0

    def step(state, inputs):
        e_t, a_t, k = inputs
        state, p, q = observe_step(params, cfg, state, a_t, e_t, k)
        return state, (state, p, q)

    keys = jax.random.split(key, e.shape[0])
    _, out = jax.lax.scan(step, state0, (e, a, keys))
    return out


def imagine(params: Params, cfg: ModelConfig, state0: RSSMState, a: jax.Array, key: jax.Array,
            unroll: int = 1, readout: Callable[[RSSMState, Gaussian], Any] | None = None) -> Any:
    """Open-loop prior rollout from state0 under actions a (H, |a|): states and priors (or what
    `readout` emits), leading H.

    Step t is `prior_step` with eps[t], eps ~ N(0, I) of shape (H,) + state0.s.shape drawn from
    `key` at once: `jax.random.normal(key, that shape)`, by `prng.normal`, whose unrolled hash
    XLA:CPU runs faster than jax's H draws inside the loop.
    unroll: steps per iteration of the compiled loop (`lax.scan`'s unroll); the values do not
    depend on it.
    readout: what each step emits instead of its (state, prior): readout(state_t, prior_t), any
    pytree, returned with a leading H axis. Computed inside the loop, so a rollout that needs only
    a function of its states (the planner's rewards) neither stacks nor re-reads them.
    """
    chex.assert_rank(a, 2)
    emit = readout or (lambda state, p: (state, p))

    def step(state, inputs):
        a_t, eps_t = inputs
        state, p = prior_step(params, cfg, state, a_t, eps_t)
        return state, emit(state, p)

    eps = prng.normal(key, a.shape[:1] + state0.s.shape)
    _, out = jax.lax.scan(step, state0, (a, eps), unroll=unroll)
    return out
