"""The run folder: create it, check it against the command, read it back, and lock it.

Everything a run needs to resume lives in its folder (`planet_jax.loop` lists the layout); this
module owns the two files that say what the run is (config.json, run.json) and the lock that keeps
a second process out while one runs there. Plain Python: no JAX.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from planet_jax import config

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_FILE = ".lock"
# Settings a resumed run may change: none alters what the stored model and replay mean.
RESUMABLE_CHANGES = (("train", "episodes"), ("train", "num_envs"), ("train", "cover_episode_ends"),
                     ("train", "graded_seed_actions"), ("train", "test_episodes"),
                     ("train", "max_skipped_updates"),
                     ("model", "fast_conv"), ("model", "conv_dtype"), ("model", "image_group"),
                     ("model", "conv_impl"), ("planner", "batching"),
                     ("planner", "cpu_dots"), ("planner", "matmul_dtype"))


class RunError(Exception):
    """A problem with the user's input or the run folder, reported in one line (exit code 2)."""


class ResumedWithChangesWarning(UserWarning):
    """A resume runs with RESUMABLE_CHANGES settings (other than train.episodes) that differ from
    those config.json holds (the first run's, which it keeps), e.g. a run started with
    planner.matmul_dtype=bfloat16 resumed without it."""


def _make_folder(logdir: Path) -> None:
    """Creates `logdir` if needed and checks that a file can be written in it; RunError (one
    line) if it is a file, cannot be created or is not writable."""
    if logdir.exists() and not logdir.is_dir():
        raise RunError(f"logdir {logdir} is a file, not a folder; use another --logdir")
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot write to logdir {logdir}: {err.strerror or err}") from None
    try:
        probe = logdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunError(f"cannot write to logdir {logdir}: {err.strerror or err}") from None


def _write_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temp file beside `path` and renames it over `path`, so that a kill leaves
    the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp_{path.name}_")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def prepare(logdir: str | Path, cfg: config.Config, env_name: str, seed: int) -> config.Config:
    """Creates the run folder or checks that it holds this run; returns the config to use.

    A new folder gets config.json and run.json ({"env", "seed"}), each written atomically. A folder
    with a run must hold the same env and seed and a config that differs from `cfg` only in
    RESUMABLE_CHANGES; `cfg` is then returned (the stored config with those changes), with a
    ResumedWithChangesWarning naming any of them, other than train.episodes, that config.json holds
    with another value.

    Raises:
      RunError (one line) if `logdir` is a file, cannot be created or written, holds a run whose
      files cannot be read, or holds another run (other env, seed or config).
    """
    logdir = Path(logdir)
    _make_folder(logdir)
    run_file, cfg_file = logdir / "run.json", logdir / "config.json"
    if run_file.exists():
        try:
            run = json.loads(run_file.read_text())
            written = json.loads(cfg_file.read_text())
            with warnings.catch_warnings():  # a resume runs the asked conv_impl, not the stored one
                warnings.simplefilter("ignore", config.StoredConvImplWarning)
                stored = config.from_dict(written)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise RunError(f"{logdir} holds a run whose run.json/config.json cannot be read ({err}); "
                           "use another --logdir") from None
        if run.get("env") != env_name or run.get("seed") != seed:
            raise RunError(f"{logdir} holds a run of env {run.get('env')} seed {run.get('seed')}, "
                           f"not {env_name} seed {seed}; use another --logdir")
        asked = config.to_dict(cfg)
        differences = [(section, name, old, asked[section][name])
                       for section, fields in config.to_dict(stored).items() for name, old in fields.items()
                       if asked[section][name] != old]
        refused = [f"{section}.{name} ({old!r} stored, {new!r} asked)"
                   for section, name, old, new in differences if (section, name) not in RESUMABLE_CHANGES]
        if refused:
            raise RunError(f"{logdir} holds a run with another config: {', '.join(refused[:3])}; "
                           "resume with the same flags or use another --logdir")
        # Only fields config.json holds: one written before a field existed did not choose its default.
        # The episode count is left out: extending a run is the usual resume.
        changed = [f"{section}.{name}={new!r} (config.json: {written[section][name]!r})"
                   for section, name, _, new in differences
                   if (section, name) != ("train", "episodes") and name in written.get(section, {})
                   and written[section][name] != new]
        if changed:
            warnings.warn(f"resuming {logdir} with {', '.join(changed)}; evaluate and model_check read "
                          "config.json", ResumedWithChangesWarning, stacklevel=2)
        return cfg
    try:
        # run.json last: it marks the folder as a run, so it never exists without config.json.
        _write_atomic(cfg_file, json.dumps(config.to_dict(cfg), indent=2))
        _write_atomic(run_file, json.dumps({"env": env_name, "seed": seed}))
    except OSError as err:
        raise RunError(f"cannot write the run files in {logdir}: {err.strerror or err}") from None
    return cfg


def read(logdir: str | Path) -> tuple[config.Config, str, int]:
    """(config, env name, seed) of an existing run folder.

    Raises:
      RunError (one line) if `logdir` is not a run folder, or its run.json/config.json cannot be
      read or hold an impossible config (`Config.validate`).
    """
    logdir = Path(logdir)
    try:
        run = json.loads((logdir / "run.json").read_text())
        cfg = config.from_dict(json.loads((logdir / "config.json").read_text())).validate()
        return cfg, run["env"], int(run["seed"])
    except (FileNotFoundError, NotADirectoryError):
        raise RunError(f"{logdir} is not a planet_jax run folder (no run.json/config.json)") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RunError(f"cannot read the run in {logdir}: {err}") from None


@contextlib.contextmanager
def lock(logdir: str | Path) -> Iterator[Path]:
    """Holds the run folder for this process: one run per folder. Yields the lock file's path.

    Takes an exclusive `fcntl.flock` on logdir/.lock (created with the folder if needed) and writes
    this process's id into it. The kernel releases a flock when its holder exits, however it exits,
    so a lock left by a killed process (kill -9, a crash, a lost node) never blocks the next run.
    The lock file itself stays. Where there is no fcntl (Windows) nothing is locked.

    Raises:
      RunError (one line) if another process holds the folder (naming its process id), or the
      folder is a file or cannot be created or written (`prepare`'s messages).
    """
    logdir = Path(logdir)
    _make_folder(logdir)
    path = logdir / LOCK_FILE
    if fcntl is None:
        yield path
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunError(f"cannot open the lock file {path}: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise RunError(f"{logdir} is in use by {who} (a run of this folder is going on); wait "
                           f"for it to finish or stop it, then run the same command again") from None
        except OSError as err:  # e.g. a network filesystem without locks
            raise RunError(f"cannot lock {path}: {err.strerror or err}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            # Clear the id before the lock goes, so that nobody reads a finished run's id as a holder.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
