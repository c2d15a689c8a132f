import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planet_jax import autotune, networks, planner, rssm
from planet_jax.config import MATMUL_DTYPES, PLAN_BATCHING, PLAN_CPU_DOTS, PlannerConfig
from tests.conftest import ACTION_DIM, assert_trees_close, imagine_by_hand, tiny_model
from tests.test_cem import count_eqns

SMALL = PlannerConfig(horizon=4, iterations=3, candidates=64, top_k=8)
N = 3


def random_states(cfg, key, batch=()):
    k1, k2 = jax.random.split(key)
    return rssm.RSSMState(jax.random.uniform(k1, batch + (cfg.h_size,), minval=-1, maxval=1),
                          jax.random.normal(k2, batch + (cfg.s_size,)))


def planner_params(cfg, key):
    """The parameters the planner reads: the transition and the reward model (initialising the
    conv encoder and decoder as well would take longer than all the planner tests on a CPU)."""
    mods = networks.modules(cfg)
    k_transition, k_reward = jax.random.split(key)
    h, s, a = jnp.zeros(cfg.h_size), jnp.zeros(cfg.s_size), jnp.zeros(ACTION_DIM)
    return {"transition": mods["transition"].init(k_transition, h, s, a)["params"],
            "reward": mods["reward"].init(k_reward, jnp.zeros(cfg.feature_size))["params"]}


def steering_params(cfg, template):
    """A hand-set model whose best first action depends on the start state.

    All weights zero except: the transition embeds relu(a[0]) and relu(-a[0]); the GRU's gates sit
    at 1/2 and its candidate is tanh(2 a[0]) in unit 0, so h_1[0] = (tanh(2 a[0]) + h_0[0]) / 2;
    the reward is -|h[0]|. The best plan sets h_1[0] = 0, i.e. a[0] = -atanh(h_0[0]) / 2: opposite
    signs for environments that start at opposite h_0[0].
    """
    p = jax.tree.map(jnp.zeros_like, template)
    t, r = p["transition"], p["reward"]
    t["embed_sa"]["kernel"] = t["embed_sa"]["kernel"].at[cfg.s_size, 0].set(1).at[cfg.s_size, 1].set(-1)
    t["gru"]["in"]["kernel"] = t["gru"]["in"]["kernel"].at[0, 0].set(2).at[1, 0].set(-2)
    r["Dense_0"]["kernel"] = r["Dense_0"]["kernel"].at[0, 0].set(1).at[0, 1].set(-1)
    r["Dense_1"]["kernel"] = r["Dense_1"]["kernel"].at[0, 0].set(1).at[1, 0].set(1)
    r["Dense_2"]["kernel"] = r["Dense_2"]["kernel"].at[0, 0].set(-1)
    return p


@pytest.fixture(scope="module")
def cfg():
    return tiny_model()


