"""Shared command-line handling: bad input becomes one line on stderr and exit code 2."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from pathlib import Path

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


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_env(environ: dict[str, str], thp_setting: str | None, libc_version: str | None
                   ) -> dict[str, str] | None:
    """The environment to restart with so that glibc's malloc backs large blocks with transparent
    huge pages, or None where that would change nothing.

    XLA:CPU takes its buffers from malloc, and glibc maps each large one afresh: at the paper's size a
    training step then faults in about 360,000 4-KiB pages (0.6 s of kernel time on one core).
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc ask for huge pages
    (madvise), which matters where the kernel's THP setting is `madvise`; with `always` the kernel
    does it anyway and with `never` it cannot. PLANET_JAX_HUGE_PAGES=0 keeps the environment as it is.
    thp_setting: the text of /sys/kernel/mm/transparent_hugepage/enabled; libc_version:
    os.confstr("CS_GNU_LIBC_VERSION"), e.g. "glibc 2.36".
    """
    if environ.get("PLANET_JAX_HUGE_PAGES", "1") == "0":
        return None
    if thp_setting is None or "[madvise]" not in thp_setting:
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", libc_version or "")
    if match is None or (int(match.group(1)), int(match.group(2))) < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


def restart_with_huge_pages() -> None:
    """Re-executes this command with `huge_pages_env`'s environment where it differs (Linux with
    glibc >= 2.35 and THP in `madvise` mode); otherwise returns. glibc reads its tunables only at
    start-up, so the entry points call this first, before JAX allocates anything."""
    try:
        thp = THP_SETTING.read_text()
        libc = os.confstr("CS_GNU_LIBC_VERSION")
    except (OSError, ValueError, AttributeError):  # not Linux, or no glibc
        return
    env = huge_pages_env(dict(os.environ), thp, libc)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
