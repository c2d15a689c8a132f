import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planet_jax import config, networks, objective, rssm
from planet_jax.rssm import Gaussian, RSSMState
from tests.conftest import random_sequence

FREE_NATS = 0.5  # low enough that some KL terms are above it, so the clamp and the KL both matter


def closed_form_kl(q_mean, q_std, p_mean, p_std):
    """KL[q || p] of diagonal Gaussians in float64 numpy, summed over the last axis:
    sum_i log(p_i / q_i) + (q_i^2 + (mu_q,i - mu_p,i)^2) / (2 p_i^2) - 1/2."""
    q_mean, q_std, p_mean, p_std = (np.asarray(x, np.float64) for x in (q_mean, q_std, p_mean, p_std))
    per_dim = (np.log(p_std / q_std) + (q_std ** 2 + (q_mean - p_mean) ** 2) / (2 * p_std ** 2)
               - 0.5)
    return per_dim.sum(-1)


def _loss_cfg(D):
    return config.LossConfig(overshooting_distance=D, free_nats=FREE_NATS)


def _observed(cfg, params, T, seed=0):
    e, a = random_sequence(cfg, T, jax.random.PRNGKey(seed))
    states, priors, posts = rssm.observe(params, cfg, e, a, jax.random.PRNGKey(seed + 1))
    return a, states, priors, posts


def naive_overshooting(params, cfg, D, states, priors, posts, a, key):
    """Independent double loop over (target t, distance d), replaying the same noise.

    The prediction of frame t at distance d starts from the state before frame k = t - d + 1 (the
    zero state for k = 0, else the posterior sample at k - 1): the first step's h is the posterior
    h_k and its s is drawn from the one-step prior at k; then d - 1 prior steps under a[k+1..t].
    """
    T = a.shape[0]
    k0, k_rest = jax.random.split(key)
    first_noise = jax.random.normal(k0, (T, cfg.s_size))
    step_keys = jax.random.split(k_rest, D - 1) if D > 1 else []
    per_d = []
    for d in range(1, D + 1):
        total, count = 0.0, 0
        for t in range(d - 1, T):
            k = t - d + 1
            if d == 1:
                p = Gaussian(priors.mean[k], priors.std[k])
            else:
                state = RSSMState(states.h[k], priors.mean[k] + priors.std[k] * first_noise[k])
                for j in range(2, d + 1):
                    key_j = jax.random.split(step_keys[j - 2], T)[k]
                    state, p = rssm.transition_step(params, cfg, state, a[k + j - 1], key_j)
            kl = float(closed_form_kl(posts.mean[t], posts.std[t], p.mean, p.std))
            total += max(kl, FREE_NATS)
            count += 1
        per_d.append(total / count)
    return np.array(per_d)


@pytest.mark.parametrize("D", [1, 3, 7])
def test_overshooting_equals_naive_double_loop(model_cfg, params, D):
    T = 7
    a, states, priors, posts = _observed(model_cfg, params, T)
    key = jax.random.PRNGKey(11)
    got = objective.overshooting_kls(params, model_cfg, _loss_cfg(D), states, priors, posts, a, key)
    want = naive_overshooting(params, model_cfg, D, states, priors, posts, a, key)
    assert got.shape == (D,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
    assert np.all(want > FREE_NATS)  # the clamp did not hide the comparison


def test_d1_is_standard_kl(model_cfg, params):
    a, states, priors, posts = _observed(model_cfg, params, 9, seed=5)
    got = objective.overshooting_kls(params, model_cfg, _loss_cfg(1), states, priors, posts, a,
                                     jax.random.PRNGKey(0))
    kl = closed_form_kl(posts.mean, posts.std, priors.mean, priors.std)
    want = np.mean(np.maximum(kl, FREE_NATS))
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)
    # The first distance of a longer overshooting is the same standard KL.
    got3 = objective.overshooting_kls(params, model_cfg, _loss_cfg(3), states, priors, posts, a,
                                      jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(got3[0]), want, rtol=1e-5)


def test_kl_divergence_equals_the_closed_form():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    q = Gaussian(jax.random.normal(k1, (5, 4)), jax.nn.softplus(jax.random.normal(k2, (5, 4))) + 0.1)
    p = Gaussian(jax.random.normal(k3, (5, 4)), jax.nn.softplus(jax.random.normal(k4, (5, 4))) + 0.1)
    got = objective.kl_divergence(q, p)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, closed_form_kl(*q, *p), rtol=1e-5)
    np.testing.assert_allclose(objective.kl_divergence(q, q), np.zeros(5), atol=1e-6)
    # Its gradients too (d/d mu_q = (mu_q - mu_p) / p^2, d/d sigma_q = sigma_q / p^2 - 1 / sigma_q).
    g = jax.grad(lambda q: jnp.sum(objective.kl_divergence(q, p)))(q)
    np.testing.assert_allclose(g.mean, (q.mean - p.mean) / p.std ** 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g.std, q.std / p.std ** 2 - 1 / q.std, rtol=1e-4, atol=1e-5)


def test_no_gradient_into_posterior_target_beyond_distance_one(model_cfg, params):
    T, D = 6, 4
    a, states, priors, posts = _observed(model_cfg, params, T, seed=3)
    loss_cfg = config.LossConfig(overshooting_distance=D, free_nats=0.0)

    def term(posts, states, which):
        kl = objective.overshooting_kls(params, model_cfg, loss_cfg, states, priors, posts, a,
                                        jax.random.PRNGKey(0))
        return kl[0] if which == "d1" else jnp.sum(kl[1:])

    g_post, g_states = jax.jit(jax.grad(term, argnums=(0, 1)), static_argnums=2)(posts, states, "far")
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_post))
    # ... while the rollouts' start states (posterior samples) still receive gradient,
    assert np.any(np.asarray(g_states.h) != 0)
    # and the one-step KL trains the posterior as usual.
    g_post1 = jax.jit(jax.grad(term), static_argnums=2)(posts, states, "d1")
    assert np.any(np.asarray(g_post1.mean) != 0)


