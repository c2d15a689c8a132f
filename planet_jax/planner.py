"""PlaNet's planner: the cross-entropy method in latent space (Hafner et al. 2019, section 3).

From the current belief (h_t, s_t), each of J candidate action sequences a_{t:t+H} is scored by
rolling the prior forward with `rssm.imagine` and summing the reward model's predictions over the H
imagined states; `cem.cem` refits to the K best for I iterations and the agent acts with the first
action of the final mean. The paper restarts every decision from N(0, I); optionally the previous
plan, shifted by one step, is the initial mean (`PlannerConfig.warm_start`).

`make_planner(model_cfg, planner_cfg, action_dim)` returns one jitted `plan` that serves one
environment (state.h (|h|,), one key) or N at once (state.h (N, |h|), N keys). The batch maps the
single-environment plan over environments (`lax.map`, vmapped on accelerators), so each
environment's candidates are always scored from its own state, and N environments give exactly
what N separate calls with the same keys give. (The original TF planner tiled states
(candidate, env) but reshaped actions (env, candidate), pairing actions with other environments'
states.)
"""
from __future__ import annotations

import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from planet_jax import cem, networks, rssm
from planet_jax.config import ModelConfig, PlannerConfig
from planet_jax.networks import Params

ACTION_LOW, ACTION_HIGH = -1.0, 1.0


def shift_plan(mean: jax.Array) -> jax.Array:
    """Warm start for the next decision: (..., H, A) mean without its executed first step, zeros last."""
    return jnp.concatenate([mean[..., 1:, :], jnp.zeros_like(mean[..., :1, :])], axis=-2)


def predicted_rewards(params: Params, model_cfg: ModelConfig, state: rssm.RSSMState,
                      actions: jax.Array, key: jax.Array) -> jax.Array:
    """Reward predicted at each imagined step of each action sequence, from one belief state.

    state: h (|h|,), s (|s|,); actions (J, H, A), row t the action into imagined step t + 1;
    returns float32 (J, H): the reward model's mean at each state of one prior rollout
    (`rssm.imagine`) per sequence, each sequence's prior samples drawn with its own key.
    """
    keys = jax.random.split(key, actions.shape[0])
    rollout = jax.vmap(rssm.imagine, in_axes=(None, None, None, 0, 0))
    states, _ = rollout(params, model_cfg, state, actions, keys)
    return networks.reward(params, model_cfg, rssm.features(states))


def predicted_return(params: Params, model_cfg: ModelConfig, state: rssm.RSSMState,
                     actions: jax.Array, key: jax.Array) -> jax.Array:
    """The planner's objective: `predicted_rewards` summed over the horizon, (J,) for actions
    (J, H, A) from one belief state (section 3 of the paper)."""
    return predicted_rewards(params, model_cfg, state, actions, key).sum(-1)


def _plan_one(params: Params, state: rssm.RSSMState, key: jax.Array, prev_mean: jax.Array | None,
              model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int
              ) -> tuple[jax.Array, jax.Array]:
    init_mean = None
    if planner_cfg.warm_start and prev_mean is not None:
        init_mean = shift_plan(prev_mean)
    result = cem.cem(functools.partial(predicted_return, params, model_cfg, state), key,
                     horizon=planner_cfg.horizon, action_dim=action_dim,
                     iterations=planner_cfg.iterations, candidates=planner_cfg.candidates,
                     top_k=planner_cfg.top_k, low=ACTION_LOW, high=ACTION_HIGH, init_mean=init_mean)
    return result.mean[0], result.mean


def _plan(params: Params, state: rssm.RSSMState, key: jax.Array, prev_mean: jax.Array | None = None,
          *, model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int
          ) -> tuple[jax.Array, jax.Array]:
    """One decision for one environment, or for each of N along a leading batch axis."""
    chex.assert_shape(state.h, (..., model_cfg.h_size))
    chex.assert_shape(state.s, state.h.shape[:-1] + (model_cfg.s_size,))
    chex.assert_rank(state.h, {1, 2})
    batch = state.h.shape[:-1]
    key_batch = key.shape if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key.shape[:-1]
    if key_batch != batch:
        raise ValueError(f"plan needs one key per environment: state batch {batch}, key {key.shape}")
    if prev_mean is not None:
        chex.assert_shape(prev_mean, batch + (planner_cfg.horizon, action_dim))
    one = functools.partial(_plan_one, params, model_cfg=model_cfg, planner_cfg=planner_cfg,
                            action_dim=action_dim)
    if not batch:
        return one(state, key, prev_mean)
    # On a CPU one environment's J candidates already keep the cores busy, and planning the
    # environments one after another keeps each one's activations in cache (about 12% less CPU
    # time than a vmap over all 8 at the paper's sizes); an accelerator wants them all at once.
    chunk = None if jax.default_backend() == "cpu" else batch[0]
    return jax.lax.map(lambda x: one(*x), (state, key, prev_mean), batch_size=chunk)


def make_planner(model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int
                 ) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """plan(params, state, key, prev_mean=None) -> (action, mean), jitted once per input shape.

    One environment: state.h (|h|,), state.s (|s|,), key one PRNG key, prev_mean (H, A) or None;
    returns action (A,) in [-1, 1] and the final CEM mean (H, A).
    N environments: state.h (N, |h|), state.s (N, |s|), key (N,) keys (jax.random.split(k, N)),
    prev_mean (N, H, A) or None; returns (N, A) and (N, H, A), equal to N single calls.
    prev_mean is used only when planner_cfg.warm_start is set (CEM then starts at shift_plan(prev_mean)).
    """
    plan = functools.partial(_plan, model_cfg=model_cfg, planner_cfg=planner_cfg,
                             action_dim=action_dim)
    return jax.jit(plan)
