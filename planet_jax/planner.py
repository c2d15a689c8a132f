"""PlaNet's planner: the cross-entropy method in latent space (Hafner et al. 2019, section 3).

From the current belief (h_t, s_t), each of J candidate action sequences a_{t:t+H} is scored by
rolling the prior forward with `rssm.imagine` and summing the reward model's predictions over the H
imagined states; `cem.cem` refits to the K best for I iterations and the agent acts with the first
action of the final mean. The paper restarts every decision from N(0, I); optionally the previous
plan, shifted by one step, is the initial mean (`PlannerConfig.warm_start`). With
`PlannerConfig.matmul_dtype='bfloat16'` the rollouts' dense layers multiply bfloat16 operands
(`networks.dense_operands`, entered while the jitted plan is traced). On a CPU, how XLA runs the
rollouts' matmuls is chosen by measurement (`cpu_dots`): its default library fusions keep each of
these small matmuls on one core, its Eigen dots split one over the cores.

`make_planner(model_cfg, planner_cfg, action_dim)` returns one jitted `plan` that serves one
environment (state.h (|h|,), one key) or N at once (state.h (N, |h|), N keys). The batch maps the
single-environment plan over environments (`lax.map` or `vmap`, as `plan_batching` picks), so each
environment's candidates are always scored from its own state, and N environments give exactly
what N separate calls with the same keys give. (The original TF planner tiled states
(candidate, env) but reshaped actions (env, candidate), pairing actions with other environments'
states.)
"""
from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import functools
import inspect
import threading
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from planet_jax import autotune, cem, networks, rssm
from planet_jax.config import (MATMUL_DTYPES, PLAN_BATCHING, PLAN_CPU_DOTS, ModelConfig, PlannerConfig,
                               check_choice)
from planet_jax.networks import Params

ACTION_LOW, ACTION_HIGH = -1.0, 1.0
# Imagined steps per iteration of the rollout's loop: a few steps per loop body let XLA schedule
# the small per-step matmuls and elementwise work of consecutive steps together
# (docs/performance_speed.md, seventh session).
IMAGINE_UNROLL = 3
# XLA:CPU's debug option that hands dots to YNNPACK library fusions (jaxlib 0.10's default); empty,
# the dots stay XLA's own Eigen dots. `PlannerConfig.cpu_dots`'s 'eigen' compiles with it empty.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# The dots of the program being traced (set by `CpuDotsJit` around its top-level calls), which
# `plan_batching` times its candidates with: 'xla' inside a caller's own jit, whose options rule.
_TRACED_DOTS: contextvars.ContextVar[str] = contextvars.ContextVar("planner_traced_dots", default="xla")
# Revision of the decision's program in the planner's cached timings (`autotune.revision`): 2 since
# the GRU's gates became two matmuls (`networks.GRUCell`), 3 since the draws became `prng`'s, 4
# since the rewards are read out inside the rollout's loop (`predicted_rewards`).
_PLAN_REVISION = " r4"


def shift_plan(mean: jax.Array) -> jax.Array:
    """Warm start for the next decision: (..., H, A) mean without its executed first step, zeros last."""
    return jnp.concatenate([mean[..., 1:, :], jnp.zeros_like(mean[..., :1, :])], axis=-2)


def predicted_rewards(params: Params, model_cfg: ModelConfig, state: rssm.RSSMState,
                      actions: jax.Array, key: jax.Array) -> jax.Array:
    """Reward predicted at each imagined step of each action sequence, from one belief state.

    state: h (|h|,), s (|s|,); actions (J, H, A), row t the action into imagined step t + 1;
    returns float32 (J, H): the reward model's mean at each state of one prior rollout
    (`rssm.imagine`) per sequence, each sequence's prior samples drawn with its own key.
    The rewards are read out inside the rollout's loop: stacking the J x H states, moving them to
    candidate-major order and concatenating h and s for one large reward matmul afterwards cost
    more than the reward's matmuls per step (docs/performance_speed.md, sixteenth session).
    """
    keys = jax.random.split(key, actions.shape[0])
    readout = lambda s, _: networks.reward(params, model_cfg, rssm.features(s))
    rollout = jax.vmap(functools.partial(rssm.imagine, unroll=IMAGINE_UNROLL, readout=readout),
                       in_axes=(None, None, None, 0, 0))
    return rollout(params, model_cfg, state, actions, keys)


