"""What a run leaves behind: metrics.jsonl, TensorBoard scalars, and videos."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import imageio
import numpy as np


def _scalar(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class Logger:
    """Appends one JSON object per line to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, logdir: str | Path, tensorboard: bool = True):
        self.logdir = Path(logdir)
        self._file = open(self.logdir / "metrics.jsonl", "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
            self._writer = SummaryWriter(str(self.logdir / "tensorboard"), flush_secs=30)

    def write(self, record: dict[str, Any]) -> None:
        """record: flat dict with 'episode' and 'env_steps'; arrays are written as lists."""
        clean = {k: (np.asarray(v).tolist() if isinstance(v, (np.ndarray, np.generic)) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = int(record["env_steps"])
            for name, value in record.items():
                if name in ("episode", "env_steps"):
                    continue
                scalar = _scalar(value) if np.ndim(value) == 0 else None
                if scalar is not None:
                    self._writer.add_scalar(name, scalar, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file; a line cut short by a crash is ignored."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def write_video(path: str | Path, frames: np.ndarray, fps: int = 20) -> Path:
    """frames uint8 (T, H, W, 3) -> an mp4 file (written to a temporary name, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    with warnings.catch_warnings():  # ffmpeg runs as a subprocess (fork + exec), which JAX warns about
        warnings.filterwarnings("ignore", message="os.fork")
        imageio.mimwrite(tmp, list(frames), fps=fps, macro_block_size=1)
    tmp.replace(path)
    return path


def clock(seconds: float) -> str:
    """seconds as h:mm:ss (0:00:00 for negative times: time.time() may step back)."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def round_line(record: dict[str, Any], total: int) -> str:
    """One line for a logged round (`loop.run_round`'s record) of a run of `total` episodes: the
    episode count, then those of the round's mean training return, mean test return, mean loss
    (nats, the negative bound), environment steps per second of the round's whole time (updates
    and compiles included) and the run's wall time (h:mm:ss, all its invocations) that the record
    holds."""
    parts = [f"return {float(record['train_return']):.1f}"] if "train_return" in record else []
    parts += [f"{label} {float(record[k]):.{digits}f}" for k, label, digits in
              (("test_return", "test return", 1), ("loss", "loss", 2)) if k in record]
    if "steps_per_second" in record:  # the round's environment steps over all its time
        parts.append(f"{float(record['steps_per_second']):.1f} env steps/s overall")
    if "wall_time" in record:
        parts.append(clock(record["wall_time"]))
    return f"episode {int(record['episode'])}/{total}: " + ", ".join(parts)


# Progress bars need a terminal at least this wide, and a compiling bar this many columns beside
# its label (percentage, counter, clock and rate).
BAR_COLUMNS = 60
BAR_SPACE = 38


def _terminal_size(stream) -> os.terminal_size | None:
    """The size of the terminal `stream` writes to; None for a file, a pipe or a closed stream."""
    try:
        return os.get_terminal_size(stream.fileno()) if stream.isatty() else None
    except (AttributeError, OSError, ValueError):
        return None


def bars_fit(stream=None) -> bool:
    """Whether progress bars can be drawn on `stream` (default sys.stderr, where tqdm draws): a
    terminal at least BAR_COLUMNS wide with room for both bars. A log file or a pipe would keep
    every redraw, and tqdm draws nothing in a terminal that reports no size (some
    pseudo-terminals: `script` without a terminal in front)."""
    size = _terminal_size(sys.stderr if stream is None else stream)
    return size is not None and size.columns >= BAR_COLUMNS and size.lines >= 3


def _columns() -> int:
    """The width of the terminal tqdm draws on (stderr), else $COLUMNS or 80."""
    size = _terminal_size(sys.stderr)
    return size.columns if size and size.columns else shutil.get_terminal_size().columns


class Progress:
    """What a user watching a run sees: a bar over episodes whose time estimate comes from trained
    rounds only (seed episodes are far quicker), and a bar over the updates of the round in
    progress with its loss and seconds per update; neither estimate counts the first update's
    compile (their elapsed times count from its end), and while a speed choice is measured
    (`autotune.reporting`) the bar says which. A context manager.

    Without bars (a log file, a batch job), `lines` prints one line per logged round and per
    measured speed choice to stdout instead, e.g.
    "episode 12/80: return 345.2, test return 401.3, loss 12.50, 14.1 env steps/s overall, 0:10:32".

    Args:
      total: episodes the run will reach (train.episodes).
      done: episodes already collected.
      seed_episodes: S; rounds before S episodes exist do not count towards the estimate.
      enabled: False shows no bars (--no-progress, stderr not a terminal (`bars_fit`), or a
        process other than 0).
      lines: with enabled False, print the lines above (process 0 without bars).
    """

    def __init__(self, total: int, done: int, seed_episodes: int, enabled: bool = True, lines: bool = False):
        from tqdm import tqdm  # the bars only; imported here to keep logger's import light
        self._tqdm, self._enabled = tqdm, enabled
        self._lines = lines and not enabled
        self._total = total
        self._episodes = self._bar(total=total, initial=min(done, total), unit="ep", position=0)
        self._clock_from_trained = done >= seed_episodes
        self._updates = None
        self._compiling = False

    def _bar(self, **kwargs):
        return self._tqdm(disable=not self._enabled, dynamic_ncols=True, **kwargs)

    def _restart_episode_clock(self) -> None:
        # In place: a bar closed and opened again would leave its last line on the screen.
        bar, done = self._episodes, self._episodes.n
        postfix = bar.postfix
        bar.initial = 0  # reset draws n = 0 once: with the old initial that read as a negative rate
        bar.reset(total=self._total)  # the clock and the rate's averages; n back to 0
        bar.initial = bar.n = bar.last_print_n = done
        bar.postfix = postfix
        bar.refresh()

    def _open_updates(self, total: int, desc: str, initial: int = 0) -> None:
        if self._updates is not None:
            self._updates.close()
        self._updates = self._bar(total=total, initial=initial, unit="update", position=1, leave=False, desc=desc)

    def start_updates(self, count: int, compiling: bool = False) -> None:
        """A round of `count` updates begins (`compiling`: its first update compiles the train step).
        The first round restarts the episode bar's clock, so that its estimate of the time left
        comes from trained rounds alone."""
        if not self._clock_from_trained:
            self._restart_episode_clock()
            self._clock_from_trained = True
        self._compiling = compiling
        self._open_updates(count, "compiling the train step" if compiling else "training")

    def updated(self, metrics: dict[str, Any]) -> None:
        """One update finished; `metrics` are its (possibly still computing) metrics. The loss is
        read from the device only every tenth update, so the display does not wait on each step."""
        bar = self._updates
        if bar is None or bar.disable:
            return
        if self._compiling:
            # Both clocks restart after the compile (a minute or more on a first run), which would
            # otherwise stay in their estimates of the time left; the compiling bar is closed without
            # drawing its one update, whose estimate would count the compile.
            self._compiling = False
            self._open_updates(bar.total, "training", initial=1)
            self._restart_episode_clock()
            bar = self._updates
        else:
            bar.update(1)
        if bar.n % 10 == 0 or bar.n == bar.total:
            bar.set_postfix(loss=f"{float(metrics['loss']):.1f}")

    @contextlib.contextmanager
    def measuring(self, op: str, key: str):
        """An `autotune.Reporter`: the bar in front says which speed choice is being measured."""
        bar = self._updates if self._updates is not None else self._episodes
        if bar.disable:  # a disabled tqdm has no description
            if self._lines:
                print(f"measuring speed choices (once per machine): {op} {key}", flush=True)
            yield
            return
        desc = bar.desc
        # The counter and clock of a compiling bar must stay visible: the label gets what the
        # terminal has beside them, the choice's name first.
        label = f"measuring {op} {key} (once per machine)"
        room = max(BAR_COLUMNS, _columns()) - BAR_SPACE
        bar.set_description(label if len(label) <= room else label[:room - 3] + "...")
        try:
            yield
        finally:
            bar.set_description_str(desc)

    def finished_round(self, record: dict[str, Any]) -> None:
        """A round was logged: advance the episode bar to record['episode']."""
        if self._updates is not None:
            self._updates.close()
            self._updates = None
        self._episodes.update(int(record["episode"]) - self._episodes.n)
        self._episodes.set_postfix({k: round(float(record[k]), 1) for k in
                                    ("train_return", "test_return", "steps_per_second") if k in record})
        if self._lines:
            print(round_line(record, self._total), flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._updates is not None:
            self._updates.close()
        self._episodes.close()
