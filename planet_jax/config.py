"""Frozen configuration dataclasses, one per component, with the paper's defaults.

Notation follows Hafner et al. 2019 (PlaNet): h deterministic state, s stochastic state, a action,
o observation, e embedding; H, I, J, K the planner's horizon, iterations, candidates and elites.
Presets: `paper()` (the defaults), `tiny()` (seconds-scale smoke runs and tests), `cpu()` (a real
learning run that fits a 2-core CPU). `override(cfg, ["model.h_size=64", ...])` sets any field.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

MODEL_KINDS = ("rssm", "ssm", "rnn")
# Operand types of the matmuls that accumulate in float32 (`ops.dot`): model.conv_dtype's and
# planner.matmul_dtype's choices.
MATMUL_DTYPES = ("float32", "bfloat16")
# Formulations of a stride-2 conv layer (planet_jax.ops, where each is described) and of the
# planner's batch over environments (planet_jax.planner); all compute the same function.
CONV_IMPLS = ("mixed", "xla", "conv", "im2col", "taps", "outer")
PLAN_BATCHING = ("map", "vmap")
PLAN_CPU_DOTS = ("xla", "eigen")
# The encoder's and decoder's stride-2 layers (planet_jax.networks), as model.conv_impl names them.
CONV_LAYERS = ("conv0", "conv1", "conv2", "conv3", "deconv1", "deconv2", "deconv3")
_CHOICE_WORDS = ("auto", "default")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "rssm"
    """Latent model: 'rssm' (deterministic + stochastic paths), 'ssm' (stochastic only) or 'rnn'
    (deterministic only), the paper's three variants (its Figure 2)."""
    h_size: int = 200
    """|h|: size of the deterministic state (GRU width)."""
    s_size: int = 30
    """|s|: size of the stochastic state (diagonal Gaussian)."""
    hidden: int = 200
    """Width of the hidden layers of the transition, prior and posterior networks."""
    cnn_depth: int = 32
    """Channels of the first encoder conv; the encoder uses 1, 2, 4, 8 times it, the decoder the reverse."""
    reward_hidden: int = 200
    """Width of the reward model's hidden layers."""
    reward_layers: int = 2
    """Number of hidden layers of the reward model (the paper's PyTorch-era default: 2)."""
    min_std: float = 0.1
    """Floor of the Gaussian std: std = softplus(x) + min_std."""
    bit_depth: int = 5
    """Bits kept per colour channel when preprocessing images (paper: 5)."""
    fast_conv: bool = True
    """Compute the encoder's stride-2 convolutions and the decoder's stride-2 transposed convolutions
    by exact reformulations (`planet_jax.ops`: the same parameters, results equal to float32
    rounding). False uses XLA's own (flax's) ops, whose gradients are slow on a CPU."""
    conv_dtype: str = "float32"
    """Operand type of those reformulated convolutions' matmuls, forward and backward: 'float32', or
    'bfloat16' (accumulated in float32; about twice as fast on CPUs with bf16 dot products and on
    TPUs, at about 2^-8 relative error per product). Needs fast_conv."""
    image_group: int = 0
    """In the training loss, run the encoder and decoder on this many sequences at a time, one group
    after another; B or more: the whole batch in one call. Same result either way. 0 means 2
    sequences on a CPU (less peak memory, working sets that stay in cache) and the whole batch on
    GPUs and TPUs, unless another group, measured once per machine and batch shape
    (`objective.image_group`, `planet_jax.autotune`, cached), is clearly faster."""
    conv_impl: str = "auto"
    """How the fast_conv layers compute their stride-2 convolutions (one of CONV_IMPLS, described in
    `planet_jax.ops`): 'auto' measures each layer's candidates once per machine and shape, the
    forward pass and the gradients apart (`planet_jax.autotune`, cached), and leaves 'mixed' only
    for one that takes at most 60% of its time; 'default' takes 'mixed' without measuring; a formulation's name
    pins it for every layer, and 'conv/auto' (forward/gradients) each pass apart;
    'conv0=taps,deconv3=conv/mixed' pins the named layers (CONV_LAYERS: encoder conv0..conv3, decoder
    deconv1..deconv3; another name, or a layer pinned twice, is an error in a new config and dropped
    with a warning from a stored one, `from_dict`; deconv0, on a 1x1 input, is one matmul with the dense
    layer before it, `ops.dense_conv_transpose_1x1`) and leaves the others 'auto'. Applies in the training loss.
    Same result every way, to float32 rounding."""

    @property
    def embed_size(self) -> int:
        """|e|: encoder output size; 8 * depth channels on a 2x2 grid (1024 at the paper's size)."""
        return 8 * self.cnn_depth * 4

    @property
    def feature_size(self) -> int:
        """Size of the (h, s) features read by the decoder and the reward model."""
        return self.h_size + self.s_size


