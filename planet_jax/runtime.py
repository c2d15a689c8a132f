"""The process around a run: the stop signal, memory handed back to the OS, huge pages, and the
compiled programs kept between runs.

Plain Python (JAX only to point its compilation cache at a folder): these act on the process
(signals, glibc's allocator, its environment, XLA's compiler), never on arrays.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import warnings
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


ENV_COMPILATION_CACHE = "PLANET_JAX_COMPILATION_CACHE"
# The bound on the folder's size (bytes) that jax's least-recently-used eviction keeps, unless the
# user set jax_compilation_cache_max_size: runs left going for months of code changes and
# configurations would otherwise fill the disk with programs never loaded again.
COMPILATION_CACHE_MAX_BYTES = 2 << 30


def use_compilation_cache() -> Path | None:
    """Keeps the programs XLA compiles (the training step, the planner) on disk with jax's persistent
    compilation cache, so that later runs on this machine, resumes included, load them instead of
    compiling again: seconds instead of tens of seconds at start-up, and none of the compiler's
    own peak memory (docs/performance.md). Returns the folder in use, or None when off.

    The folder is `autotune.cache_dir() / "xla" / <machine>` (one per `autotune.machine_id()`, so a
    home folder shared between machines never serves one machine's code to another). A folder the
    user gave jax (JAX_COMPILATION_CACHE_DIR or `jax_compilation_cache_dir`) is kept as it is and
    returned; with jax's cache disabled (`jax_enable_compilation_cache`) or
    $PLANET_JAX_COMPILATION_CACHE = 0/off/false/no it stays off. A folder that cannot be created or
    written leaves the cache off with one warning.
    The folder is bounded: jax evicts the least recently used programs past its
    `jax_compilation_cache_max_size` (bytes), which is COMPILATION_CACHE_MAX_BYTES unless the user
    set it: JAX_COMPILATION_CACHE_MAX_SIZE in the environment is kept whatever its value (-1
    unbounded), and so is a value set with `jax.config.update` (which wins over the environment),
    except jax's default -1, which reads as unset. A bound of 0 turns jax's cache off, and this
    returns None. With eviction on, jax writes an entry, then its access-time file; an entry
    without one is damaged (a run killed while writing it; jax never overwrites an entry, and a
    missing access time makes its eviction fail on every later write) or was written unbounded, so
    it is deleted here, under jax's lock of the folder, and compiled again once. If that lock or a
    deletion fails, one warning, and the cache stays on.
    Call it before the first compilation; the entry points in experiments/ do.
    """
    import jax

    from planet_jax import autotune

    if not jax.config.jax_enable_compilation_cache:
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if not autotune.switched_on(ENV_COMPILATION_CACHE) or jax.config.jax_compilation_cache_max_size == 0:
        return None
    folder = autotune.cache_dir() / "xla" / re.sub(r"[^\w.-]+", "_", autotune.machine_id())
    probe = folder / f".probe.{os.getpid()}"
    try:  # one warning here instead of jax's, one per program, every run
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        warnings.warn(f"compiled programs are not kept between runs: cannot write to {folder} ({err})")
        return None
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    if jax.config.jax_compilation_cache_max_size != -1:
        _delete_entries_without_access_time(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def _delete_entries_without_access_time(folder: Path, timeout: float = 10.0) -> None:
    """Deletes each '<key>-cache' file of jax's compilation cache in `folder` that has no
    '<key>-atime' beside it, holding the lock jax takes for its reads, writes and evictions
    (`jax._src.lru_cache.LRUCache`, the same file names), so that no entry being written is touched.
    Warns and deletes nothing more if the lock is not had within `timeout` seconds or a file
    operation fails."""
    import filelock

    try:
        with filelock.FileLock(folder / ".lockfile", timeout=timeout):
            for entry in folder.glob("*-cache"):
                if not entry.with_name(entry.name.removesuffix("-cache") + "-atime").exists():
                    entry.unlink(missing_ok=True)
    except OSError as err:  # filelock.Timeout included
        warnings.warn(f"compiled programs: entries without an access time (damaged, or written unbounded) "
                      f"may remain in {folder} ({type(err).__name__}: {err})")