@pytest.fixture(scope="module")
def params(cfg):
    return jax.jit(planner_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def plan(cfg):
    return planner.make_planner(cfg, SMALL, ACTION_DIM)


@pytest.mark.parametrize("matmul_dtype", MATMUL_DTYPES)
def test_each_environment_is_planned_from_its_own_state(cfg, params, matmul_dtype):
    # The original TF planner paired one environment's candidate actions with other environments'
    # states. Here environments 0, 2 and 1, 3 start at opposite h_0[0] and need opposite actions.
    params = steering_params(cfg, params)
    h0 = jnp.array([0.6, -0.6, 0.3, -0.3])
    state = rssm.RSSMState(jnp.zeros((4, cfg.h_size)).at[:, 0].set(h0), jnp.zeros((4, cfg.s_size)))
    cfg_plan = PlannerConfig(horizon=3, iterations=5, candidates=200, top_k=20, matmul_dtype=matmul_dtype)
    plan = planner.make_planner(cfg, cfg_plan, ACTION_DIM)
    action, _ = plan(params, state, jax.random.split(jax.random.PRNGKey(1), 4))
    np.testing.assert_allclose(action[:, 0], -np.arctanh(h0) / 2, atol=0.03)  # reached: ~0.01


def test_batch_equals_separate_calls_and_traces_once_per_shape(cfg, params, monkeypatch):
    chex.clear_trace_counter()
    monkeypatch.setattr(planner, "_plan", chex.assert_max_traces(planner._plan, n=2))
    plan = planner.make_planner(cfg, SMALL, ACTION_DIM)
    state = random_states(cfg, jax.random.PRNGKey(2), (N,))
    keys = jax.random.split(jax.random.key(3), N)  # new-style typed keys work too
    action, mean = plan(params, state, keys)
    assert action.shape == (N, ACTION_DIM) and mean.shape == (N, SMALL.horizon, ACTION_DIM)
    for i in range(N):  # other states and keys of the same shapes: no new trace
        action_i, mean_i = plan(params, jax.tree.map(lambda x: x[i], state), keys[i])
        assert action_i.shape == (ACTION_DIM,) and mean_i.shape == (SMALL.horizon, ACTION_DIM)
        assert_trees_close((action[i], mean[i]), (action_i, mean_i), rtol=0, atol=1e-5)
    # Distinct states and keys: a batch that mixed environments up could not pass the loop above.
    assert not np.allclose(action[0], action[1])
    plan(params, random_states(cfg, jax.random.PRNGKey(4), (N,)), jax.random.split(keys[0], N))


def test_batched_warm_start_equals_separate_calls(cfg, params):
    warm = planner.make_planner(cfg, dataclasses.replace(SMALL, warm_start=True), ACTION_DIM)
    state = random_states(cfg, jax.random.PRNGKey(4), (N,))
    keys = jax.random.split(jax.random.PRNGKey(5), N)
    prev = jax.random.uniform(jax.random.PRNGKey(6), (N, SMALL.horizon, ACTION_DIM), minval=-1)
    action, mean = warm(params, state, keys, prev)
    for i in range(N):
        one = warm(params, jax.tree.map(lambda x: x[i], state), keys[i], prev[i])
        assert_trees_close((action[i], mean[i]), one, rtol=0, atol=1e-5)


def test_accelerator_batch_path_equals_cpu_path(cfg, params, plan, monkeypatch):
    # Unmeasured, a CPU plans the environments one after another; elsewhere vmapped. Same results.
    state = random_states(cfg, jax.random.PRNGKey(12), (N,))
    keys = jax.random.split(jax.random.PRNGKey(13), N)
    sequential = plan(params, state, keys)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    vmapped = planner.make_planner(cfg, SMALL, ACTION_DIM)(params, state, keys)
    assert_trees_close(vmapped, sequential, rtol=0, atol=1e-5)


@pytest.mark.parametrize("warm_start", [False, True])
def test_each_batching_equals_separate_calls(cfg, params, warm_start):
    """Both batchings the autotuner may pick (config.PLAN_BATCHING), pinned, against N single calls."""
    state = random_states(cfg, jax.random.PRNGKey(14), (N,))
    keys = jax.random.split(jax.random.PRNGKey(15), N)
    prev = jax.random.uniform(jax.random.PRNGKey(16), (N, SMALL.horizon, ACTION_DIM), minval=-1)
    single = planner.make_planner(cfg, dataclasses.replace(SMALL, warm_start=warm_start), ACTION_DIM)
    separate = [single(params, jax.tree.map(lambda x: x[i], state), keys[i], prev[i]) for i in range(N)]
    for batching in PLAN_BATCHING:
        pinned = dataclasses.replace(SMALL, warm_start=warm_start, batching=batching)
        action, mean = planner.make_planner(cfg, pinned, ACTION_DIM)(params, state, keys, prev)
        for i in range(N):
            assert_trees_close((action[i], mean[i]), separate[i], rtol=0, atol=1e-5)


def test_fixed_key_same_action_and_actions_inside_bounds(cfg, params, plan):
    # Scaled-up weights give large predicted returns that push plans toward the bounds.
    loud = jax.tree.map(lambda x: 4.0 * x, params)
    state = random_states(cfg, jax.random.PRNGKey(7))
    a1, m1 = plan(loud, state, jax.random.PRNGKey(8))
    a2, m2 = plan(loud, state, jax.random.PRNGKey(8))
    a3, _ = plan(loud, state, jax.random.PRNGKey(9))
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(m1, m2)
    assert not np.array_equal(a1, a3)
    np.testing.assert_array_equal(a1, m1[0])  # act with the first action of the final mean
    for x in (a1, m1, a3):
        assert np.all(np.abs(np.asarray(x)) <= 1.0)
    assert np.max(np.abs(np.asarray(m1))) > 0.5  # the bounds were binding somewhere


def test_one_key_per_environment(cfg, params, plan):
    state = random_states(cfg, jax.random.PRNGKey(0), (N,))
    with pytest.raises(ValueError, match="one key per environment"):
        plan(params, state, jax.random.PRNGKey(1))


def test_program_size_does_not_grow_with_horizon_or_iterations(cfg, params):
    def size(horizon, iterations):
        plan = planner.make_planner(
            cfg, PlannerConfig(horizon=horizon, iterations=iterations, candidates=16, top_k=4),
            ACTION_DIM)
        state = random_states(cfg, jax.random.PRNGKey(0))
        return count_eqns(jax.make_jaxpr(plan)(params, state, jax.random.PRNGKey(1)).jaxpr)

    assert size(2, 2) == size(12, 2) == size(2, 10)


def test_shift_plan():
    mean = jnp.arange(12.0).reshape(1, 3, 4) + 1  # (N=1, H=3, A=4)
    expected = jnp.array([[[5.0, 6, 7, 8], [9, 10, 11, 12], [0, 0, 0, 0]]])
    np.testing.assert_array_equal(planner.shift_plan(mean), expected)
    np.testing.assert_array_equal(planner.shift_plan(mean[0]), expected[0])


@pytest.mark.parametrize("warm_start", [False, True])
def test_warm_start_sets_the_initial_mean(cfg, params, warm_start):
    # With zero CEM iterations the plan is the initial mean itself.
    cfg_plan = PlannerConfig(horizon=3, iterations=0, candidates=8, top_k=2, warm_start=warm_start)
    plan = planner.make_planner(cfg, cfg_plan, ACTION_DIM)
    prev = jax.random.uniform(jax.random.PRNGKey(0), (N, 3, ACTION_DIM), minval=-1)
    state = random_states(cfg, jax.random.PRNGKey(1), (N,))
    action, mean = plan(params, state, jax.random.split(jax.random.PRNGKey(2), N), prev)
    expected = planner.shift_plan(prev) if warm_start else jnp.zeros_like(prev)
    np.testing.assert_array_equal(mean, expected)
    np.testing.assert_array_equal(action, expected[:, 0])
    _, cold = plan(params, state, jax.random.split(jax.random.PRNGKey(2), N))  # no previous plan
    np.testing.assert_array_equal(cold, jnp.zeros_like(prev))


def test_predicted_rewards_and_return_step_by_step(cfg, params):
    """Per step and summed, against each candidate stepped by hand with imagine's noise (H not a
    multiple of the rollout's unroll, so its loop has a remainder)."""
    J, H = 4, planner.IMAGINE_UNROLL + 2
    state = random_states(cfg, jax.random.PRNGKey(3))
    actions = jax.random.uniform(jax.random.PRNGKey(4), (J, H, ACTION_DIM), minval=-1)
    key = jax.random.PRNGKey(5)
    rewards = planner.predicted_rewards(params, cfg, state, actions, key)
    returns = planner.predicted_return(params, cfg, state, actions, key)
    assert rewards.shape == (J, H) and returns.shape == (J,)
    for j, k in enumerate(jax.random.split(key, J)):  # each candidate, step by step, its own key
        total = 0.0
        for t, (s, _) in enumerate(imagine_by_hand(params, cfg, state, actions[j], k)):
            r_t = networks.reward(params, cfg, rssm.features(s))
            np.testing.assert_allclose(rewards[j, t], r_t, rtol=1e-5, atol=1e-5)
            total += r_t
        np.testing.assert_allclose(returns[j], total, rtol=1e-5, atol=1e-5)


def with_random_biases(params, key):
    """`params` with every bias drawn from N(0, 0.5^2): flax initialises them to zero, which would
    hide a bias dropped or rounded."""
    leaves, tree = jax.tree.flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape) if path[-1].key == "bias" else x
                                     for (path, x), k in zip(leaves, keys)])


