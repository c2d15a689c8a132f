"""Shared command-line handling: bad input becomes one line on stderr and exit code 2."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


warnings.formatwarning = _one_line_warning


@contextlib.contextmanager
def usage_errors(parser):
    """Turns the library's input errors into `prog: error: ...` and exit code 2, without a traceback."""
    from planet_jax import checkpoint, loop

    try:
        yield
    except (ValueError, loop.RunError, checkpoint.CheckpointError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
