import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planet_jax import networks, rssm
from tests.conftest import ACTION_DIM, assert_trees_close, imagine_by_hand, random_sequence, tiny_model


@pytest.mark.parametrize("kind", ["rssm", "ssm", "rnn"])
def test_observe_scan_equals_python_loop(kind):
    cfg = tiny_model(kind=kind)
    params = networks.init_params(cfg, ACTION_DIM, jax.random.PRNGKey(1))
    T = 6
    e, a = random_sequence(cfg, T, jax.random.PRNGKey(2))
    key = jax.random.PRNGKey(3)
    states, priors, posts = rssm.observe(params, cfg, e, a, key)

    state = rssm.RSSMState(np.zeros(cfg.h_size), np.zeros(cfg.s_size))
    for t, k in enumerate(jax.random.split(key, T)):
        h_t, p = rssm.prior(params, cfg, state, a[t])
        state, q = rssm.posterior_step(params, cfg, h_t, e[t], k)
        assert_trees_close(jax.tree.map(lambda x: x[t], (states, priors, posts)), (state, p, q))
    assert states.h.shape == (T, cfg.h_size) and states.s.shape == (T, cfg.s_size)
    assert priors.mean.shape == posts.std.shape == (T, cfg.s_size)


@pytest.mark.parametrize("kind,unroll", [("rssm", 1), ("ssm", 1), ("rnn", 1), ("rssm", 2), ("rssm", 5)])
def test_imagine_scan_equals_python_loop(kind, unroll):
    cfg = tiny_model(kind=kind)
    params = networks.init_params(cfg, ACTION_DIM, jax.random.PRNGKey(1))
    H = 5
    _, a = random_sequence(cfg, H, jax.random.PRNGKey(4))
    start = rssm.RSSMState(jax.random.normal(jax.random.PRNGKey(5), (cfg.h_size,)),
                           jax.random.normal(jax.random.PRNGKey(6), (cfg.s_size,)))
    key = jax.random.PRNGKey(7)
    states, priors = rssm.imagine(params, cfg, start, a, key, unroll=unroll)
    readout = lambda state, p: {"feat": rssm.features(state), "std": p.std}
    read = rssm.imagine(params, cfg, start, a, key, unroll=unroll, readout=readout)
    for t, step in enumerate(imagine_by_hand(params, cfg, start, a, key)):
        assert_trees_close(jax.tree.map(lambda x: x[t], (states, priors)), step)
        assert_trees_close(jax.tree.map(lambda x: x[t], read), readout(*step))


