"""`agent.Actor`: the jitted policy compiled once however its inputs were made."""
import jax
import numpy as np

from planet_jax import agent, config, learner, parallel


def test_the_policy_compiles_once_for_fresh_and_restored_runs():
    cfg = config.tiny()
    params = parallel.replicate(learner.init_train_state(cfg, 2, jax.random.PRNGKey(0)).params,
                                parallel.make_mesh())
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