def test_loss_terms_and_weights(model_cfg, params):
    B, T, D = 2, 5, 3
    key = jax.random.PRNGKey(0)
    batch = objective.Batch(jax.random.randint(key, (B, T, 64, 64, 3), 0, 256).astype(jnp.uint8),
                            jnp.zeros((B, T, 2)), jnp.ones((B, T)))
    loss_cfg = config.LossConfig(overshooting_distance=D, overshooting_beta=0.5, reward_scale=10.0,
                                 global_kl_beta=0.1)
    loss, m = objective.loss_fn(params, model_cfg, loss_cfg, batch, key)
    assert m["kl_d"].shape == (D,)
    kl_loss = (m["kl_d"][0] + 0.5 * m["kl_d"][1] + 0.5 * m["kl_d"][2]) / D
    np.testing.assert_allclose(m["kl_loss"], kl_loss, rtol=1e-6)
    want = m["image_loss"] + 10.0 * m["reward_loss"] + kl_loss + 0.1 * m["global_kl"]
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    # Reward loss is 0.5 * (r_hat - r)^2: check against the reward head directly.
    assert float(m["reward_loss"]) > 0


def test_image_loss_is_the_decoder_nll_of_each_sequence(model_cfg, params):
    """image_loss against a per-sequence loop: observe, decode, 0.5 * squared error per image."""
    B, T = 3, 4
    key = jax.random.PRNGKey(3)
    batch = objective.Batch(jax.random.randint(key, (B, T, 64, 64, 3), 0, 256).astype(jnp.uint8),
                            jax.random.normal(key, (B, T, 2)), jnp.zeros((B, T)))
    _, m = objective.loss_fn(params, model_cfg, config.LossConfig(), batch, key)
    k_pre, k_seq = jax.random.split(key)
    obs = networks.preprocess(batch.obs, k_pre, model_cfg.bit_depth)
    nll = []
    for b, k_b in enumerate(jax.random.split(k_seq, B)):
        embeds = networks.encode(params, model_cfg, obs[b])
        states, _, _ = rssm.observe(params, model_cfg, embeds, batch.action[b], jax.random.split(k_b)[0])
        image = networks.decode(params, model_cfg, rssm.features(states))
        nll.extend(0.5 * np.sum(np.square(np.asarray(image, np.float64) - np.asarray(obs[b])), (1, 2, 3)))
    np.testing.assert_allclose(m["image_loss"], np.mean(nll), rtol=1e-5)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_image_loss_gradients_equal_autodiff_of_the_plain_loss(model_cfg, params, group):
    """objective.image_loss (each group's gradients taken in its forward pass) against jax.grad of
    the mean decoder nll over the whole batch; 3 leaves a remainder, 4 is one group. The frames are
    data: their gradient is zero."""
    B, T = 4, 3
    cfg = dataclasses.replace(model_cfg, image_group=group)
    head = jax.random.normal(jax.random.PRNGKey(5), (B, T, 5, 5, 4 * cfg.cnn_depth))
    obs = jax.random.uniform(jax.random.PRNGKey(6), (B, T, 64, 64, 3), minval=-0.5, maxval=0.5)

    def plain(p, h, o):  # scaled, so that the backward pass sees a cotangent other than 1
        return 2.5 * jnp.mean(0.5 * jnp.sum(jnp.square(networks.decode_body(p, cfg, h) - o), (-3, -2, -1)))

    want_loss, want = jax.value_and_grad(plain, (0, 1))(params, head, obs)
    got_loss, got = jax.jit(jax.value_and_grad(lambda p, h, o: 2.5 * objective.image_loss(p, cfg, h, o), (0, 1, 2)))(
        params, head, obs)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(2.5 * objective.image_loss(params, cfg, head, obs), want_loss, rtol=1e-5)
    assert jax.tree.structure(got[0]) == jax.tree.structure(want[0])
    for g, g_ref in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(g_ref))))
    assert float(jnp.max(jnp.abs(got[1]))) > 0 and not np.any(np.asarray(got[2]))


@pytest.mark.parametrize("group", [1, 3, 0])
def test_image_groups_give_the_same_loss_and_gradients(model_cfg, params, group):
    """Against the whole batch in one call; 3 leaves a remainder of one sequence, 0 is the default
    (on a CPU, groups of objective.CPU_IMAGE_GROUP)."""
    B, T = 4, 3
    key = jax.random.PRNGKey(4)
    batch = objective.Batch(jax.random.randint(key, (B, T, 64, 64, 3), 0, 256).astype(jnp.uint8),
                            jax.random.normal(key, (B, T, 2)), jax.random.normal(key, (B, T)))
    model_cfg = dataclasses.replace(model_cfg, image_group=B)
    grouped_cfg = dataclasses.replace(model_cfg, image_group=group)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, c: objective.loss_fn(p, c, config.LossConfig(), batch, key)[0]),
                            static_argnums=1)
    (loss, grads), (loss_g, grads_g) = loss_and_grad(params, model_cfg), loss_and_grad(params, grouped_cfg)
    np.testing.assert_allclose(loss_g, loss, rtol=1e-5)
    for g, g_ref in zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(g_ref))))