def to_bf16(x):
    return np.asarray(np.asarray(x, np.float32).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("gru", [nn.GRUCell, networks.GRUCell])
@pytest.mark.parametrize("dtype", MATMUL_DTYPES)
def test_dense_operands_round_each_matmul_operand_and_nothing_else(dtype, gru):
    """A flax Dense layer and a GRU cell (flax's, planet_jax's) under networks.dense_operands against float64 numpy
    versions whose matmul operands are rounded to `dtype` (the GRU in flax's gate layout: biases on
    the input layers and on hn); for bfloat16 they differ from the unrounded versions by far more
    than float32's error, so the rounding happened. One layer at a time, from the same float32
    inputs, so that no rounded intermediate can fall on the other side of a bfloat16 boundary."""
    round_to = to_bf16 if dtype == "bfloat16" else (lambda x: np.asarray(x, np.float64))
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(7), 4)
    x = jax.random.normal(k1, (3, 8, 12))  # two leading axes
    h = jax.random.uniform(k2, (3, 8, 16), minval=-1)
    dense, cell = nn.Dense(16), gru(16)
    p_dense = with_random_biases(dense.init(k3, x)["params"], k4)
    p_cell = with_random_biases(cell.init(k3, h, x)["params"], k4)

    @jax.jit
    def layers(p_dense, p_cell, x, h):
        with networks.dense_operands(dtype):
            return dense.apply({"params": p_dense}, x), cell.apply({"params": p_cell}, h, x)[0]

    got_dense, got_cell = layers(p_dense, p_cell, x, h)
    assert got_dense.dtype == got_cell.dtype == jnp.float32

    def numpy_layers(round_operands):
        p = jax.tree.map(lambda v: np.asarray(v, np.float64), (p_dense, p_cell))
        lin = lambda v, layer: round_operands(v) @ round_operands(layer["kernel"]) + layer.get("bias", 0.0)
        sigmoid = lambda v: 1 / (1 + np.exp(-v))
        g, xs, hs = p[1], np.asarray(x, np.float64), np.asarray(h, np.float64)
        r = sigmoid(lin(xs, g["ir"]) + lin(hs, g["hr"]))
        z = sigmoid(lin(xs, g["iz"]) + lin(hs, g["hz"]))
        n = np.tanh(lin(xs, g["in"]) + r * lin(hs, g["hn"]))
        return lin(xs, p[0]), (1 - z) * n + z * hs

    plain = numpy_layers(lambda v: np.asarray(v, np.float64))
    for got, want, exact in zip((got_dense, got_cell), numpy_layers(round_to), plain):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        if dtype == "bfloat16":
            assert np.abs(want - exact).max() > 1e-3


