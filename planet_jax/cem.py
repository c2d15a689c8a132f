"""The cross-entropy method over open-loop action sequences, for any objective.

PlaNet's planner (Hafner et al. 2019, section 3 and Algorithm 2 of the appendix) is this loop with
the world model's summed predicted reward as the objective; `planet_jax.planner` builds it. The CEM
itself knows nothing about the model, so it can plan against any JAX function that scores action
sequences:

    q(a_{1:H}) = N(mean, diag(std^2)), starting from N(init_mean, init_std^2)
    repeat I times: draw J sequences from q, clip them to [low, high], score them,
                    refit mean and std (population std, ddof 0) to the K best.

Iterations are a `fori_loop` and the objective sees all J candidates at once, so compile time does
not grow with I or H. `cem` is a pure function: call it inside `jax.jit`, and `vmap` it over start
states with one key each.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from planet_jax import prng

Objective = Callable[[jax.Array, jax.Array], jax.Array]
"""objective(actions (J, H, A), key) -> scores (J,), higher is better."""


class CEMResult(NamedTuple):
    """The final action-sequence distribution: mean (H, A) and std (H, A)."""
    mean: jax.Array
    std: jax.Array


def cem(objective: Objective, key: jax.Array, *, horizon: int, action_dim: int, iterations: int,
        candidates: int, top_k: int, low: float | jax.Array = -1.0, high: float | jax.Array = 1.0,
        init_mean: jax.Array | None = None, init_std: float | jax.Array = 1.0) -> CEMResult:
    """Maximise `objective` over action sequences by the cross-entropy method.

    Args:
      objective: scores a batch of sequences, (J, H, A) actions and a key -> (J,); maximised.
      key: PRNG key for the samples (and, split off, for the objective).
      horizon, action_dim: H and A, the shape of one sequence.
      iterations, candidates, top_k: I refits, J samples per refit, K elites per refit.
      low, high: action bounds, scalars or (A,); every sample is clipped to them.
      init_mean: (H, A) initial mean, zeros (the paper's N(0, I)) by default.
      init_std: initial std, a scalar or (H, A).
    Returns:
      CEMResult(mean, std), each (H, A), after the last refit; act with mean[0].
    """
    if not 0 < top_k <= candidates:
        raise ValueError(f"top_k ({top_k}) must be in 1..candidates ({candidates})")
    shape = (horizon, action_dim)
    dtype = jnp.result_type(float)
    mean = jnp.zeros(shape, dtype) if init_mean is None else jnp.asarray(init_mean, dtype)
    chex.assert_shape(mean, shape)
    std = jnp.broadcast_to(jnp.asarray(init_std, dtype), shape)

    def refit(i, dist):
        mean, std = dist
        k_sample, k_objective = jax.random.split(jax.random.fold_in(key, i))
        eps = prng.normal(k_sample, (candidates,) + shape, dtype)
        actions = jnp.clip(mean + std * eps, low, high)
        scores = objective(actions, k_objective)
        chex.assert_shape(scores, (candidates,))
        _, elite = jax.lax.top_k(scores, top_k)
        elites = actions[elite]
        return elites.mean(0), elites.std(0)

    mean, std = jax.lax.fori_loop(0, iterations, refit, (mean, std))
    return CEMResult(mean, std)
