"""Does the world model rank action sequences as the simulator does? Reward predictions against truth.

The planner can only prefer what the model rates higher. When planning with the simulator in the
model's place works but the agent does not, the question is where the model is wrong, and this
module measures it: from a belief filtered over the first frames of a real episode, the model
imagines H agent steps under each probe sequence (`rssm.imagine`, averaged over prior samples) and
predicts their rewards; the simulator replays the same episode start under the same sequence for
the true rewards.

Plain Python around two jitted functions (`agent.filter_belief`, `expected_rewards`); the
simulator side builds a fresh environment per sequence, so every sequence starts from the same
physical state.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from planet_jax import agent, envs, planner, rssm
from planet_jax.config import ModelConfig


class CheckResult(NamedTuple):
    """Per probe sequence (N of them): names, true and predicted rewards (N, H) per agent step."""
    names: list[str]
    true: np.ndarray
    predicted: np.ndarray


def probe_sequences(horizon: int, action_dim: int, random_count: int, rng: np.random.Generator
                    ) -> dict[str, np.ndarray]:
    """Named (H, A) sequences: no force, full force either way, alternating full force, and
    `random_count` uniform random ones."""
    alternating = np.where(np.arange(horizon) % 2 == 0, 1.0, -1.0)[:, None]
    sequences = {
        "zero": np.zeros((horizon, action_dim)),
        "+1": np.ones((horizon, action_dim)),
        "-1": -np.ones((horizon, action_dim)),
        "alternating": np.broadcast_to(alternating, (horizon, action_dim)),
    }
    for i in range(random_count):
        sequences[f"random{i}"] = rng.uniform(-1.0, 1.0, (horizon, action_dim))
    return {name: np.asarray(a, np.float32) for name, a in sequences.items()}


@partial(jax.jit, static_argnums=(1, 5))
def expected_rewards(params, cfg: ModelConfig, state: rssm.RSSMState, actions: jax.Array,
                     key: jax.Array, samples: int) -> jax.Array:
    """Predicted reward of each imagined step, (N, H) for actions (N, H, A) from one belief state,
    averaged over `samples` prior rollouts per sequence (`planner.predicted_rewards`, which the
    planner scores with a single rollout); rollout i uses key jax.random.split(key, samples)[i]."""
    rollouts = jax.vmap(planner.predicted_rewards, in_axes=(None, None, None, None, 0))(
        params, cfg, state, actions, jax.random.split(key, samples))
    return rollouts.mean(0)


def true_rewards(env_name: str, seed: int, action_repeat: int, episode_steps: int,
                 prefix: np.ndarray, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Simulator rewards (N, H) of sequences (N, H, A), each played after the actions prefix (K, A)
    from the start of the episode that `envs.make_env(env_name, ...).reset(seed)` starts; and the K + 1
    frames of the prefix (reset frame first)."""
    rewards, frames = [], None
    for sequence in sequences:
        env = envs.make_env(env_name, action_repeat, episode_steps)
        try:
            seen = [env.reset(seed)]
            for a in prefix:
                seen.append(env.step(a).obs)
            frames = np.stack(seen) if frames is None else frames
            rewards.append([env.step(a).reward for a in sequence])
        finally:
            env.close()
    return np.asarray(rewards, np.float64), frames


def check(params, cfg: ModelConfig, env_name: str, seed: int, action_repeat: int,
          episode_steps: int, prefix: np.ndarray, sequences: dict[str, np.ndarray], key: jax.Array,
          samples: int = 8) -> CheckResult:
    """True and predicted rewards of each named sequence after `prefix` (K, A) in episode `seed`."""
    names = list(sequences)
    stacked = np.stack([sequences[n] for n in names])
    true, frames = true_rewards(env_name, seed, action_repeat, episode_steps, prefix, stacked)
    action = np.concatenate([np.zeros((1,) + prefix.shape[1:], np.float32), prefix]).astype(np.float32)
    k_filter, k_imagine = jax.random.split(key)
    states = agent.filter_belief(params, cfg, jnp.asarray(frames), jnp.asarray(action), k_filter)
    state = jax.tree.map(lambda x: x[-1], states)
    predicted = expected_rewards(params, cfg, state, jnp.asarray(stacked), k_imagine, samples)
    return CheckResult(names, true, np.asarray(predicted, np.float64))


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-D arrays (ties broken by order), in [-1, 1]."""
    rx, ry = (np.argsort(np.argsort(v)).astype(np.float64) for v in (x, y))
    rx -= rx.mean()
    ry -= ry.mean()
    return float(rx @ ry / np.sqrt((rx @ rx) * (ry @ ry)))
