"""What a run leaves behind: metrics.jsonl, TensorBoard scalars, and videos."""
from __future__ import annotations

import json
import math
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
