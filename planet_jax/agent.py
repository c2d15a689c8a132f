"""The acting side of PlaNet, jitted: filter the belief with each new frame, plan, add noise.

Also the open-loop prediction used for the videos (the paper's Figure: context frames through the
posterior, then predictions of the prior under the true actions).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from planet_jax import networks, parallel, planner, rssm
from planet_jax.config import Config, ModelConfig
from planet_jax.rssm import RSSMState


class Belief(NamedTuple):
    """What the agent carries between steps for N environments: the latent state (N, ...), the last
    action (N, |a|) and the last plan's mean (N, H, |a|) for warm starts."""
    state: RSSMState
    action: jax.Array
    plan: jax.Array


def initial_belief(cfg: Config, num_envs: int, action_dim: int) -> Belief:
    return Belief(rssm.initial_state(cfg.model, (num_envs,)), jnp.zeros((num_envs, action_dim)),
                  jnp.zeros((num_envs, cfg.planner.horizon, action_dim)))


def make_policy(cfg: Config, action_dim: int) -> Callable:
    """Returns jitted `policy(params, belief, obs, key, noise) -> (action, belief)`.

    obs: uint8 (N, 64, 64, 3), the frames reached by `belief.action`; noise: std of the Gaussian
    exploration noise (0 when testing). Actions are clipped to [-1, 1]. Compiled with the
    planner's XLA:CPU matmul choice (`planner.jit_with_cpu_dots`), made at the first call.
    """
    plan = planner.make_planner(cfg.model, cfg.planner, action_dim)

    def policy(params, belief: Belief, obs: jax.Array, key: jax.Array, noise: jax.Array):
        n = obs.shape[0]
        k_post, k_plan, k_noise = jax.random.split(key, 3)
        e = networks.embed(params, cfg.model, obs)
        observe = partial(rssm.observe_step, params, cfg.model)
        state, _, _ = jax.vmap(observe)(belief.state, belief.action, e, jax.random.split(k_post, n))
        action, mean = plan(params, state, jax.random.split(k_plan, n), belief.plan)
        action = action + noise * jax.random.normal(k_noise, action.shape)
        action = jnp.clip(action, -1.0, 1.0)
        return action, Belief(state, action, mean)

    return planner.jit_with_cpu_dots(policy, cfg.model, cfg.planner, action_dim)


class Actor:
    """Acts in N environments with a policy from `make_policy`, carrying their belief between
    steps (Algorithm 1's collection loop: update the belief with o_t, plan a_t, add noise).

    Python side of the jitted policy: `actor(obs uint8 (N, 64, 64, 3)) -> actions float32 (N, |a|)`,
    one policy call for all N environments; step t uses key fold_in(key, t). Make a new Actor for
    each round of episodes (the belief starts at the zero state).
    """

    def __init__(self, policy: Callable, cfg: Config, action_dim: int, num_envs: int, params,
                 key: jax.Array, noise: float):
        self._policy, self._params = policy, params
        # jit compiles once per placement of its arguments, and the policy's outputs (the belief,
        # fed back) are placed like the parameters: a fresh zero belief, or a key from a fresh
        # start rather than a checkpoint, would each cost a compile of the whole policy.
        self._key, self._belief = _placed_like(params, (key, initial_belief(cfg, num_envs, action_dim)))
        self._noise = jnp.float32(noise)
        self._t = 0

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        step_key = jax.random.fold_in(self._key, self._t)
        action, self._belief = self._policy(self._params, self._belief, obs, step_key, self._noise)
        self._t += 1
        return np.asarray(action)


def _placed_like(params, tree):
    """tree replicated on the devices of params' committed arrays (one device, or a mesh of this
    process's devices); unchanged for uncommitted params (numpy or fresh arrays), with which jit
    places everything itself, and for params spread over several processes, which the loop
    never acts with (it passes `parallel.local_copy`)."""
    leaf = jax.tree.leaves(params)[0]
    if not (isinstance(leaf, jax.Array) and leaf.committed and leaf.sharding.is_fully_addressable
            and leaf.sharding.is_fully_replicated):
        return tree
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = parallel.replicated(sharding.mesh)
    return jax.device_put(tree, sharding)


@partial(jax.jit, static_argnums=1)
def filter_belief(params, cfg: ModelConfig, obs: jax.Array, action: jax.Array, key: jax.Array
                  ) -> RSSMState:
    """Posterior states after each of T frames, filtered from the zero state (`rssm.observe`).

    obs: uint8 (T, 64, 64, 3); action (T, A), row t the action that led into frame t (row 0 zeros,
    the replay's convention); key for the posterior samples. Returns h (T, |h|) and s (T, |s|);
    the belief after the last frame is index -1.
    """
    states, _, _ = rssm.observe(params, cfg, networks.embed(params, cfg, obs), action, key)
    return states


@partial(jax.jit, static_argnums=(1, 5))
def openloop_video(params, cfg: ModelConfig, obs: jax.Array, action: jax.Array, key: jax.Array,
                   context: int) -> jax.Array:
    """Frames (T, 64, 3 * 64, 3) uint8: truth | model | error, for obs (T, 64, 64, 3) uint8, action (T, A).

    The first `context` frames are posterior reconstructions; the rest are open-loop prior predictions
    from the last context state under the true actions.
    """
    k_obs, k_img = jax.random.split(key)
    states = filter_belief(params, cfg, obs[:context], action[:context], k_obs)
    last = jax.tree.map(lambda v: v[-1], states)
    imagined, _ = rssm.imagine(params, cfg, last, action[context:], k_img)
    feats = jnp.concatenate([rssm.features(states), rssm.features(imagined)])
    model = networks.decode(params, cfg, feats)
    x = networks.preprocess(obs, None, cfg.bit_depth)
    error = (model - x) / 2.0
    return networks.postprocess(jnp.concatenate([x, jnp.clip(model, -0.5, 0.5), error], axis=2))
