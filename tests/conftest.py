import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planet_jax import config, networks

ACTION_DIM = 2


def tiny_model(**changes) -> config.ModelConfig:
    return dataclasses.replace(config.tiny().model, **changes)


@pytest.fixture
def model_cfg():
    return tiny_model()


@pytest.fixture
def params(model_cfg):
    return networks.init_params(model_cfg, ACTION_DIM, jax.random.PRNGKey(0))


def random_sequence(cfg, T, key, batch=()):
    """Random embeddings and actions of one (or a batch of) sequence(s)."""
    k1, k2 = jax.random.split(key)
    e = jax.random.normal(k1, batch + (T, cfg.embed_size))
    a = jax.random.uniform(k2, batch + (T, ACTION_DIM), minval=-1, maxval=1)
    return e, a


def assert_trees_close(x, y, rtol=1e-5, atol=1e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                                                         atol=atol), x, y)
