"""Episode storage on disk and uniform sampling of fixed-length chunks (Algorithm 1's dataset D).

This is plain Python/numpy (no jit): files, a list of episodes in memory, a numpy Generator.

Episode convention. An episode of N agent steps is a dict of three arrays with N + 1 rows each:
  obs     uint8   (N+1, H, W, 3)  obs[0] is the reset frame, obs[i] the frame after agent step i.
  action  float32 (N+1, A)        action[i] is the action that led to obs[i]; action[0] is zeros.
  reward  float32 (N+1,)          reward[i] is the reward received on that step; reward[0] is 0.
So row t holds (o_t, a_{t-1}, r_t), the time convention of `planet_jax.rssm`.

On disk each episode is `episode_{index:06d}_{N+1}.npz` (np.savez_compressed), written to a temp
file in the same directory and renamed over the final name, so a crash never leaves a partial
file under a final name. Images stay uint8 in memory; only a sampled batch is ever copied.
"""
from __future__ import annotations

import copy
import errno
import os
import re
import tempfile
import warnings
from pathlib import Path

from typing import NamedTuple

import numpy as np

KEYS = ("obs", "action", "reward")
_DTYPES = {"obs": np.uint8, "action": np.float32, "reward": np.float32}
_NDIMS = {"obs": 4, "action": 2, "reward": 1}
_FILE_RE = re.compile(r"^episode_(\d+)_(\d+)\.npz$")

Episode = dict[str, np.ndarray]


class Batch(NamedTuple):
    """B chunks of L consecutive rows, as `Replay.sample` draws them and the train step reads them
    (numpy or JAX arrays): obs uint8 (B, L, H, W, 3) holds o_t, action float32 (B, L, |a|) a_{t-1},
    reward float32 (B, L) r_t."""
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray


class CorruptEpisodeError(ValueError):
    """An episode file that cannot be read completely (truncated, corrupt or inconsistent)."""


