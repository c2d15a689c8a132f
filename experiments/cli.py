"""Shared command-line handling: bad input becomes one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from planet_jax.runtime import restart_with_huge_pages  # noqa: F401 - the entry points' first call

os.environ.setdefault("MUJOCO_GL", "egl")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


warnings.formatwarning = _one_line_warning


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose own errors (an unknown flag, a bad choice or number) are one line on
    stderr with exit code 2, like the library's (`usage_errors`), instead of the usage block first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@contextlib.contextmanager
def usage_errors(parser):
    """Reports the library's errors in one line on stderr, without a traceback: bad input or run
    folder (ValueError, RunError) with exit code 2; a run that cannot go on (non-finite updates, a
    file that cannot be written, an environment that failed) with exit code 1."""
    from planet_jax import checkpoint, loop, replay, rollout, rundir

    try:
        yield
    except (ValueError, rundir.RunError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except (loop.NonFiniteError, replay.StorageError, checkpoint.CheckpointError, rollout.EnvError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