def predicted_return(params: Params, model_cfg: ModelConfig, state: rssm.RSSMState,
                     actions: jax.Array, key: jax.Array) -> jax.Array:
    """The planner's objective: `predicted_rewards` summed over the horizon, (J,) for actions
    (J, H, A) from one belief state (section 3 of the paper)."""
    return predicted_rewards(params, model_cfg, state, actions, key).sum(-1)


def _plan_one(params: Params, state: rssm.RSSMState, key: jax.Array, prev_mean: jax.Array | None,
              model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int
              ) -> tuple[jax.Array, jax.Array]:
    init_mean = None
    if planner_cfg.warm_start and prev_mean is not None:
        init_mean = shift_plan(prev_mean)
    with networks.dense_operands(planner_cfg.matmul_dtype):
        result = cem.cem(functools.partial(predicted_return, params, model_cfg, state), key,
                         horizon=planner_cfg.horizon, action_dim=action_dim,
                         iterations=planner_cfg.iterations, candidates=planner_cfg.candidates,
                         top_k=planner_cfg.top_k, low=ACTION_LOW, high=ACTION_HIGH, init_mean=init_mean)
    return result.mean[0], result.mean


def _plan(params: Params, state: rssm.RSSMState, key: jax.Array, prev_mean: jax.Array | None = None,
          *, model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int
          ) -> tuple[jax.Array, jax.Array]:
    """One decision for one environment, or for each of N along a leading batch axis."""
    chex.assert_shape(state.h, (..., model_cfg.h_size))
    chex.assert_shape(state.s, state.h.shape[:-1] + (model_cfg.s_size,))
    chex.assert_rank(state.h, {1, 2})
    batch = state.h.shape[:-1]
    key_batch = key.shape if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key.shape[:-1]
    if key_batch != batch:
        raise ValueError(f"plan needs one key per environment: state batch {batch}, key {key.shape}")
    if prev_mean is not None:
        chex.assert_shape(prev_mean, batch + (planner_cfg.horizon, action_dim))
    one = functools.partial(_plan_one, params, model_cfg=model_cfg, planner_cfg=planner_cfg,
                            action_dim=action_dim)
    if not batch:
        return one(state, key, prev_mean)
    if plan_batching(model_cfg, planner_cfg, action_dim, batch[0]) == "vmap":
        return jax.vmap(one)(state, key, prev_mean)
    return jax.lax.map(lambda x: one(*x), (state, key, prev_mean))


def plan_batching(model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int, n: int,
                  tuner: autotune.Tuner | None = None) -> str:
    """How a call plans n environments, 'map' (one after another) or 'vmap' (all at once):
    `planner_cfg.batching` when it names one; for 'auto', whichever decided faster on this machine
    (`planet_jax.autotune`, cached per machine and sizes; timed with the dots of the program that
    is being compiled, `cpu_dots`'s choice for `make_planner`'s and `agent.make_policy`'s);
    for 'default' or with the search off, 'map' on a CPU (one environment's J candidates already
    fill its cores, and its activations stay in cache) and 'vmap' on accelerators, which want all
    the work at once."""
    default = "map" if jax.default_backend() == "cpu" else "vmap"
    pin = planner_cfg.batching if n > 1 or planner_cfg.batching != "auto" else "default"  # one environment: the same
    tuner = tuner or autotune.Tuner()
    dots = _TRACED_DOTS.get() if pin == "auto" else "xla"
    candidates = {b: functools.partial(_timed_plan, model_cfg, planner_cfg, action_dim, n, b, dots)
                  for b in PLAN_BATCHING}
    # A batching timed with Eigen's dots is cached apart from one timed with XLA's default dots.
    key = _plan_key(model_cfg, planner_cfg, action_dim, n, " eigen dots" if dots == "eigen" else "")
    return tuner.choose("planner.batching", key, candidates, default, pin,
                        _decision_gflop(model_cfg, planner_cfg, action_dim), in_turns=True)


def cpu_dots(model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int,
             tuner: autotune.Tuner | None = None) -> str:
    """How XLA:CPU runs the matmuls of a decision (one of config.PLAN_CPU_DOTS): 'xla', its default
    (in jaxlib 0.10, YNNPACK library fusions, each of the planner's small matmuls on one core), or
    'eigen', XLA's own Eigen dots, which split each matmul over the cores (compiled with the XLA
    option `xla_cpu_experimental_ynn_fusion_type` empty).

    `planner_cfg.cpu_dots` when it names one; for 'auto', whichever decided one environment's
    action faster on this machine (`planet_jax.autotune`, cached per machine and sizes; the
    batched decisions use the same; no margin, since the candidates are the decision's program
    itself); for 'default', with the search off, on GPUs and TPUs, or with a jax or jaxlib that
    cannot take the option, 'xla'. Both give the same actions up to float32 rounding."""
    p = planner_cfg
    if jax.default_backend() != "cpu" or p.cpu_dots in ("default", "xla") or not _ynn_option_known():
        return "xla"
    candidates = {d: functools.partial(_timed_plan, model_cfg, p, action_dim, 1, "default", d)
                  for d in PLAN_CPU_DOTS}
    return (tuner or autotune.Tuner()).choose(
        "planner.cpu_dots", _plan_key(model_cfg, p, action_dim, 1), candidates, "xla", p.cpu_dots,
        _decision_gflop(model_cfg, p, action_dim), in_turns=True)


