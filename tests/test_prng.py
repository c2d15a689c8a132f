import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planet_jax import prng

KEYS = [lambda: jax.random.PRNGKey(0), lambda: jax.random.PRNGKey(2 ** 31 + 77),
        lambda: jax.random.key(9), lambda: jax.random.split(jax.random.key(3))[1]]
SHAPES = [(1,), (7,), (3, 30), (250, 72), (2, 3, 4, 5)]


def jax_bits(key, shape):
    return jax.random.bits(key, shape, jnp.uint32)


@pytest.mark.parametrize("make_key", KEYS)
@pytest.mark.parametrize("ours,theirs", [(prng.bits, jax_bits), (prng.normal, jax.random.normal)])
def test_draws_equal_jax_random(make_key, ours, theirs):
    """Bit for bit jax.random's, for raw and typed keys, under jit (where XLA compiles the hash)."""
    key = make_key()
    for shape in SHAPES:
        got, want = jax.jit(ours, static_argnums=1)(key, shape), theirs(key, shape)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_draws_under_vmap_equal_jax_random():
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    np.testing.assert_array_equal(jax.jit(jax.vmap(lambda k: prng.normal(k, (12, 30))))(keys),
                                  jax.vmap(lambda k: jax.random.normal(k, (12, 30)))(keys))
    np.testing.assert_array_equal(jax.vmap(lambda k: prng.bits(k, (4, 9)))(keys),
                                  jax.vmap(lambda k: jax_bits(k, (4, 9)))(keys))


def test_a_cpu_draw_is_the_unrolled_hash_not_jax_threefry():
    """On a CPU the words come from the hash written out here (jax's random_bits, lowered to the
    rolled loop, is not in the program); elsewhere they would be jax's, which are the same words."""
    if jax.default_backend() != "cpu":
        pytest.skip("the unrolled hash serves XLA:CPU only")
    for key in (jax.random.PRNGKey(4), jax.random.key(4)):
        for fn in (prng.bits, prng.normal):
            assert "random_bits" not in str(jax.make_jaxpr(lambda k: fn(k, (3, 5)))(key))
        assert "random_bits" in str(jax.make_jaxpr(lambda k: jax.random.normal(k, (3, 5)))(key))


def test_zero_size_and_scalar_draws_equal_jax_random():
    key = jax.random.PRNGKey(6)
    for shape in [(), (0,), (3, 0, 2)]:
        np.testing.assert_array_equal(prng.normal(key, shape), jax.random.normal(key, shape))
        assert prng.bits(key, shape).shape == shape


def test_cases_it_does_not_cover_are_jax_random_itself():
    key = jax.random.PRNGKey(5)
    with jax.enable_x64(True):  # dtype float means float64 here, as for jax.random.normal
        wide = prng.normal(key, (4,))
        assert wide.dtype == jnp.float64
        np.testing.assert_array_equal(wide, jax.random.normal(key, (4,)))
    half = prng.normal(key, (4, 6), jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_array_equal(half, jax.random.normal(key, (4, 6), jnp.bfloat16))
    with jax.threefry_partitionable(False):
        np.testing.assert_array_equal(prng.bits(key, (300,)), jax_bits(key, (300,)))
        np.testing.assert_array_equal(prng.normal(key, (300,)), jax.random.normal(key, (300,)))
    rbg = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(prng.normal(rbg, (8,)), jax.random.normal(rbg, (8,)))
    with pytest.raises(Exception):  # a batch of keys is jax's error, as for jax.random.normal
        prng.normal(jax.random.split(key, 3), (2,))
