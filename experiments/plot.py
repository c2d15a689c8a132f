"""Learning curves of one or more runs as a PNG.

  python -m experiments.plot --logdir runs/cartpole_balance/0
  python -m experiments.plot --logdir runs/walker_walk/0 runs/walker_walk/1 runs/walker_walk/2 --random-return 40

Reads each run's metrics.jsonl and run.json. Runs of the same task are seeds of one curve: the line
is their mean and the band their min..max at each episode; a single run's test band is the mean
plus and minus the standard deviation of its test episodes. Three panels: train (faint) and test
(solid) return against episodes, the same against environment steps, and the loss terms (image,
reward, KL) against episodes. The PNG goes to --out, by default curves.png in the first run folder.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments import cli
from planet_jax import logger, rundir

LOSS_TERMS = ("image_loss", "reward_loss", "kl_loss")


def load_run(logdir: Path) -> tuple[str, list[dict]]:
    """(task name, records) of a run folder; ValueError naming what is missing or unreadable. A
    folder with metrics.jsonl but no readable run.json is named after itself."""
    metrics = logdir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{logdir} has no metrics.jsonl (is it a run folder?)")
    try:
        task = rundir.read(logdir)[1]
    except rundir.RunError:
        task = logdir.name
    return task, [r for r in logger.read_metrics(metrics) if "episode" in r]


def curve(runs: list[list[dict]], key: str, x_key: str = "episode") -> dict[str, np.ndarray]:
    """Mean, min and max of `key` over runs at each episode where any run has it.

    Returns {'episode', 'x' (mean of x_key there), 'mean', 'low', 'high', 'count'}; empty arrays if
    no run has `key`. A resumed run may repeat an episode: its last record counts.
    """
    values, xs = defaultdict(list), defaultdict(list)
    for records in runs:
        last = {r["episode"]: r for r in records if r.get(key) is not None}
        for episode, record in last.items():
            values[episode].append(float(record[key]))
            xs[episode].append(float(record.get(x_key, episode)))
    episodes = sorted(values)
    stack = lambda fn, d: np.array([fn(d[e]) for e in episodes], dtype=float)
    return {"episode": np.array(episodes, dtype=float), "x": stack(np.mean, xs),
            "mean": stack(np.mean, values), "low": stack(np.min, values), "high": stack(np.max, values),
            "count": stack(len, values)}


def plot(groups: dict[str, list[list[dict]]], out: Path, random_return: float | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (task, runs) in enumerate(sorted(groups.items())):
        color = colors[i % len(colors)]
        seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
        for ax, x_key in ((axes[0], "episode"), (axes[1], "env_steps")):
            for key, style, alpha in (("train_return", ":", 0.6), ("test_return", "-", 1.0)):
                c = curve(runs, key, x_key)
                if not len(c["x"]):
                    continue
                label = f"{task} {key.split('_')[0]} ({seeds})"
                ax.plot(c["x"], c["mean"], style, color=color, alpha=alpha, label=label,
                        marker="o" if key == "test_return" else None, markersize=3)
                if len(runs) > 1:
                    ax.fill_between(c["x"], c["low"], c["high"], color=color, alpha=0.15 * alpha)
                elif key == "test_return":  # one run: the spread of its test episodes
                    std = curve(runs, "test_return_std", x_key)
                    if len(std["x"]) == len(c["x"]):
                        ax.fill_between(c["x"], c["mean"] - std["mean"], c["mean"] + std["mean"],
                                        color=color, alpha=0.15)
        for term, style in zip(LOSS_TERMS, ("-", "--", ":")):
            c = curve(runs, term)
            if len(c["x"]):
                axes[2].plot(c["x"], c["mean"], style, color=color, label=f"{task} {term}")
    for ax, xlabel in zip(axes, ("episode", "environment steps", "episode")):
        ax.set_xlabel(xlabel)
        if xlabel == "episode":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no episode 6.2 on a short run
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set_ylabel("return")
        if random_return is not None:
            ax.axhline(random_return, color="gray", linestyle="--", label="random actions")
        ax.legend(fontsize=8)
    axes[2].set_ylabel("loss term (mean over the round's updates)")
    axes[2].set_yscale("log")
    if axes[2].lines:
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m experiments.plot", description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", nargs="+", required=True, type=Path, help="run folders")
    parser.add_argument("--out", type=Path, help="PNG path (default: curves.png in the first run folder)")
    parser.add_argument("--random-return", type=float, help="draw the random-action return as a line")
    args = parser.parse_args(argv)
    groups: dict[str, list[list[dict]]] = defaultdict(list)
    try:
        for logdir in args.logdir:
            task, records = load_run(logdir)
            groups[task].append(records)
        out = args.out or args.logdir[0] / "curves.png"
        plot(groups, out, args.random_return)
    except (ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