def test_another_matmul_dtype_is_an_error_that_names_the_setting(cfg):
    with pytest.raises(ValueError, match="^dtype must be one of float32, bfloat16, got 'float16'$"):
        with networks.dense_operands("float16"):
            pass
    with pytest.raises(ValueError, match="^planner.matmul_dtype must be one of float32, bfloat16, got 'bf16'$"):
        planner.make_planner(cfg, dataclasses.replace(SMALL, matmul_dtype="bf16"), ACTION_DIM)


def dot_operand_dtypes(jaxpr) -> set:
    """(lhs, rhs, result) dtypes of every dot_general in a jaxpr, nested jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(tuple(str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found |= dot_operand_dtypes(sub)
    return found


@pytest.mark.parametrize("kind", ["rssm", "ssm", "rnn"])
@pytest.mark.parametrize("matmul_dtype", MATMUL_DTYPES)
def test_plan_multiplies_in_the_configured_dtype(kind, matmul_dtype):
    """Every matmul of a decision (one environment, and a batch by each batching) takes
    `matmul_dtype` operands and gives float32, for each model kind; the actions stay float32."""
    cfg = tiny_model(kind=kind)
    params = planner_params(cfg, jax.random.PRNGKey(0))
    for batch, batching in (((), "default"), ((N,), "map"), ((N,), "vmap")):
        cfg_plan = dataclasses.replace(SMALL, matmul_dtype=matmul_dtype, batching=batching)
        state = random_states(cfg, jax.random.PRNGKey(2), batch)
        key = jax.random.split(jax.random.PRNGKey(3), N) if batch else jax.random.PRNGKey(3)
        jaxpr = jax.make_jaxpr(planner.make_planner(cfg, cfg_plan, ACTION_DIM))(params, state, key)
        assert dot_operand_dtypes(jaxpr.jaxpr) == {(matmul_dtype, matmul_dtype, "float32")}
        assert all(v.aval.dtype == jnp.float32 for v in jaxpr.jaxpr.outvars)


def test_plan_batching_is_cached_apart_per_matmul_dtype(cfg):
    """The batching measured with bfloat16 operands is stored under its own key; float32's key has
    no dtype word, and both end in the planner's revision (`autotune.revision` reads it there)."""
    keys = []

    class Spy:
        def choose(self, op, key, candidates, default, pin, gflop, **kwargs):
            if op == "planner.batching":
                keys.append(key)
            return default

    for dtype in MATMUL_DTYPES:
        planner.plan_batching(cfg, dataclasses.replace(SMALL, matmul_dtype=dtype), ACTION_DIM, N, Spy())
    revision = planner._PLAN_REVISION
    assert keys[0].endswith(f"unroll{planner.IMAGINE_UNROLL}{revision}")
    assert keys[1] == keys[0][:-len(revision)] + " bfloat16" + revision
    assert autotune.revision(keys[1]) == (keys[1][:-len(revision)], int(revision.strip()[1:]))


