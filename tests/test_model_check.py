"""planet_jax.model_check and its command line: predictions against an independent path, the
simulator side against the task's known physics, and the CLI on a run folder with a checkpoint."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import model_check as model_check_cli
from planet_jax import checkpoint, config, learner, model_check, networks, planner, rssm, rundir
from tests.conftest import imagine_by_hand

ENV = "cartpole_balance"


def test_rank_correlation_against_the_textbook_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=9), rng.normal(size=9)
    rank = lambda v: np.argsort(np.argsort(v))
    d = rank(x) - rank(y)
    n = len(x)
    assert model_check.rank_correlation(x, y) == pytest.approx(1 - 6 * np.sum(d ** 2) / (n * (n ** 2 - 1)))
    assert model_check.rank_correlation(x, 2 * x + 1) == pytest.approx(1.0)
    assert model_check.rank_correlation(x, -x) == pytest.approx(-1.0)


def test_probe_sequences():
    seqs = model_check.probe_sequences(5, 2, 3, np.random.default_rng(0))
    assert list(seqs) == ["zero", "+1", "-1", "alternating", "random0", "random1", "random2"]
    assert all(a.shape == (5, 2) and a.dtype == np.float32 for a in seqs.values())
    np.testing.assert_array_equal(seqs["alternating"][:, 0], [1, -1, 1, -1, 1])
    assert np.abs(seqs["random0"]).max() <= 1 and not np.array_equal(seqs["random0"], seqs["random1"])


def _model(kind):
    """What imagination reads (transition and reward model; the conv networks would only cost
    time to initialise) and a random belief state."""
    cfg = dataclasses.replace(config.tiny().model, kind=kind)
    mods, k_transition, k_reward = networks.modules(cfg), *jax.random.split(jax.random.PRNGKey(0))
    h, s, a = jnp.zeros(cfg.h_size), jnp.zeros(cfg.s_size), jnp.zeros(2)
    params = {"transition": mods["transition"].init(k_transition, h, s, a)["params"],
              "reward": mods["reward"].init(k_reward, jnp.zeros(cfg.feature_size))["params"]}
    state = rssm.RSSMState(jax.random.normal(jax.random.PRNGKey(1), (cfg.h_size,)),
                           jax.random.normal(jax.random.PRNGKey(2), (cfg.s_size,)))
    return cfg, params, state


def test_expected_rewards_average_prior_rollouts_stepped_by_hand():
    """Each of the samples replayed as a plain loop of prior steps with the documented keys."""
    cfg, params, state = _model("rssm")
    N, H, samples = 2, 3, 3
    actions = jax.random.uniform(jax.random.PRNGKey(3), (N, H, 2), minval=-1, maxval=1)
    key = jax.random.PRNGKey(4)
    got = np.asarray(model_check.expected_rewards(params, cfg, state, actions, key, samples))
    assert got.shape == (N, H)
    want = np.zeros((N, H))
    for k_sample in jax.random.split(key, samples):
        for n, k_seq in enumerate(jax.random.split(k_sample, N)):
            for t, (s, _) in enumerate(imagine_by_hand(params, cfg, state, actions[n], k_seq)):
                want[n, t] += float(networks.reward(params, cfg, rssm.features(s))) / samples
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    one = np.asarray(model_check.expected_rewards(params, cfg, state, actions, key, 1))
    assert not np.allclose(got, one)  # the prior's noise matters, so the average is not one rollout


def test_expected_rewards_equal_the_planners_score_for_a_deterministic_model():
    """With the deterministic 'rnn' variant every prior rollout is the same, so the per-step
    predictions summed must equal what the planner scores the same sequences with."""
    cfg, params, state = _model("rnn")
    actions = jax.random.uniform(jax.random.PRNGKey(3), (6, 4, 2), minval=-1, maxval=1)
    per_step = model_check.expected_rewards(params, cfg, state, actions, jax.random.PRNGKey(4), 3)
    assert per_step.shape == (6, 4)
    scored = planner.predicted_return(params, cfg, state, actions, jax.random.PRNGKey(5))
    np.testing.assert_allclose(np.asarray(per_step).sum(1), np.asarray(scored), rtol=1e-5, atol=1e-5)


def test_true_rewards_follow_the_balance_physics():
    """From the upright start, no force keeps the full reward (8 per agent step at repeat 8) while a
    constant full push tips the pole; the same sequence twice gives the same rewards."""
    zero, push = np.zeros((6, 1)), np.ones((6, 1))
    rewards, frames = model_check.true_rewards(ENV, 3, 8, 1000, np.zeros((2, 1)),
                                               np.stack([zero, push, zero]))
    assert frames.shape == (3, 64, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(rewards[0], rewards[2])
    assert rewards[0].min() > 7.9
    assert rewards[1, 0] < 6.5 and rewards[1, -1] < rewards[1, 0]


def _run_with_checkpoint(logdir):
    """A run folder whose checkpoint holds freshly initialised parameters (no training)."""
    cfg = config.tiny()
    rundir.prepare(logdir, cfg, ENV, 0)
    state = learner.init_train_state(cfg, 1, jax.random.PRNGKey(0))
    ckpt = checkpoint.Checkpointer(logdir / "checkpoints")
    ckpt.save(1, {"train": state, "key": jax.random.PRNGKey(1)}, {"updates": 0, "wall_time": 0.0})
    ckpt.close()
    return cfg


def test_cli_prints_a_table_per_start(tmp_path, capsys):
    cfg = _run_with_checkpoint(tmp_path / "run")
    code = model_check_cli.main(["--logdir", str(tmp_path / "run"), "--starts", "2", "--random", "1",
                                 "--samples", "2", "--warmup", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"H = {cfg.planner.horizon}" in out and "start 1 (seed 2)" in out
    assert out.count("  zero ") == 2 and out.count("  random0 ") == 2
    assert "mean rank correlation" in out


@pytest.mark.parametrize("argv, message", [
    (["--starts", "0"], "--starts must be positive"),
    (["--warmup", "-1"], "--warmup and --random must be >= 0"),
    (["--warmup", "12"], "longer than an episode"),
])
def test_cli_usage_errors(tmp_path, capsys, argv, message):
    _run_with_checkpoint(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        model_check_cli.main(["--logdir", str(tmp_path / "run")] + argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_cli_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        model_check_cli.main(["--logdir", str(tmp_path)])
    assert exit_info.value.code == 2 and "not a planet_jax run folder" in capsys.readouterr().err
