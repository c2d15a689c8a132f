"""`agent.Actor`: the jitted policy compiled once however its inputs were made."""
import jax
import numpy as np
import pytest

from planet_jax import agent, config, learner, parallel


def _placed(params, placement):
    if placement == "mesh":  # replicated over a mesh of this process's devices
        return parallel.replicate(params, parallel.make_mesh())
    if placement == "local copy":  # what the loop acts with (`parallel.local_copy`)
        return parallel.local_copy(parallel.replicate(params, parallel.make_mesh()))
    return jax.device_put(params, jax.devices()[0])  # as a checkpoint restores them (evaluate)


@pytest.mark.parametrize("placement", ["mesh", "local copy", "restored"])
def test_the_policy_compiles_once_for_fresh_and_restored_runs(placement):
    cfg = config.tiny()
    params = _placed(learner.init_train_state(cfg, 2, jax.random.PRNGKey(0)).params, placement)
    policy = agent.make_policy(cfg, 2)
    obs = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), np.uint8)
    fresh_key = jax.random.PRNGKey(1)  # a new run's key: uncommitted
    restored_key = jax.device_put(jax.random.PRNGKey(1), jax.devices()[0])  # a checkpoint's: committed
    actions = []
    for key in (fresh_key, restored_key):
        act = agent.Actor(policy, cfg, 2, 1, params, key, 0.3)
        actions.append([act(obs) for _ in range(3)])
    assert policy._cache_size() == 1
    np.testing.assert_array_equal(actions[0], actions[1])  # placement changes no value
    assert actions[0][0].shape == (1, 2) and not np.array_equal(actions[0][0], actions[0][1])
    # A new-style typed key is placed the same way.
    typed = agent.Actor(agent.make_policy(cfg, 2), cfg, 2, 1, params, jax.random.key(1), 0.3)
    assert typed(obs).shape == (1, 2)


def test_the_policy_is_compiled_with_the_planners_matmul_choice():
    """make_policy's program, which holds the planner's rollouts, takes `planner.cpu_dots`'s
    compiler options: pinned 'eigen', no YNNPACK fusion is left in it."""
    from planet_jax import planner
    if jax.default_backend() != "cpu" or not planner._ynn_option_known():
        pytest.skip("XLA:CPU without the YNNPACK option")
    cfg = config.override(config.tiny(), ["planner.cpu_dots=eigen"])
    params = learner.init_train_state(cfg, 2, jax.random.PRNGKey(0)).params
    args = (params, agent.initial_belief(cfg, 1, 2), np.zeros((1, 64, 64, 3), np.uint8), jax.random.PRNGKey(1),
            np.float32(0.3))
    texts = {pin: agent.make_policy(config.override(cfg, [f"planner.cpu_dots={pin}"]), 2).lower(*args).compile().as_text()
             for pin in ("eigen", "xla")}
    assert "ynn" not in texts["eigen"] and "__ynn_fusion" in texts["xla"]
