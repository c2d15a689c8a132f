import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planet_jax.cem import CEMResult, cem

H, A = 4, 3


def quadratic(target, scale):
    """-sum scale * (a - target)^2 over (H, A): maximised exactly at a = target."""
    def objective(actions, key):
        del key
        return -jnp.sum(scale * (actions - target) ** 2, axis=(1, 2))
    return objective


def test_finds_the_optimum_of_a_quadratic():
    # 12 dimensions with curvatures spread over a factor of 10, optimum inside the bounds.
    target = jax.random.uniform(jax.random.PRNGKey(0), (H, A), minval=-0.8, maxval=0.8)
    scale = jnp.linspace(0.5, 5.0, H * A).reshape(H, A)
    result = jax.jit(lambda k: cem(quadratic(target, scale), k, horizon=H, action_dim=A,
                                   iterations=20, candidates=500, top_k=50))(jax.random.PRNGKey(1))
    assert isinstance(result, CEMResult)
    assert result.mean.shape == result.std.shape == (H, A)
    np.testing.assert_allclose(result.mean, target, atol=1e-3)  # reached: ~1e-4 over 8 seeds
    assert float(result.std.max()) < 2e-3  # the distribution has collapsed on the optimum


def test_optimum_outside_the_bounds_ends_on_the_boundary():
    target = jnp.full((H, A), 3.0).at[:, 0].set(-3.0)
    low, high = jnp.array([-0.5, -1.0, -1.0]), jnp.array([1.0, 1.0, 0.25])  # per-dimension bounds
    result = cem(quadratic(target, 1.0), jax.random.PRNGKey(2), horizon=H, action_dim=A,
                 iterations=10, candidates=200, top_k=20, low=low, high=high)
    assert np.all(result.mean >= low) and np.all(result.mean <= high)
    # Clipped samples pile up on the nearest bound, so the mean approaches it from inside.
    expected = jnp.broadcast_to(jnp.array([-0.5, 1.0, 0.25]), (H, A))
    np.testing.assert_allclose(result.mean, expected, atol=0.02)


def test_samples_are_clipped_and_refit_is_the_population_std_of_the_elites():
    seen = []

    def objective(actions, key):
        jax.debug.callback(lambda a: seen.append(np.asarray(a)), actions)
        return actions[:, 0, 0]  # elites: the K largest first actions

    low, high = -0.5, 0.5
    result = cem(objective, jax.random.PRNGKey(3), horizon=H, action_dim=A, iterations=1,
                 candidates=64, top_k=8, low=low, high=high, init_std=2.0)
    (actions,) = seen
    assert actions.min() >= low and actions.max() <= high
    assert np.mean(actions == high) > 0.2  # wide N(0, 2^2) samples really were clipped
    # The samples of the first refit: N(0, 2^2) drawn as (J, H, A) from the refit's key.
    k_sample = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 0))[0]
    expected = np.clip(2.0 * np.asarray(jax.random.normal(k_sample, (64, H, A))), low, high)
    np.testing.assert_allclose(actions, expected, rtol=1e-6, atol=1e-7)
    elites = actions[np.argsort(-actions[:, 0, 0])[:8]]
    np.testing.assert_allclose(result.mean, elites.mean(0), atol=1e-6)
    np.testing.assert_allclose(result.std, elites.std(0, ddof=0), atol=1e-6)


def test_initial_distribution_and_zero_iterations():
    init = jnp.arange(H * A, dtype=jnp.float32).reshape(H, A) / 20
    result = cem(quadratic(0.0, 1.0), jax.random.PRNGKey(4), horizon=H, action_dim=A, iterations=0,
                 candidates=10, top_k=2, init_mean=init, init_std=0.3)
    np.testing.assert_array_equal(result.mean, init)
    np.testing.assert_array_equal(result.std, jnp.full((H, A), 0.3))
    default = cem(quadratic(0.0, 1.0), jax.random.PRNGKey(4), horizon=H, action_dim=A,
                  iterations=0, candidates=10, top_k=2)
    np.testing.assert_array_equal(default.mean, jnp.zeros((H, A)))  # the paper's N(0, I)
    np.testing.assert_array_equal(default.std, jnp.ones((H, A)))


def test_fixed_key_is_deterministic_and_the_objective_gets_a_key():
    def noisy(actions, key):  # the objective's own randomness comes from the key it is given
        return -jnp.sum(actions ** 2, axis=(1, 2)) + jax.random.normal(key, actions.shape[:1])

    run = jax.jit(lambda k: cem(noisy, k, horizon=H, action_dim=A, iterations=3, candidates=50,
                                top_k=5))
    a, b = run(jax.random.PRNGKey(5)), run(jax.random.PRNGKey(5))
    c = run(jax.random.PRNGKey(6))
    np.testing.assert_array_equal(a.mean, b.mean)
    assert not np.allclose(a.mean, c.mean)


def test_vmap_over_start_points_with_a_key_each_equals_separate_calls():
    targets = jax.random.uniform(jax.random.PRNGKey(7), (3, H, A), minval=-0.5, maxval=0.5)
    keys = jax.random.split(jax.random.PRNGKey(8), 3)

    def solve(target, key):
        return cem(quadratic(target, 1.0), key, horizon=H, action_dim=A, iterations=8,
                   candidates=100, top_k=10)

    batched = jax.jit(jax.vmap(solve))(targets, keys)
    solve_one = jax.jit(solve)
    for i in range(3):
        single = solve_one(targets[i], keys[i])
        np.testing.assert_allclose(batched.mean[i], single.mean, atol=1e-6)
        np.testing.assert_allclose(batched.std[i], single.std, atol=1e-6)


def count_eqns(jaxpr) -> int:
    """Equations in a jaxpr, those of nested jaxprs (loop bodies, jitted calls) included."""
    count = len(jaxpr.eqns)
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    count += count_eqns(sub)
    return count


def test_program_size_does_not_grow_with_iterations_or_horizon():
    def size(iterations, horizon):
        run = lambda k: cem(quadratic(0.0, 1.0), k, horizon=horizon, action_dim=A,
                            iterations=iterations, candidates=20, top_k=4)
        return count_eqns(jax.make_jaxpr(run)(jax.random.PRNGKey(0)).jaxpr)

    assert size(2, 3) == size(30, 3) == size(2, 40) > 5


def test_rejects_more_elites_than_candidates():
    with pytest.raises(ValueError, match="top_k"):
        cem(quadratic(0.0, 1.0), jax.random.PRNGKey(0), horizon=H, action_dim=A, iterations=1,
            candidates=4, top_k=5)
