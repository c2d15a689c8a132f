"""The jitted side's shared pieces: `networks.embed`, `networks.modules`, `agent.filter_belief` and
the open-loop video built on it, each against a plain step-by-step computation."""
import jax
import jax.numpy as jnp
import numpy as np

from planet_jax import agent, networks, rssm
from tests.conftest import ACTION_DIM, assert_trees_close, imagine_by_hand

T = 4


def _frames(key, n=T):
    return jax.random.randint(key, (n, 64, 64, 3), 0, 256).astype(jnp.uint8)


def _half_bin(o, bits):
    """The paper's 5-bit preprocessing with the noise at its mean, in numpy."""
    step = 2 ** (8 - bits)
    return (np.floor(np.asarray(o, np.float64) / step) + 0.5) / 2 ** bits - 0.5


def test_embed_is_the_encoder_on_the_preprocessed_frames(model_cfg, params):
    o = _frames(jax.random.PRNGKey(1), 3)
    x = _half_bin(o, model_cfg.bit_depth).astype(np.float32)
    want = networks.encode(params, model_cfg, jnp.asarray(x))
    np.testing.assert_allclose(networks.embed(params, model_cfg, o), want, rtol=1e-5, atol=1e-5)
    key = jax.random.PRNGKey(2)
    noisy = networks.embed(params, model_cfg, o, key)
    np.testing.assert_allclose(
        noisy, networks.encode(params, model_cfg, networks.preprocess(o, key, model_cfg.bit_depth)),
        rtol=1e-6, atol=1e-6)
    assert not np.allclose(noisy, want)  # the key's noise reaches the encoder


def test_modules_are_built_once_per_configuration(model_cfg):
    assert networks.modules(model_cfg) is networks.modules(model_cfg)
    assert list(networks.modules(model_cfg)) == ["encoder", "decoder", "reward", "transition",
                                                 "posterior"]


def _filtered_by_hand(params, cfg, obs, action, key):
    """Frame by frame from the zero state: half-bin preprocessing, encoder, one observe step."""
    state = rssm.initial_state(cfg)
    out = []
    for t, k in enumerate(jax.random.split(key, obs.shape[0])):
        x_t = jnp.asarray(_half_bin(obs[t], cfg.bit_depth), jnp.float32)
        e_t = networks.encode(params, cfg, x_t)
        state, _, _ = rssm.observe_step(params, cfg, state, action[t], e_t, k)
        out.append(state)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


def test_filter_belief_equals_a_loop_over_frames(model_cfg, params):
    obs = _frames(jax.random.PRNGKey(3))
    action = jax.random.uniform(jax.random.PRNGKey(4), (T, ACTION_DIM), minval=-1).at[0].set(0)
    key = jax.random.PRNGKey(5)
    states = agent.filter_belief(params, model_cfg, obs, action, key)
    assert states.h.shape == (T, model_cfg.h_size) and states.s.shape == (T, model_cfg.s_size)
    assert_trees_close(states, _filtered_by_hand(params, model_cfg, obs, action, key), 1e-4, 1e-4)


def test_openloop_video_reconstructs_the_context_and_predicts_the_rest(model_cfg, params):
    context = 2
    obs = _frames(jax.random.PRNGKey(6))
    action = jax.random.uniform(jax.random.PRNGKey(7), (T, ACTION_DIM), minval=-1)
    key = jax.random.PRNGKey(8)
    video = np.asarray(agent.openloop_video(params, model_cfg, obs, action, key, context))
    assert video.shape == (T, 64, 3 * 64, 3) and video.dtype == np.uint8

    k_obs, k_img = jax.random.split(key)
    states = _filtered_by_hand(params, model_cfg, obs[:context], action[:context], k_obs)
    state = jax.tree.map(lambda v: v[-1], states)
    feats = [rssm.features(jax.tree.map(lambda v: v[t], states)) for t in range(context)]
    for imagined, _ in imagine_by_hand(params, model_cfg, state, action[context:], k_img):
        feats.append(rssm.features(imagined))
    model = np.clip(np.asarray(networks.decode(params, model_cfg, jnp.stack(feats))), -0.5, 0.5)
    want_model = np.clip(np.floor((model + 0.5) * 256), 0, 255)
    truth = np.clip(np.floor((_half_bin(obs, model_cfg.bit_depth) + 0.5) * 256), 0, 255)
    np.testing.assert_array_equal(video[:, :, :64], truth)
    # Rounding to uint8 may flip a value sitting on a bin edge by one.
    assert np.max(np.abs(video[:, :, 64:128].astype(int) - want_model)) <= 1
    assert np.mean(video[:, :, 64:128] == want_model) > 0.99
