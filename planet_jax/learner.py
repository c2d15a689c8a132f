"""The jitted training step: one Adam update of the world model on a batch of sequences.

Given a device mesh (`planet_jax.parallel.make_mesh()`), the same step runs data-parallel: the batch
is split along B over the mesh's 'data' axis, the state and key are replicated, and XLA adds the
all-reduce of the gradients (the loss is a mean over B, so the result equals the one-device step).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jax.sharding import Mesh

from planet_jax import networks, objective, parallel, runtime
from planet_jax.config import Config, OptimConfig
from planet_jax.replay import Batch


class TrainState(NamedTuple):
    params: networks.Params
    opt_state: optax.OptState
    step: jax.Array


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping then Adam (paper: lr 1e-3, eps 1e-4, clip 1000)."""
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.lr, eps=cfg.eps))


# Jitted: one compiled program instead of one per layer initialiser run op by op, each of which
# leaves compiled code and buffers resident.
@functools.partial(jax.jit, static_argnums=(0, 1))
def init_train_state(cfg: Config, action_dim: int, key: jax.Array) -> TrainState:
    params = networks.init_params(cfg.model, action_dim, key)
    opt_state = make_optimizer(cfg.optim).init(params)
    return TrainState(params, opt_state, jnp.zeros((), jnp.int32))


def compile_train_step(step: Callable, state: TrainState, batch: Batch, key: jax.Array) -> Callable:
    """`step` (from `make_train_step`) compiled ahead of time for arguments shaped like these, then
    `runtime.release_free_memory()` before its first call allocates the step's working memory. The result
    is called like `step`, with arguments of the same shapes, dtypes and shardings."""
    compiled = step.lower(state, batch, key).compile()
    runtime.release_free_memory()
    return compiled


def make_train_step(cfg: Config, mesh: Mesh | None = None, jit: bool = True
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, Any]]]:
    """Returns `train_step(state, batch, key) -> (state, metrics)`, jitted with `state` donated.

    With `mesh`, the jitted step expects (and returns) `state` replicated over the mesh, `batch`
    split along B (`parallel.shard_batch`) and a replicated key (`parallel.replicate`); B must be a
    multiple of the number of devices. Metrics: loss, image_loss, reward_loss, kl_loss, global_kl,
    kl_d (D,), grad_norm, skipped, all float32 and replicated.

    An update whose loss or gradient global norm is not finite (a NaN reward, an inf pixel, a
    diverged model) is skipped inside the step: params, optimiser state and `step` (the count of
    applied updates) come back unchanged and `skipped` is 1.0 (else 0.0). Nothing leaves the device
    for this decision; the caller counts skipped updates from the metrics it fetches anyway.
    """
    optimizer = make_optimizer(cfg.optim)

    def train_step(state: TrainState, batch: Batch, key: jax.Array):
        grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, cfg.model, cfg.loss, batch, key)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # One NaN in the batch makes every parameter NaN after this update, and no later batch can
        # undo it; so keep the old state. A select, not lax.cond: both branches are cheap and a
        # select keeps the step one straight-line program. optax.apply_if_finite is not used: it
        # looks at the gradients only, adds its own counters to the optimiser state (so saved
        # checkpoints would no longer restore), and applies the update anyway after a set number
        # of non-finite ones.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)
        new_state = TrainState(jax.tree.map(keep, params, state.params),
                               jax.tree.map(keep, opt_state, state.opt_state),
                               state.step + finite.astype(state.step.dtype))
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        return new_state, metrics

    if not jit:
        return train_step
    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    state_sharding, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_sharding, batch_sharding, state_sharding),
                   out_shardings=(state_sharding, state_sharding))