def compiler_options(model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int
                     ) -> dict[str, str] | None:
    """The XLA compiler options of `cpu_dots`'s choice, for `jax.jit(..., compiler_options=...)`:
    None for 'xla'."""
    return _dot_options(cpu_dots(model_cfg, planner_cfg, action_dim))


def _dot_options(dots: str) -> dict[str, str] | None:
    return {_YNN_OPTION: ""} if dots == "eigen" else None


@functools.cache
def _ynn_option_known() -> bool:
    """Whether this jax takes compiler options on `jax.jit` and its XLA:CPU knows `_YNN_OPTION` (a
    tiny program compiled with it, in a worker thread: outside any trace of the caller's)."""
    if "compiler_options" not in inspect.signature(jax.jit).parameters:
        return False

    def probe() -> bool:
        try:
            jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options={_YNN_OPTION: ""})
        except Exception:  # jaxlib raises its runtime error for an option it does not know
            return False
        return True

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(probe).result()


def _plan_key(model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int, n: int, extra: str = "") -> str:
    """The planner's shape key: sizes, settings, `extra` and the revision, last (`autotune.revision`)."""
    p, m = planner_cfg, model_cfg
    return (f"N{n} H{p.horizon} I{p.iterations} J{p.candidates} K{p.top_k} warm{int(p.warm_start)} a{action_dim} "
            f"{m.kind} h{m.h_size} s{m.s_size} hidden{m.hidden} reward{m.reward_hidden}x{m.reward_layers} "
            f"unroll{IMAGINE_UNROLL}" + ("" if p.matmul_dtype == "float32" else f" {p.matmul_dtype}")
            + extra + _PLAN_REVISION)


def _decision_gflop(model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int) -> float:
    """Forward GFLOP of one environment's decision: I J H steps of the transition and reward model.
    (Per environment: with little work each, the batching changes nothing worth timing either.)"""
    m, p = model_cfg, planner_cfg
    transition = 2 * ((m.s_size + action_dim) * m.hidden + 3 * (m.hidden + m.h_size) * m.h_size
                      + m.h_size * m.hidden + m.hidden * 2 * m.s_size)
    reward = 2 * (m.feature_size * m.reward_hidden + (m.reward_layers - 1) * m.reward_hidden ** 2)
    return p.iterations * p.candidates * p.horizon * (transition + reward) / 1e9


def _timed_plan(model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int, n: int,
                batching: str, dots: str = "xla") -> Callable[[], object]:
    """An autotune candidate: one decision for n environments with random parameters and states,
    compiled with `dots`'s compiler options."""
    mods = networks.modules(model_cfg)
    kt, kr, kk = jax.random.split(jax.random.PRNGKey(0), 3)
    h, s = autotune.random_array((n, model_cfg.h_size), 0), autotune.random_array((n, model_cfg.s_size), 1)
    # Initialised under jit: flax's init run op by op compiles each initialiser's draw apart.
    zeros = lambda size: np.zeros(size, np.float32)
    params = {"transition": jax.jit(mods["transition"].init)(kt, zeros(model_cfg.h_size), zeros(model_cfg.s_size),
                                                             zeros(action_dim))["params"],
              "reward": jax.jit(mods["reward"].init)(kr, zeros(model_cfg.feature_size))["params"]}
    cfg = dataclasses.replace(planner_cfg, batching=batching)
    plan = jax.jit(functools.partial(_plan, model_cfg=model_cfg, planner_cfg=cfg, action_dim=action_dim))
    state, keys = rssm.RSSMState(h, s), jax.random.split(kk, n)
    compiled = plan.lower(params, state, keys).compile(compiler_options=_dot_options(dots))
    return lambda: jax.block_until_ready(compiled(params, state, keys))