@pytest.mark.parametrize("warm_start", [False, True])
def test_each_cpu_dots_choice_gives_the_same_actions(cfg, params, warm_start):
    """Both ways XLA:CPU may run the matmuls (config.PLAN_CPU_DOTS), pinned: one environment and N
    by each batching give the actions of XLA's default dots, up to float32 rounding."""
    state = random_states(cfg, jax.random.PRNGKey(17), (N,))
    keys = jax.random.split(jax.random.PRNGKey(18), N)
    prev = jax.random.uniform(jax.random.PRNGKey(19), (N, SMALL.horizon, ACTION_DIM), minval=-1)
    base = dataclasses.replace(SMALL, warm_start=warm_start, cpu_dots="default")
    expected = planner.make_planner(cfg, base, ACTION_DIM)(params, state, keys, prev)
    for dots in PLAN_CPU_DOTS:
        for batching in PLAN_BATCHING:
            pinned = dataclasses.replace(base, cpu_dots=dots, batching=batching)
            assert_trees_close(planner.make_planner(cfg, pinned, ACTION_DIM)(params, state, keys, prev),
                               expected, rtol=0, atol=1e-5)
        one = planner.make_planner(cfg, dataclasses.replace(base, cpu_dots=dots), ACTION_DIM)
        assert_trees_close(one(params, jax.tree.map(lambda x: x[0], state), keys[0], prev[0]),
                           (expected[0][0], expected[1][0]), rtol=0, atol=1e-5)