@dataclasses.dataclass(frozen=True)
class LossConfig:
    free_nats: float = 3.0
    """KL terms below this many nats are not penalised: max(KL, free_nats)."""
    overshooting_distance: int = 1
    """D: latent overshooting over distances d = 1..D (paper eq. 7); D = 1 is the standard ELBO."""
    overshooting_beta: float = 1.0
    """beta_d for d > 1 (beta_1 = 1)."""
    global_kl_beta: float = 0.0
    """Weight of KL[q(s_t | o<=t) || N(0, I)] (the pre-camera-ready 'global prior', 0.1 there)."""
    reward_scale: float = 10.0
    """Scale of the reward log-likelihood (10 in the original TensorFlow code)."""
    image_scale: float = 1.0
    """Scale of the image log-likelihood."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    """Adam learning rate."""
    eps: float = 1e-4
    """Adam epsilon."""
    clip_norm: float = 1000.0
    """Global gradient-norm clip."""


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    horizon: int = 12
    """H: planning horizon (agent steps)."""
    iterations: int = 10
    """I: CEM refinement iterations."""
    candidates: int = 1000
    """J: action sequences sampled per iteration."""
    top_k: int = 100
    """K: elites refit per iteration."""
    warm_start: bool = False
    """Start each decision from the previous mean shifted by one step (the paper restarts at N(0, I))."""
    batching: str = "auto"
    """How one call plans N environments: 'map' (one after another, `lax.map`), 'vmap' (all at
    once), 'auto' (measured once per machine and size, `planet_jax.autotune`, cached) or 'default'
    (map on a CPU, vmap elsewhere, without measuring). Same actions every way."""
    cpu_dots: str = "auto"
    """How XLA:CPU runs the imagined rollouts' matmuls (`planner.cpu_dots`): 'xla' (its default: in
    jaxlib 0.10, YNNPACK library fusions, one core per matmul at the planner's sizes), 'eigen'
    (XLA's Eigen dots, which split each matmul over the cores), 'auto' (measured once per machine
    and size, `planet_jax.autotune`, cached) or 'default' ('xla' without measuring). Same actions
    up to float32 rounding; ignored on GPUs and TPUs."""
    matmul_dtype: str = "float32"
    """Operand type of the matmuls of the imagined rollouts that score the candidates (the
    transition's and the reward model's dense layers, `networks.dense_operands`): 'float32', or
    'bfloat16' (accumulated in float32, biases and states float32; faster on CPUs with bf16 dot
    products, at about 2^-8 relative error per operand, so predicted returns and actions differ
    slightly from float32's). The model is trained in float32 either way, and a resumed run may
    change it."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    episodes: int = 1000
    """Total episodes, seed episodes included (Table 1: 1000)."""
    seed_episodes: int = 5
    """S: episodes collected with uniform random actions before training."""
    collect_interval: int = 100
    """C: gradient updates per collected episode."""
    batch_size: int = 50
    """B: sequences per batch."""
    chunk_length: int = 50
    """L: frames per sequence."""
    graded_seed_actions: bool = False
    """Seed episode i of S (0-based) draws its uniform random actions from [-(i + 1) / S, (i + 1) / S]
    instead of [-1, 1] (`loop.seed_action_scales`), so that the seed data also holds nearly still
    control, which actions uniform over the whole box almost never keep up for several steps (the
    paper: [-1, 1] for every seed episode)."""
    cover_episode_ends: bool = False
    """Sample chunks so that an episode's first and last L - 1 frames are trained on at least as
    often as the rest (`Replay.sample(cover_ends=True)`); the paper's uniform chunk starts (False)
    train on the first frames of an episode up to L times less often than on its middle."""
    expl_noise: float = 0.3
    """Std of the Gaussian noise added to planned actions while collecting."""
    action_repeat: int = 0
    """R: environment steps per agent step; 0 takes the task's paper value (2 where none is known)."""
    episode_steps: int = 1000
    """Environment steps per episode (1000 in the Control Suite)."""
    test_every: int = 10
    """Run a noise-free test episode (with videos) after every this many collected episodes."""
    num_envs: int = 1
    """Environments collected at once, each in its own process."""
    test_episodes: int = 5
    """Noise-free episodes per evaluation; their mean and standard deviation are logged."""
    max_skipped_updates: int = 20
    """Stop the run after this many consecutive non-finite updates (each one skipped by the
    training step, `learner.make_train_step`)."""


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    planner: PlannerConfig = PlannerConfig()
    train: TrainConfig = TrainConfig()

    def validate(self) -> "Config":
        """Raise ValueError naming the first impossible value: a value of the wrong type, a float
        that is NaN or infinite, a size or count that is not positive, or settings that cannot
        hold together (planner.top_k above planner.candidates, D above L)."""
        _check_types(self)
        m, lo, o, p, t = self.model, self.loss, self.optim, self.planner, self.train
        check_choice("model.kind", m.kind, MODEL_KINDS)
        positive = {
            "model.h_size": m.h_size, "model.s_size": m.s_size, "model.hidden": m.hidden,
            "model.cnn_depth": m.cnn_depth, "model.reward_hidden": m.reward_hidden,
            "loss.overshooting_distance": lo.overshooting_distance,
            "planner.horizon": p.horizon, "planner.iterations": p.iterations,
            "planner.candidates": p.candidates, "planner.top_k": p.top_k,
            "train.episodes": t.episodes, "train.seed_episodes": t.seed_episodes,
            "train.collect_interval": t.collect_interval, "train.batch_size": t.batch_size,
            "train.chunk_length": t.chunk_length, "train.episode_steps": t.episode_steps,
            "train.test_every": t.test_every,
            "train.num_envs": t.num_envs, "train.test_episodes": t.test_episodes,
            "train.max_skipped_updates": t.max_skipped_updates,
            "optim.lr": o.lr, "optim.clip_norm": o.clip_norm,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 1 <= m.bit_depth <= 8:
            raise ValueError(f"model.bit_depth must be in 1..8, got {m.bit_depth}")
        if m.image_group < 0:
            raise ValueError(f"model.image_group must be >= 0, got {m.image_group}")
        check_choice("model.conv_dtype", m.conv_dtype, MATMUL_DTYPES)
        pins = _conv_impl_pins(m.conv_impl)
        if isinstance(pins, dict) and (unknown := sorted(set(pins) - set(CONV_LAYERS))):
            raise ValueError(f"model.conv_impl names no layer {', '.join(unknown)}: the stride-2 layers are "
                             f"{', '.join(CONV_LAYERS)}")
        check_choice("planner.batching", p.batching, _CHOICE_WORDS + PLAN_BATCHING)
        check_choice("planner.cpu_dots", p.cpu_dots, _CHOICE_WORDS + PLAN_CPU_DOTS)
        check_choice("planner.matmul_dtype", p.matmul_dtype, MATMUL_DTYPES)
        if m.conv_dtype != "float32" and not m.fast_conv:
            raise ValueError("model.conv_dtype=bfloat16 needs model.fast_conv=true")
        if p.top_k > p.candidates:
            raise ValueError(f"planner.top_k ({p.top_k}) must not exceed planner.candidates ({p.candidates})")
        if lo.overshooting_distance > t.chunk_length:
            raise ValueError(f"loss.overshooting_distance ({lo.overshooting_distance}) must not exceed "
                             f"train.chunk_length ({t.chunk_length})")
        if t.action_repeat < 0 or t.expl_noise < 0 or lo.free_nats < 0 or m.min_std <= 0:
            raise ValueError("train.action_repeat, train.expl_noise and loss.free_nats must be >= 0 "
                             "and model.min_std > 0")
        # A negative weight would maximise its term of the bound; a negative eps can divide by 0.
        non_negative = {"loss.overshooting_beta": lo.overshooting_beta,
                        "loss.global_kl_beta": lo.global_kl_beta, "loss.reward_scale": lo.reward_scale,
                        "loss.image_scale": lo.image_scale, "optim.eps": o.eps}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        return self


def _check_types(cfg: Config) -> None:
    """ValueError for a field whose value does not have its default's type (a config.json edited
    by hand, `from_dict` of a wrong document) or a float field that is NaN or infinite."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            name, value, default = f"{section.name}.{f.name}", getattr(sub, f.name), f.default
            if isinstance(default, bool):
                ok, kind = isinstance(value, bool), "a boolean"
            elif isinstance(default, int):
                ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif isinstance(default, float):
                ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
                if ok and not math.isfinite(value):
                    raise ValueError(f"{name} must be a finite number, got {value}")
            else:
                ok, kind = isinstance(value, str), "a string"
            if not ok:
                raise ValueError(f"{name} must be {kind}, got {value!r}")


def conv_impl_pin(spec: str, layer: str) -> str:
    """What `ModelConfig.conv_impl` = spec says for the layer named `layer`: 'auto', 'default', one
    of CONV_IMPLS, or two of those as 'forward/gradients' (e.g. 'conv/auto'), spaces removed.
    Raises ValueError naming the choices if spec is malformed."""
    pins = _conv_impl_pins(spec)
    return pins.get(layer, "auto") if isinstance(pins, dict) else pins


def _conv_impl_pins(spec: str) -> str | dict[str, str]:
    """spec's one choice for every layer, or its choices by layer name; ValueError if malformed or
    if a layer is pinned twice."""
    items = _conv_impl_items(spec)
    if isinstance(items, str):
        return items
    if twice := _pinned_twice(items):
        raise ValueError(f"model.conv_impl pins {', '.join(twice)} twice: {spec!r}")
    return dict(items)


def _conv_impl_items(spec: str) -> str | list[tuple[str, str]]:
    """spec's one choice for every layer, or its (layer name, choice) pins in the order written;
    ValueError if malformed."""
    words = _CHOICE_WORDS + CONV_IMPLS

    def choice(value: str) -> str | None:  # 'taps', or 'forward/gradients' as in 'conv/auto'
        parts = [part.strip() for part in value.split("/", 1)]
        return "/".join(parts) if all(part in words for part in parts) else None
    if whole := choice(spec):
        return whole
    items = []
    for item in spec.split(","):
        name, sep, impl = (part.strip() for part in item.partition("="))
        impl = choice(impl)
        if not sep or not name or not impl:
            raise ValueError(f"model.conv_impl must be one of {', '.join(words)}, two of them as "
                             f"'forward/gradients', or 'layer=choice,...' (e.g. conv0=taps,deconv3=conv/auto), "
                             f"got {spec!r}")
        items.append((name, impl))
    return items


def _pinned_twice(items: list[tuple[str, str]]) -> list[str]:
    names = [name for name, _ in items]
    return sorted({name for name in names if names.count(name) > 1})


def paper() -> Config:
    """The paper's settings (PLANET.md): RSSM 200/30, B = L = 50, C = 100, H=12 I=10 J=1000 K=100."""
    return Config()


def tiny() -> Config:
    """Small networks and short episodes: a full run of the real loop in about a minute on a CPU."""
    return Config(
        model=ModelConfig(h_size=16, s_size=4, hidden=16, cnn_depth=2, reward_hidden=16),
        planner=PlannerConfig(horizon=4, iterations=2, candidates=16, top_k=4),
        train=TrainConfig(episodes=4, seed_episodes=2, collect_interval=5, batch_size=4,
                          chunk_length=8, episode_steps=100, test_every=1, test_episodes=2),
    )


def cpu() -> Config:
    """A learning run that fits 2 CPU cores in about two hours (see README, 'Results').

    The paper's algorithm and model family with less compute per step: half-width convolutions,
    RSSM and reward MLP of 100 units, B x L = 16 x 32, C = 40, and CEM with J = 250, K = 25, I = 6.
    """
    return Config(
        model=ModelConfig(h_size=100, s_size=30, hidden=100, cnn_depth=16, reward_hidden=100),
        planner=PlannerConfig(horizon=12, iterations=6, candidates=250, top_k=25),
        train=TrainConfig(episodes=80, seed_episodes=5, collect_interval=40, batch_size=16,
                          chunk_length=32, test_every=5, test_episodes=5),
    )


PRESETS = {"paper": paper, "tiny": tiny, "cpu": cpu}


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """`value` if it is one of `choices`; otherwise ValueError (one line) naming the setting `name`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _parse_value(text: str, current: Any) -> Any:
    """`text` read as a value of `current`'s type; ValueError (one line) if it is not one, or if it is
    NaN or infinite for a float field."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true or false), got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        return value
    return text


def override(cfg: Config, assignments: Sequence[str]) -> Config:
    """Apply 'section.field=value' assignments, e.g. ['planner.candidates=500', 'loss.free_nats=2']."""
    for item in assignments:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        sections = {f.name for f in dataclasses.fields(cfg)}
        if section not in sections:
            raise ValueError(f"unknown config section {section!r} (choose from {', '.join(sorted(sections))})")
        sub = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(sub)}
        if name not in names:
            raise ValueError(f"unknown field {name!r} in {section} (choose from {', '.join(sorted(names))})")
        try:
            value = _parse_value(text.strip(), getattr(sub, name))
        except ValueError as err:
            raise ValueError(f"bad value for {key}: {err}") from None
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{name: value})})
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Fields that older run folders' config.json files hold and that no longer exist: the loop now
# checkpoints after every round, so that a stopped or killed run loses at most the round in progress.
RETIRED_FIELDS = {"train": ("checkpoint_every",)}


