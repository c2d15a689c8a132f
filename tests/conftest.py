import dataclasses
import os


def xla_flags(*flags: str) -> str:
    """This process's XLA_FLAGS with `flags` appended (for a subprocess's environment)."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


# Compiling, not running, is what the suite spends its time on: the tests' programs are tiny. LLVM's
# optimisations at level 0, and XLA:CPU's older loop emitters instead of its MLIR fusion emitters,
# compile them several times faster (docs/performance.md, "Test suite"). Set before JAX starts its
# backend, and inherited by the CLI subprocesses.
os.environ["XLA_FLAGS"] = xla_flags("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from planet_jax import config, networks  # noqa: E402

# The suite never times formulations (planet_jax.autotune) nor writes to the user's cache folder:
# every test runs today's default choices; tests/test_autotune.py tests the search with fake timers.
os.environ.setdefault("PLANET_JAX_AUTOTUNE", "off")

ACTION_DIM = 2


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Tests compile the same tiny programs again and again (each run of the loop builds its own
    jitted functions, each CLI test is a new process): one persistent compilation cache for the
    session, this process and its subprocesses, turns the repeats into disk reads."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield cache


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


def imagine_by_hand(params, cfg, state, actions, key):
    """rssm.imagine's rollout as a plain loop: prior steps under actions (H, A), step t's sample
    mean + std * eps[t] with eps = jax.random.normal(key, (H, |s|)) (the mean for 'rnn');
    the (state, prior) of each step."""
    from planet_jax import rssm
    eps = jax.random.normal(key, (len(actions), cfg.s_size))
    steps = []
    for t, a_t in enumerate(actions):
        h_t, p = rssm.prior(params, cfg, state, a_t)
        state = rssm.RSSMState(h_t, p.mean if cfg.kind == "rnn" else p.mean + p.std * eps[t])
        steps.append((state, p))
    return steps


def assert_trees_close(x, y, rtol=1e-5, atol=1e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                                                         atol=atol), x, y)
