import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from planet_jax import config, learner, networks, objective


def _structured_batch(B, T, action_dim, key):
    """Learnable data: each frame is a flat colour that depends on the action, reward = action sum."""
    a = jax.random.uniform(key, (B, T, action_dim), minval=-1, maxval=1)
    colour = (a[..., :1] + 1) / 2 * jnp.array([1.0, 0.5, 0.2])  # (B, T, 3)
    obs = jnp.broadcast_to(colour[:, :, None, None, :] * 255, (B, T, 64, 64, 3)).astype(jnp.uint8)
    return objective.Batch(obs, a, jnp.sum(a, -1))


def test_repeated_steps_on_fixed_batch_halve_the_loss():
    cfg = config.tiny()
    state = learner.init_train_state(cfg, 2, jax.random.PRNGKey(0))
    batch = _structured_batch(4, 8, 2, jax.random.PRNGKey(1))
    step = learner.make_train_step(cfg)
    losses = []
    for i in range(80):
        state, metrics = step(state, batch, jax.random.PRNGKey(100 + i))
        losses.append(float(metrics["loss"]))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.5 * first, (first, last)
    assert int(state.step) == 80


def test_train_step_compiles_once_and_reports_metrics():
    cfg = config.override(config.tiny(), ["loss.overshooting_distance=8"])
    state = learner.init_train_state(cfg, 2, jax.random.PRNGKey(0))
    step = learner.make_train_step(cfg)
    for i in range(3):
        batch = _structured_batch(4, 8, 2, jax.random.PRNGKey(i))
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
    assert step._cache_size() == 1
    assert metrics["kl_d"].shape == (8,)
    for name in ("loss", "image_loss", "reward_loss", "kl_loss", "global_kl", "grad_norm"):
        assert metrics[name].shape == () and np.isfinite(float(metrics[name])), name


def test_update_is_clipped_adam():
    """One step equals clip-by-global-norm then Adam, written out by hand from the gradient."""
    cfg = dataclasses.replace(config.tiny(), optim=config.OptimConfig(lr=1e-2, eps=1e-4, clip_norm=0.5))
    state = learner.init_train_state(cfg, 2, jax.random.PRNGKey(0))
    params0 = jax.tree.map(np.asarray, state.params)
    batch = _structured_batch(4, 8, 2, jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)
    grads = jax.jit(jax.grad(lambda p: objective.loss_fn(p, cfg.model, cfg.loss, batch, key)[0]))(state.params)
    norm = float(optax.tree.norm(grads))
    assert norm > 0.5  # the clip is active
    new_state, metrics = learner.make_train_step(cfg)(state, batch, key)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)
    # Adam's first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> g / (|g| + eps).
    def expected(p, g):
        g = np.asarray(g) * 0.5 / norm
        return p - 1e-2 * g / (np.abs(g) + 1e-4)
    want = jax.tree.map(expected, params0, grads)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), v, rtol=1e-3, atol=1e-6),
                 new_state.params, want)


def test_compiled_ahead_step_equals_jitted_step_and_init_equals_eager_init():
    cfg = config.tiny()
    key = jax.random.PRNGKey(0)
    state = learner.init_train_state(cfg, 2, key)
    for jitted, unjitted in zip(jax.tree.leaves(state.params),
                                jax.tree.leaves(networks.init_params(cfg.model, 2, key))):
        np.testing.assert_allclose(jitted, unjitted, rtol=1e-6, atol=1e-7)
    batch = _structured_batch(4, 8, 2, jax.random.PRNGKey(1))
    step = jax.jit(learner.make_train_step(cfg, jit=False))
    compiled = learner.compile_train_step(learner.make_train_step(cfg), state, batch, key)
    ours = compiled(jax.tree.map(jnp.copy, state), batch, key)
    reference = step(state, batch, key)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_updates_are_skipped_and_a_clean_batch_then_trains_normally():
    """A NaN reward and an inf pixel each leave the state bit for bit as it was, with skipped = 1;
    a clean batch afterwards gives exactly the update a fresh step from that state gives.

    Stored frames are uint8 and cannot hold inf, so the inf pixel comes in a float32 copy of the
    frames: the step casts o to float32 before preprocessing (`networks.preprocess`), so this is
    the value an encoder input and an image-likelihood target would carry if a frame went bad.
    """
    cfg = config.tiny()
    step = learner.make_train_step(cfg)
    snapshot = lambda tree: jax.tree.map(np.array, tree)  # the step donates its input state
    state = learner.init_train_state(cfg, 2, jax.random.PRNGKey(0))
    before = snapshot(state)
    clean = _structured_batch(4, 8, 2, jax.random.PRNGKey(1))
    nan_reward = clean._replace(reward=clean.reward.at[2, 5].set(jnp.nan))
    inf_pixel = clean._replace(obs=clean.obs.astype(jnp.float32).at[1, 3, 10, 20, 0].set(jnp.inf))
    for bad in (nan_reward, inf_pixel):
        state, metrics = step(state, bad, jax.random.PRNGKey(5))
        assert float(metrics["skipped"]) == 1.0
        assert not np.isfinite(float(metrics["loss"]))
        jax.tree.map(np.testing.assert_array_equal, snapshot(state), before)
    assert int(state.step) == 0
    state, metrics = step(state, clean, jax.random.PRNGKey(6))
    fresh, fresh_metrics = step(jax.tree.map(jnp.asarray, before), clean, jax.random.PRNGKey(6))
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, snapshot(state), snapshot(fresh))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(snapshot(state.params)),
                                                         jax.tree.leaves(before.params)))


def test_release_free_memory_trims_on_glibc():
    import platform
    from planet_jax import runtime
    assert runtime.release_free_memory() == (platform.libc_ver()[0] == "glibc")