class StoredConvImplWarning(UserWarning):
    """A stored model.conv_impl mended as it ran (`from_dict`): its own category, so that a resume,
    which runs the conv_impl asked for and not the stored one, can silence it alone."""


def from_dict(data: dict) -> Config:
    """The Config of `to_dict`'s output (a config.json); fields in RETIRED_FIELDS are dropped and
    missing ones take their defaults. model.conv_impl pins that run folders written before such
    pins were rejected may hold are mended with a StoredConvImplWarning, as they ran: a pin of a layer not in
    CONV_LAYERS (never had an effect) is dropped, and of a layer pinned twice the last is kept.
    Raises TypeError for an unknown field."""
    kinds = {"model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
             "planner": PlannerConfig, "train": TrainConfig}
    sections = {k: {name: value for name, value in data[k].items() if name not in RETIRED_FIELDS.get(k, ())}
                for k in kinds if k in data}
    if isinstance(spec := sections.get("model", {}).get("conv_impl"), str):
        sections["model"]["conv_impl"] = _stored_conv_impl(spec)
    return Config(**{k: kinds[k](**fields) for k, fields in sections.items()})


def _stored_conv_impl(spec: str) -> str:
    """A stored conv_impl spec as it ran: without pins of unknown layers ('auto' if none is left),
    the last of a layer's pins (warning about either); a malformed spec is returned as it is, for
    `Config.validate` to reject."""
    try:
        items = _conv_impl_items(spec)
    except ValueError:
        return spec
    if isinstance(items, str):
        return spec
    pins, twice = dict(items), _pinned_twice(items)  # dict: a layer's last pin
    unknown = sorted(set(pins) - set(CONV_LAYERS))
    if not twice and not unknown:
        return spec
    notes = []
    if unknown:
        notes.append(f"ignoring the pin{'s' * (len(unknown) > 1)} of {', '.join(unknown)}, which "
                     f"name{'s' * (len(unknown) == 1)} no layer (the stride-2 layers are {', '.join(CONV_LAYERS)})")
    if twice:
        notes.append(f"{', '.join(twice)} pinned twice, keeping the last pin")
    warnings.warn(f"model.conv_impl {spec!r}: {'; '.join(notes)}", StoredConvImplWarning, stacklevel=3)
    return ",".join(f"{name}={impl}" for name, impl in pins.items() if name in CONV_LAYERS) or "auto"