def make_planner(model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int
                 ) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """plan(params, state, key, prev_mean=None) -> (action, mean), jitted once per input shape.

    One environment: state.h (|h|,), state.s (|s|,), key one PRNG key, prev_mean (H, A) or None;
    returns action (A,) in [-1, 1] and the final CEM mean (H, A).
    N environments: state.h (N, |h|), state.s (N, |s|), key (N,) keys (jax.random.split(k, N)),
    prev_mean (N, H, A) or None; returns (N, A) and (N, H, A), equal to N single calls.
    prev_mean is used only when planner_cfg.warm_start is set (CEM then starts at shift_plan(prev_mean)).
    Matmul operands are planner_cfg.matmul_dtype (`networks.dense_operands`); on a CPU the matmuls
    run as `cpu_dots` picks, decided at the first call (or `lower`), which may measure it once.
    Raises ValueError (one line) for a matmul_dtype or cpu_dots that is not one of its choices.
    """
    check_choice("planner.matmul_dtype", planner_cfg.matmul_dtype, MATMUL_DTYPES)
    check_choice("planner.cpu_dots", planner_cfg.cpu_dots, ("auto", "default") + PLAN_CPU_DOTS)
    plan = functools.partial(_plan, model_cfg=model_cfg, planner_cfg=planner_cfg,
                             action_dim=action_dim)
    return jit_with_cpu_dots(plan, model_cfg, planner_cfg, action_dim)


def jit_with_cpu_dots(fun: Callable, model_cfg: ModelConfig, planner_cfg: PlannerConfig, action_dim: int
                      ) -> "CpuDotsJit":
    """`jax.jit(fun)` compiled with the `compiler_options` of the planner's `cpu_dots` choice, for a
    function whose matmuls are mostly a decision's (the planner, the acting policy). The choice is
    made at the first call or `lower`, not here, so that a first run measures it where it reports
    its other measurements (inside `autotune.reporting`)."""
    return CpuDotsJit(fun, (model_cfg, planner_cfg, action_dim))


class CpuDotsJit:
    """What `jit_with_cpu_dots` returns. Called from Python, it runs `jitted`: the function jitted
    with the choice's compiler options, made once. Called on traced values (inside another jit,
    `lax.scan`, `vmap`, `grad` or `jax.make_jaxpr`) it is a plain `jax.jit` of the function, whose
    program is the caller's to compile (jax takes compiler options only on the outermost jit; it
    may reuse a trace made for one way for the other, which can change the batching, not results).
    `lower`, `trace`, `eval_shape` and the other attributes of a jitted function go to `jitted`.
    Not picklable (nor was jax.jit's function of a closure)."""

    def __init__(self, fun: Callable, choice_args: tuple[ModelConfig, PlannerConfig, int]):
        self._fun, self._choice_args = fun, choice_args
        self._dots: str | None = None
        self._jitted: Callable | None = None
        self._lock = threading.Lock()
        # A function object of its own: jax keys its traces by function, not by compiler options
        # or `_TRACED_DOTS`, and would reuse `jitted`'s trace (timed for other dots) here.
        self._nested = jax.jit(functools.partial(fun))

    @property
    def jitted(self):
        with self._lock:  # one measurement however many threads call first
            if self._jitted is None:
                self._dots = cpu_dots(*self._choice_args)
                self._jitted = jax.jit(self._fun, compiler_options=_dot_options(self._dots))
        return self._jitted

    def __call__(self, *args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return self._nested(*args, **kwargs)
        try:
            return self._traced("__call__", *args, **kwargs)
        except ValueError as err:  # inside a caller's trace that the arguments did not show
            if "compiler_options" not in str(err):
                raise
        return self._nested(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._traced("lower", *args, **kwargs)

    def trace(self, *args, **kwargs):
        return self._traced("trace", *args, **kwargs)

    def eval_shape(self, *args, **kwargs):
        return self._traced("eval_shape", *args, **kwargs)

    def _traced(self, method: str, *args, **kwargs):
        """`jitted`'s `method` with `_TRACED_DOTS` set to its dots while it may trace."""
        jitted = self.jitted
        token = _TRACED_DOTS.set(self._dots)
        try:
            return getattr(jitted, method)(*args, **kwargs)
        finally:
            _TRACED_DOTS.reset(token)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()

    def __getattr__(self, name: str):
        # Private names (not set yet, as in a copy) and this class's own (an AttributeError raised
        # while making `jitted`) are not looked up on `jitted`: that would recurse.
        if name.startswith("_") or name in type(self).__dict__:
            raise AttributeError(name)
        return getattr(self.jitted, name)