@pytest.mark.parametrize("kind", ["rssm", "rnn"])
def test_sample_is_distraxs_draw_and_the_mean_for_rnn(kind):
    """rssm.sample draws what distrax's MultivariateNormalDiag draws for the same key; the
    deterministic variant's sample is its mean; noise of another shape is refused."""
    cfg = tiny_model(kind=kind)
    p = rssm.Gaussian(jax.random.normal(jax.random.PRNGKey(1), (3, cfg.s_size)),
                      jnp.exp(jax.random.normal(jax.random.PRNGKey(2), (3, cfg.s_size))))
    key = jax.random.PRNGKey(3)
    want = p.mean if kind == "rnn" else p.distribution().sample(seed=key)
    np.testing.assert_allclose(rssm.sample(cfg, p, key), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(AssertionError):
        rssm.reparameterised(cfg, p, jnp.zeros(cfg.s_size))


def test_variants_differ_in_recurrence_and_noise():
    key = jax.random.PRNGKey(0)
    for kind in ("rssm", "ssm", "rnn"):
        cfg = tiny_model(kind=kind)
        params = networks.init_params(cfg, ACTION_DIM, key)
        a = jnp.zeros(ACTION_DIM)
        s = jnp.zeros(cfg.s_size)
        h1, _ = rssm.prior(params, cfg, rssm.RSSMState(jnp.zeros(cfg.h_size), s), a)
        h2, p = rssm.prior(params, cfg, rssm.RSSMState(jnp.ones(cfg.h_size), s), a)
        # Only the SSM ignores h_{t-1}: it has no deterministic recurrence.
        assert np.allclose(h1, h2) == (kind == "ssm")
        sample = rssm.sample(cfg, p, jax.random.PRNGKey(1))
        assert np.allclose(sample, p.mean) == (kind == "rnn")
        if kind != "rnn":
            assert np.all(np.asarray(p.std) > cfg.min_std)


def test_network_shapes(model_cfg, params):
    o = jnp.zeros((2, 3, 64, 64, 3))
    assert networks.encode(params, model_cfg, o).shape == (2, 3, model_cfg.embed_size)
    feat = jnp.zeros((2, 3, model_cfg.feature_size))
    assert networks.decode(params, model_cfg, feat).shape == (2, 3, 64, 64, 3)
    assert networks.reward(params, model_cfg, feat).shape == (2, 3)
    with pytest.raises(AssertionError):
        networks.encode(params, model_cfg, jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(AssertionError):
        rssm.observe(params, model_cfg, jnp.zeros((4, model_cfg.embed_size)), jnp.zeros((4,)),
                     jax.random.PRNGKey(0))


def test_paper_sizes():
    from planet_jax import config
    cfg = config.paper().model
    # Shapes only: initialising the paper's networks for real is a minute of compiling on a CPU.
    params = jax.eval_shape(lambda key: networks.init_params(cfg, 6, key), jax.random.PRNGKey(0))
    assert cfg.embed_size == 1024
    assert params["decoder"]["dense"]["kernel"].shape == (230, 1024)
    kernels = [params["decoder"][f"deconv{i}"]["kernel"].shape for i in range(4)]
    assert kernels == [(5, 5, 1024, 128), (5, 5, 128, 64), (6, 6, 64, 32), (6, 6, 32, 3)]
    assert [params["encoder"][f"conv{i}"]["kernel"].shape[-1] for i in range(4)] == [32, 64, 128, 256]
    assert params["transition"]["gru"]["hn"]["kernel"].shape == (200, 200)


def test_preprocess_five_bits():
    o = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    x = np.asarray(networks.preprocess(jnp.asarray(o), jax.random.PRNGKey(0), 5))
    expected_bin = np.array([v // 8 for v in range(256)], np.float32).reshape(1, 16, 16, 1) / 32 - 0.5
    expected_bin = expected_bin.repeat(3, -1)
    noise = x - expected_bin
    assert noise.min() >= 0 and noise.max() < 1 / 32 + 1e-6
    assert 0.3 / 32 < noise.mean() < 0.7 / 32  # uniform noise over one bin, not a constant
    x_mean = np.asarray(networks.preprocess(jnp.asarray(o), None, 5))
    np.testing.assert_allclose(x_mean, expected_bin + 1 / 64, atol=1e-6)
    assert np.array_equal(np.asarray(networks.postprocess(jnp.asarray(x_mean))) // 8, o // 8)


def test_dequantisation_noise_is_uniform_over_the_bin():
    noise = np.asarray(networks.dequantisation_noise(jax.random.PRNGKey(3), (8, 64, 64, 3), 32.0))
    assert noise.dtype == np.float32 and noise.min() > 0 and noise.max() < 1 / 32
    # Each value is the midpoint of one of 2^16 cells of the bin: (u + 1/2) / 2^21 for an integer u.
    u = noise.astype(np.float64) * 2 ** 21 - 0.5
    np.testing.assert_array_equal(u, np.round(u))
    # Against U(0, 1/32): 16 equal cells of the bin each hold 1/16 of 98,304 values (a cell's
    # standard deviation is 0.24% of all values), and the mean and variance are those of the uniform.
    counts = np.histogram(noise, bins=16, range=(0, 1 / 32))[0] / noise.size
    np.testing.assert_allclose(counts, 1 / 16, atol=0.01)
    np.testing.assert_allclose(noise.mean(), 1 / 64, rtol=0.01)
    np.testing.assert_allclose(noise.var(), (1 / 32) ** 2 / 12, rtol=0.02)
    # 16-bit resolution: 98,304 draws of 2^16 equally likely values leave 65536 (1 - e^-1.5), about
    # 50,900, distinct ones. Both halves of each random word are used, and differ.
    assert 49_000 < np.unique(noise).size < 53_000
    assert not np.allclose(noise[:, :, :32], noise[:, :, 32:])
    # The value of one image depends on the key only: an odd width and other leading shapes work.
    odd = np.asarray(networks.dequantisation_noise(jax.random.PRNGKey(3), (2, 5, 7, 3), 32.0))
    assert odd.shape == (2, 5, 7, 3) and odd.min() > 0 and odd.max() < 1 / 32
    # The words are those of a draw shaped (..., ceil(W / 2), C) (the function draws them with the
    # axes merged), split into halves by a plain loop, in both of jax's threefry modes.
    bits, low = networks.NOISE_BITS, 2 ** networks.NOISE_BITS - 1
    for partitionable, shape in itertools.product([True, False], [(2, 5, 7, 3), (3, 2, 4, 6, 2), (5, 3)]):
        with jax.threefry_partitionable(partitionable):
            words = np.asarray(jax.random.bits(jax.random.PRNGKey(4), shape[:-2] + ((shape[-2] + 1) // 2, shape[-1]),
                                               jnp.uint32))
            got = np.asarray(networks.dequantisation_noise(jax.random.PRNGKey(4), shape, 32.0))
        expected = np.empty(shape, np.float64)
        for index in np.ndindex(*shape):
            *lead, x, c = index
            half = words.shape[-2]
            word = int(words[(*lead, x % half, c)])
            u = word >> bits if x < half else word & low
            expected[index] = (u + 0.5) / (2 ** bits * 32)
        np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_gaussian_sample_and_log_likelihood_equal_the_closed_forms():
    """The distrax form of the diagonal Gaussian: the sample is mean + std * N(0, I) noise from the
    same key (the reparameterisation the model used before distrax), and the log-likelihood is
    -sum_i [(x_i - mu_i)^2 / (2 sigma_i^2) + log sigma_i + log(2 pi) / 2]."""
    cfg = tiny_model()
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    mean = jax.random.normal(k1, (3, 5, cfg.s_size))
    std = jax.nn.softplus(jax.random.normal(k2, (3, 5, cfg.s_size))) + cfg.min_std
    dist = rssm.Gaussian(mean, std)
    s = rssm.sample(cfg, dist, k3)
    np.testing.assert_allclose(s, mean + std * jax.random.normal(k3, mean.shape), rtol=1e-6, atol=1e-6)
    # Reparameterised: ds/dmean = 1 and ds/dstd = the noise.
    noise = (np.asarray(s) - np.asarray(mean)) / np.asarray(std)
    g_mean, g_std = jax.grad(lambda m, sd: jnp.sum(rssm.sample(cfg, rssm.Gaussian(m, sd), k3)),
                             argnums=(0, 1))(mean, std)
    np.testing.assert_allclose(g_mean, np.ones(mean.shape), rtol=1e-6)
    np.testing.assert_allclose(g_std, noise, rtol=1e-4, atol=1e-5)

    x = np.asarray(jax.random.normal(k4, mean.shape), np.float64)
    m64, sd64 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    want = -np.sum((x - m64) ** 2 / (2 * sd64 ** 2) + np.log(sd64) + 0.5 * np.log(2 * np.pi), -1)
    got = dist.distribution().log_prob(jnp.asarray(x, jnp.float32))
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gru_cell_is_flaxs_cell_with_two_matmuls():
    """networks.GRUCell: flax's parameters and initial values for the same key, and flax's cell's
    outputs and gradients (inputs and every parameter), on inputs with two leading axes and random
    biases; the outputs also against a float64 numpy cell written from the GRU's equations."""
    import flax.linen as nn
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(11), 4)
    x = jax.random.normal(k1, (3, 5, 12))
    h = jax.random.uniform(k2, (3, 5, 16), minval=-1)
    ours, flax_cell = networks.GRUCell(16), nn.GRUCell(16)
    params = ours.init(k3, h, x)["params"]
    assert_trees_close(params, flax_cell.init(k3, h, x)["params"], rtol=0, atol=0)
    params = jax.tree.map(lambda v, k: v + 0.3 * jax.random.normal(k, v.shape), params,
                          jax.tree.unflatten(jax.tree.structure(params),
                                             list(jax.random.split(k4, len(jax.tree.leaves(params))))))

    def run(cell):
        return lambda p, h, x: cell.apply({"params": p}, h, x)[0]

    got = run(ours)(params, h, x)
    assert_trees_close(got, run(flax_cell)(params, h, x), rtol=1e-5, atol=1e-6)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    xs, hs = np.asarray(x, np.float64), np.asarray(h, np.float64)
    lin = lambda v, g: v @ p[g]["kernel"] + p[g].get("bias", 0.0)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    r, z = sigmoid(lin(xs, "ir") + lin(hs, "hr")), sigmoid(lin(xs, "iz") + lin(hs, "hz"))
    n = np.tanh(lin(xs, "in") + r * lin(hs, "hn"))
    np.testing.assert_allclose(got, (1 - z) * n + z * hs, rtol=1e-5, atol=1e-5)
    loss = lambda cell: jax.grad(lambda p, h, x: jnp.sum(jnp.sin(run(cell)(p, h, x))), (0, 1, 2))
    assert_trees_close(loss(ours)(params, h, x), loss(flax_cell)(params, h, x), rtol=1e-5, atol=1e-5)
