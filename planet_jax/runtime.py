"""The process around a run: the stop signal, memory handed back to the OS, and huge pages.

Plain Python, no JAX: these act on the process (signals, glibc's allocator, its environment), never
on arrays.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
from pathlib import Path


class StopFlag:
    """Set by SIGINT/SIGTERM while active (a context manager); the loop checks it between steps so
    that it never stops inside a jitted call. A second Ctrl-C while the flag is set stops at once
    (KeyboardInterrupt).

    Attributes:
      signal_name: 'SIGINT' or 'SIGTERM' once set, else None.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def set(self, name: str = "request") -> None:
        """Asks the loop to stop as a signal would (for callers that embed the loop)."""
        self.signal_name = name

    def __bool__(self) -> bool:
        return self.signal_name is not None


def release_free_memory() -> bool:
    """Hands memory that the process has freed back to the OS (glibc's `malloc_trim(0)`); returns
    whether it could (False where the C library has no malloc_trim: macOS, Windows).

    XLA's compiler frees most of what it allocates, but glibc keeps the freed pages resident; the
    training step then allocates its own buffers on top of them.
    """
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no C library loadable this way (Windows)
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_env(environ: dict[str, str], thp_setting: str | None, libc_version: str | None
                   ) -> dict[str, str] | None:
    """The environment to restart with so that glibc's malloc backs large blocks with transparent
    huge pages, or None where that would change nothing.

    XLA:CPU takes its buffers from malloc, and glibc maps each large one afresh in 4-KiB pages, so
    a training step spends kernel time faulting pages in (docs/performance.md).
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc ask for huge pages
    (madvise), which matters where the kernel's THP setting is `madvise`; with `always` the kernel
    does it anyway and with `never` it cannot. PLANET_JAX_HUGE_PAGES=0 keeps the environment as it is.

    Args:
      environ: the current environment.
      thp_setting: the text of /sys/kernel/mm/transparent_hugepage/enabled, or None.
      libc_version: os.confstr("CS_GNU_LIBC_VERSION"), e.g. "glibc 2.36", or None.
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
