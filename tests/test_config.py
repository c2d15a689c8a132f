"""planet_jax.config: presets, `--set` parsing and the checks of impossible values."""
import dataclasses
import math

import pytest

from planet_jax import config


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
def test_presets_are_valid_and_survive_a_json_round_trip(preset):
    cfg = config.PRESETS[preset]().validate()
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_new_train_fields_and_their_presets():
    assert config.paper().train.max_skipped_updates == 20 and config.paper().train.test_episodes == 5
    assert config.tiny().train.test_episodes == 2
    assert config.cpu().train.test_episodes == 5
    cfg = config.override(config.tiny(), ["train.max_skipped_updates=3", "train.test_episodes=7"])
    assert (cfg.train.max_skipped_updates, cfg.train.test_episodes) == (3, 7)


@pytest.mark.parametrize("assignment, message", [
    ("train.batch_size=many", "bad value for train.batch_size: expected an integer, got 'many'"),
    ("train.batch_size=2.5", "bad value for train.batch_size: expected an integer, got '2.5'"),
    ("loss.free_nats=three", "bad value for loss.free_nats: expected a number, got 'three'"),
    ("loss.free_nats=nan", "bad value for loss.free_nats: expected a finite number, got 'nan'"),
    ("optim.lr=inf", "bad value for optim.lr: expected a finite number, got 'inf'"),
    ("optim.clip_norm=-Infinity", "bad value for optim.clip_norm: expected a finite number"),
    ("model.fast_conv=maybe", "bad value for model.fast_conv: expected a boolean"),
    ("train.episodes", "is not of the form section.field=value"),
    ("trian.episodes=3", "unknown config section 'trian'"),
    ("train.episode=3", "unknown field 'episode' in train"),
])
def test_override_rejects_bad_values_in_one_line(assignment, message):
    with pytest.raises(ValueError) as info:
        config.override(config.tiny(), [assignment])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_override_parses_each_type():
    cfg = config.override(config.tiny(), ["train.batch_size=6", "loss.free_nats=2.5", "optim.lr=1e-4",
                                          "model.fast_conv=off", "model.kind=ssm"])
    assert cfg.train.batch_size == 6 and cfg.loss.free_nats == 2.5 and cfg.optim.lr == 1e-4
    assert cfg.model.fast_conv is False and cfg.model.kind == "ssm"


def _with(section, **changes):
    cfg = config.tiny()
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


@pytest.mark.parametrize("section, changes, message", [
    # Values that cannot come from --set but can from a config.json edited by hand.
    ("loss", {"free_nats": math.nan}, "loss.free_nats must be a finite number, got nan"),
    ("optim", {"eps": math.inf}, "optim.eps must be a finite number, got inf"),
    ("model", {"min_std": -math.inf}, "model.min_std must be a finite number, got -inf"),
    ("train", {"episodes": "ten"}, "train.episodes must be an integer, got 'ten'"),
    ("train", {"episodes": 10.0}, "train.episodes must be an integer, got 10.0"),
    ("model", {"fast_conv": 1}, "model.fast_conv must be a boolean, got 1"),
    ("train", {"max_skipped_updates": 0}, "train.max_skipped_updates must be positive, got 0"),
    ("train", {"test_episodes": -1}, "train.test_episodes must be positive, got -1"),
    ("optim", {"clip_norm": 0.0}, "optim.clip_norm must be positive, got 0.0"),
    ("loss", {"reward_scale": -1.0}, "loss.reward_scale must be >= 0, got -1.0"),
    ("optim", {"eps": -1e-4}, "optim.eps must be >= 0"),
    # Checks that were there before.
    ("train", {"batch_size": -1}, "train.batch_size must be positive, got -1"),
    ("planner", {"top_k": 100}, "planner.top_k (100) must not exceed planner.candidates (16)"),
    ("loss", {"overshooting_distance": 9}, "must not exceed train.chunk_length (8)"),
    ("model", {"bit_depth": 9}, "model.bit_depth must be in 1..8"),
    ("model", {"kind": "lstm"}, "model.kind must be one of rssm, ssm, rnn"),
    ("model", {"conv_dtype": "bfloat16", "fast_conv": False}, "needs model.fast_conv=true"),
    ("planner", {"matmul_dtype": "float16"}, "planner.matmul_dtype must be one of float32, bfloat16"),
    ("train", {"expl_noise": -0.1}, "train.expl_noise and loss.free_nats must be >= 0"),
])
def test_validate_names_the_impossible_value(section, changes, message):
    with pytest.raises(ValueError) as info:
        _with(section, **changes).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_int_where_a_float_is_expected_is_fine():
    """JSON writes 1000.0 back as 1000.0, but a hand-written 1000 is the same number."""
    assert _with("optim", clip_norm=1000).validate().optim.clip_norm == 1000