class StorageError(OSError):
    """An episode file could not be written (disk full, folder removed, permission lost).

    An OSError carrying the failed call's `errno` and the episode's `filename`, because it is one:
    the input was fine and the same write can succeed once the disk is fixed, and code that already
    handles OSError keeps handling it. Its text is one line naming the file and the reason.
    """

    def __init__(self, message: str, code: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno, self.filename = code, filename
        self.strerror = os.strerror(code) if code is not None else None

    def __str__(self) -> str:
        return self.args[0]


def validate_episode(episode: Episode) -> int:
    """Checks keys, dtypes, ranks and equal lengths; returns the number of rows N + 1.

    Raises:
      ValueError naming the first problem found.
    """
    keys = set(episode)
    if keys != set(KEYS):
        raise ValueError(f"episode keys must be {sorted(KEYS)}, got {sorted(keys)}")
    for key in KEYS:
        value = episode[key]
        if not isinstance(value, np.ndarray):
            raise ValueError(f"episode[{key!r}] must be a numpy array, got {type(value).__name__}")
        if value.dtype != _DTYPES[key]:
            raise ValueError(f"episode[{key!r}] must have dtype {np.dtype(_DTYPES[key])}, "
                             f"got {value.dtype}")
        if value.ndim != _NDIMS[key]:
            raise ValueError(f"episode[{key!r}] must have rank {_NDIMS[key]}, "
                             f"got shape {value.shape}")
    if episode["obs"].shape[-1] != 3:
        raise ValueError(f"episode['obs'] must have 3 channels, got shape {episode['obs'].shape}")
    lengths = {key: len(episode[key]) for key in KEYS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"episode arrays must have the same number of rows, got {lengths}")
    rows = lengths["obs"]
    if rows < 1:
        raise ValueError("episode must have at least one row (the reset frame)")
    return rows


def episode_filename(index: int, rows: int) -> str:
    """`episode_{index:06d}_{rows}.npz`, where rows = N + 1."""
    return f"episode_{index:06d}_{rows}.npz"


def save_episode(directory, episode: Episode, index: int) -> Path:
    """Writes `episode` atomically to `directory/episode_{index:06d}_{rows}.npz`; returns the path.

    The data goes to a temp file in the same directory, is flushed to disk, then renamed over the
    final name, so the final name only ever holds a whole episode.

    Raises:
      ValueError: the episode is inconsistent (`validate_episode`) or `index` is negative.
      StorageError: the file cannot be written (e.g. ENOSPC, EACCES, EROFS); the temp file is removed,
        so nothing partial is left, and files written before are untouched.
    """
    rows = validate_episode(episode)
    if index < 0:
        raise ValueError(f"episode index must be >= 0, got {index}")
    directory = Path(directory)
    path = directory / episode_filename(index, rows)
    tmp_name = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".tmp_episode_", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{key: episode[key] for key in KEYS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        if tmp_name is not None:
            try:
                os.remove(tmp_name)
            except OSError:  # already gone, or its folder is
                pass
        if isinstance(err, OSError):
            code = errno.errorcode.get(err.errno, "")
            reason = (err.strerror or str(err) or type(err).__name__) + (f" ({code})" if code else "")
            raise StorageError(f"cannot write episode {path}: {reason}", err.errno, str(path)) from err
        raise
    return path


def load_episode(path) -> Episode:
    """Reads one episode file.

    Raises:
      CorruptEpisodeError (one line, naming the file) if it is truncated, corrupt or incomplete.
    """
    path = Path(path)
    try:
        # Opening the file ourselves closes it even when np.load fails on a broken zip.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            episode = {key: data[key] for key in data.files}
        validate_episode(episode)
    except Exception as e:  # zip, zlib, pickle-refusal, missing keys: all mean an unusable file
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CorruptEpisodeError(f"corrupt episode file {path}: {detail}") from e
    return episode


def _file_index(path: Path) -> int | None:
    match = _FILE_RE.match(path.name)
    return int(match.group(1)) if match else None


def episode_files(directory: str | Path) -> list[tuple[int, Path]]:
    """(index, path) of each episode file in `directory` by its name, in index order (not read)."""
    files = []
    for path in Path(directory).glob("episode_*.npz"):
        index = _file_index(path)
        if index is not None:
            files.append((index, path))
    return sorted(files)


class Replay:
    """Episodes on disk in `directory`, mirrored in memory, sampled as uniform chunks.

    Chunk starts are uniform over all valid (episode, start) pairs of the whole buffer, so an
    episode of R rows is chosen in proportion to R - L + 1 for chunk length L. Uniform starts put
    row t < L of an episode in a chunk only (t + 1) / L times as often as a row in the middle (row
    0 only in chunks that start there); `sample(..., cover_ends=True)` evens that out.

    Episodes that end early (a terminal state, e.g. Gymnasium's `terminated`) are stored with the
    rows they have, and a chunk never crosses an episode end. An episode shorter than the chunk
    length is kept on disk but skipped by sampling, not padded: padding would teach the model
    frames and rewards the environment never produced.
    """

    def __init__(self, directory, seed: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rng = np.random.default_rng(seed)
        self._episodes: list[Episode] = []
        self._rows: list[int] = []
        self._next_index = 0

    @property
    def episodes(self) -> list[Episode]:
        """The stored episodes, in the order they were loaded or added (a new list, same arrays)."""
        return list(self._episodes)

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def num_steps(self) -> int:
        """Agent steps stored: sum over episodes of rows - 1."""
        return sum(self._rows) - len(self._rows)

    def load(self) -> int:
        """Loads every episode file in the directory in index order; returns how many loaded.

        A corrupt file is skipped with a warning. New episodes are numbered after the highest
        index found, corrupt files included, so none is overwritten.
        """
        loaded = 0
        for index, path in episode_files(self.directory):
            self._next_index = max(self._next_index, index + 1)
            try:
                episode = load_episode(path)
            except CorruptEpisodeError as e:
                warnings.warn(f"skipping {e}", stacklevel=2)
                continue
            self._keep(episode)
            loaded += 1
        return loaded

    def _check_compatible(self, episode: Episode) -> None:
        if not self._episodes:
            return
        first = self._episodes[0]
        for key in ("obs", "action"):
            if episode[key].shape[1:] != first[key].shape[1:]:
                raise ValueError(f"episode[{key!r}] rows have shape {episode[key].shape[1:]}, "
                                 f"but stored episodes have {first[key].shape[1:]}")

    def _keep(self, episode: Episode) -> None:
        rows = validate_episode(episode)
        self._check_compatible(episode)
        self._episodes.append({key: episode[key] for key in KEYS})
        self._rows.append(rows)

    def add(self, episode: Episode) -> Path:
        """Saves `episode` under the next index and keeps it in memory; returns its path."""
        validate_episode(episode)
        self._check_compatible(episode)
        path = save_episode(self.directory, episode, self._next_index)
        self._next_index += 1
        self._keep(episode)
        return path

    def sample(self, batch_size: int, chunk_length: int, cover_ends: bool = False
               ) -> Batch:
        """Draws B chunks of L consecutive rows, each from inside one episode.

        With `cover_ends`, starts are drawn uniformly from -(L - 1) .. R - 1 for an episode of R rows
        and clamped to the valid 0 .. R - L, so an episode is chosen in proportion to R + L - 1 and
        every row is in a chunk at least as often as a row in the middle (row t < L: (L + t) / L
        times as often). A chunk starts at the episode's first frame L times as often as at any
        middle row: the state the agent's filter starts from at every reset.

        Episodes with fewer than L rows are never drawn (see the class docstring).

        Returns:
          a Batch: obs uint8 (B, L, H, W, 3), action float32 (B, L, A), reward float32 (B, L).
        Raises:
          ValueError (one line) for a non-positive size, an empty replay, or no episode of L rows.
        """
        if batch_size <= 0 or chunk_length <= 0:
            raise ValueError(f"batch_size and chunk_length must be positive, "
                             f"got {batch_size} and {chunk_length}")
        if not self._episodes:
            raise ValueError("cannot sample from an empty replay")
        rows = np.asarray(self._rows)
        valid = rows >= chunk_length
        if not valid.any():
            raise ValueError(f"no episode has at least chunk_length={chunk_length} rows (longest has "
                             f"{max(self._rows)}); shorter episodes are skipped, not padded: lower "
                             "train.chunk_length or collect longer episodes")
        # Candidate starts per episode: 0 .. R - L, or -(L - 1) .. R - 1 before clamping.
        extra = chunk_length - 1 if cover_ends else 0
        starts_per_episode = np.where(valid, rows - chunk_length + 1 + 2 * extra, 0)
        ends = np.cumsum(starts_per_episode)
        flat = self._rng.integers(int(ends[-1]), size=batch_size)
        which = np.searchsorted(ends, flat, side="right")
        starts = flat - (ends[which] - starts_per_episode[which]) - extra
        starts = np.clip(starts, 0, rows[which] - chunk_length)
        return Batch(*(np.stack([self._episodes[e][key][s:s + chunk_length] for e, s in zip(which, starts)])
                       for key in KEYS))

    def state_dict(self) -> dict:
        """The sampling generator's state, JSON-serialisable."""
        return {"rng": copy.deepcopy(self._rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        """Restores the sampling stream saved by `state_dict`."""
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