def test_eigen_dots_compile_without_library_fusions(cfg, params):
    """'eigen' reaches the compiled program: no YNNPACK fusion is left in it, where XLA's default
    (on a jaxlib that has the option) hands the rollouts' matmuls to them."""
    if jax.default_backend() != "cpu" or not planner._ynn_option_known():
        pytest.skip("XLA:CPU without the YNNPACK option")
    state = random_states(cfg, jax.random.PRNGKey(20))
    texts = {dots: planner.make_planner(cfg, dataclasses.replace(SMALL, cpu_dots=dots), ACTION_DIM)
             .lower(params, state, jax.random.PRNGKey(21)).compile().as_text() for dots in PLAN_CPU_DOTS}
    assert "__ynn_fusion" in texts["xla"] and "ynn" not in texts["eigen"]
    # Inside a user's own jit (whose options rule; arguments traced or closed over), a scan and a
    # vmap, the same plan still works.
    plan = planner.make_planner(cfg, dataclasses.replace(SMALL, cpu_dots="eigen"), ACTION_DIM)
    key = jax.random.PRNGKey(21)
    direct = plan(params, state, key)
    assert_trees_close(jax.jit(plan)(params, state, key), direct, rtol=0, atol=1e-5)
    assert_trees_close(jax.jit(lambda: plan(params, state, key))(), direct, rtol=0, atol=1e-5)
    scanned = jax.lax.scan(lambda c, _: (c, plan(params, state, key)), 0, None, length=2)[1]
    assert_trees_close(scanned, jax.tree.map(lambda x: jnp.stack([x, x]), direct), rtol=0, atol=1e-5)
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    assert_trees_close(jax.vmap(plan, (None, 0, None))(params, states, key), jax.tree.map(lambda x: jnp.stack([x, x]), direct),
                       rtol=0, atol=1e-5)
    assert planner.compiler_options(cfg, dataclasses.replace(SMALL, cpu_dots="eigen"), ACTION_DIM) \
        == {planner._YNN_OPTION: ""}
    assert planner.compiler_options(cfg, dataclasses.replace(SMALL, cpu_dots="xla"), ACTION_DIM) is None


def test_a_cpu_dots_jit_traces_with_its_choice_and_nested_with_xla(cfg):
    """What `plan_batching` reads while a program is traced: the choice of the CpuDotsJit compiling
    it, and XLA's default inside a caller's own jit."""
    seen = []

    def jit_eigen():  # a new function each time: jax would reuse one's trace for another call
        def fun(x):
            seen.append(planner._TRACED_DOTS.get())
            return x + 1
        return planner.jit_with_cpu_dots(fun, cfg, dataclasses.replace(SMALL, cpu_dots="eigen"), ACTION_DIM)

    expected = "eigen" if jax.default_backend() == "cpu" and planner._ynn_option_known() else "xla"
    assert float(jit_eigen()(np.float32(1))) == 2.0 and seen == [expected]
    nested = jit_eigen()
    assert float(jax.jit(lambda x: nested(x) * 2)(np.float32(1))) == 4.0 and seen == [expected, "xla"]
    assert float(jit_eigen().lower(np.float32(1)).compile()(np.float32(2))) == 3.0
    assert seen == [expected, "xla", expected] and planner._TRACED_DOTS.get() == "xla"


def test_make_planner_rejects_an_unknown_cpu_dots(cfg):
    with pytest.raises(ValueError, match="planner.cpu_dots must be one of auto, default, xla, eigen, got 'mkl'"):
        planner.make_planner(cfg, dataclasses.replace(SMALL, cpu_dots="mkl"), ACTION_DIM)


def test_the_batching_is_chosen_for_the_dots_each_call_compiles_with(cfg, params, monkeypatch):
    """plan_batching, called while a decision is traced, sees 'eigen' only in the program compiled
    with Eigen's dots: a plain call; inside a caller's jit (arguments traced or closed over) the
    caller's options rule, so 'xla', also after a plain call traced the same shapes."""
    seen = []
    monkeypatch.setattr(planner, "plan_batching", lambda *args, **kwargs: (seen.append(planner._TRACED_DOTS.get()), "map")[1])
    expected = "eigen" if jax.default_backend() == "cpu" and planner._ynn_option_known() else "xla"
    eigen = dataclasses.replace(SMALL, cpu_dots="eigen")
    state = random_states(cfg, jax.random.PRNGKey(22), (N,))
    keys = jax.random.split(jax.random.PRNGKey(23), N)
    plan = planner.make_planner(cfg, eigen, ACTION_DIM)
    plan(params, state, keys)
    jax.jit(plan)(params, state, keys)
    assert seen == [expected, "xla"]
    seen.clear()
    closed = planner.make_planner(cfg, eigen, ACTION_DIM)
    jax.jit(lambda: closed(params, state, keys))()
    assert seen[-1] == "xla"  # the trace the caller's program holds (an Eigen one may come first)
