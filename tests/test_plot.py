"""experiments.plot: mean and spread across seeds, a PNG from run folders, one-line errors."""
import json

import numpy as np
import pytest

from experiments import plot
from planet_jax import config


def _write_run(folder, env, returns, test_every=2):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"env": env, "seed": 0}))
    (folder / "config.json").write_text(json.dumps(config.to_dict(config.tiny())))
    lines = []
    for episode, value in enumerate(returns, 1):
        record = {"episode": episode, "env_steps": 125 * episode, "train_return": value,
                  "image_loss": 100.0 / episode, "reward_loss": 1.0, "kl_loss": 3.0}
        if episode % test_every == 0:
            record.update(test_return=2 * value, test_return_std=0.5, test_returns=[2 * value - 0.5, 2 * value + 0.5])
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_curve_is_mean_and_range_over_seeds(tmp_path):
    a = [1.0, 2.0, 3.0, 4.0]
    b = [3.0, 6.0, 5.0]  # a shorter seed: episode 4 has one run
    _write_run(tmp_path / "a", "cartpole_balance", a)
    _write_run(tmp_path / "b", "cartpole_balance", b)
    runs = [plot.load_run(tmp_path / name)[1] for name in "ab"]
    train = plot.curve(runs, "train_return", "env_steps")
    np.testing.assert_array_equal(train["episode"], [1, 2, 3, 4])
    np.testing.assert_array_equal(train["x"], [125, 250, 375, 500])
    np.testing.assert_array_equal(train["mean"], [2.0, 4.0, 4.0, 4.0])
    np.testing.assert_array_equal(train["low"], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(train["high"], [3.0, 6.0, 5.0, 4.0])
    np.testing.assert_array_equal(train["count"], [2, 2, 2, 1])
    test = plot.curve(runs, "test_return")
    np.testing.assert_array_equal(test["episode"], [2, 4])
    np.testing.assert_array_equal(test["mean"], [(4.0 + 12.0) / 2, 8.0])


def test_resumed_run_repeating_an_episode_counts_its_last_record(tmp_path):
    _write_run(tmp_path / "a", "t", [1.0, 2.0])
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"episode": 2, "train_return": 7.0}) + "\n")
        f.write('{"episode": 3, "train_ret')  # cut short by a crash
    task, records = plot.load_run(tmp_path / "a")
    assert task == "t"
    np.testing.assert_array_equal(plot.curve([records], "train_return")["mean"], [1.0, 7.0])


def test_cli_writes_a_png_into_the_first_run(tmp_path, capsys):
    _write_run(tmp_path / "a", "cartpole_balance", [1.0, 2.0, 3.0])
    _write_run(tmp_path / "b", "cartpole_swingup", [0.5, 0.2, 0.1])
    assert plot.main(["--logdir", str(tmp_path / "a"), str(tmp_path / "b"), "--random-return", "1"]) == 0
    png = tmp_path / "a" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(png) in capsys.readouterr().out


def test_cli_names_a_folder_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot.main(["--logdir", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no metrics.jsonl" in err and "Traceback" not in err
