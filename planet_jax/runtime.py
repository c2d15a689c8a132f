"""The process runtime: what a planet_jax command asks of the operating system and the C library,
outside the algorithm (memory handed back to the OS)."""
from __future__ import annotations

import ctypes


def release_free_memory() -> bool:
    """Hands memory that the process has freed back to the OS (glibc's `malloc_trim(0)`); returns
    whether it could (False where the C library has no malloc_trim: macOS, Windows). Raises nothing.

    XLA's compiler frees most of what it allocates, but glibc keeps the freed pages resident, and
    the training step then allocates its own buffers on top of them; calling this between compiling
    and the first call keeps the compiler's garbage out of the run's peak memory.
    """
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no C library loadable this way (Windows)
        trim = None
    if trim is None:
        return False
    trim(0)
    return True
