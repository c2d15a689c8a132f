"""The entry points restart themselves with glibc's huge-page tunable where it helps (planet_jax.runtime)."""
import ast
import os
import subprocess
import sys

import pytest

from planet_jax import runtime

MADVISE = "always [madvise] never\n"
TUNABLE = runtime.HUGE_PAGES_TUNABLE


@pytest.mark.parametrize("environ, thp, libc, expected", [
    ({}, MADVISE, "glibc 2.36", TUNABLE),
    ({}, MADVISE, "glibc 2.35", TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE, "glibc 2.39",
     "glibc.malloc.arena_max=2:" + TUNABLE),
    ({}, MADVISE, "glibc 2.34", None),  # too old to know the tunable
    ({}, "[always] madvise never\n", "glibc 2.36", None),  # the kernel does it anyway
    ({}, "always madvise [never]\n", "glibc 2.36", None),  # the kernel will not
    ({}, None, "glibc 2.36", None),  # no THP in this kernel
    ({}, MADVISE, None, None),  # not glibc (musl, macOS)
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE, "glibc 2.36", None),  # the user chose
    ({"PLANET_JAX_HUGE_PAGES": "0"}, MADVISE, "glibc 2.36", None),
])
def test_huge_pages_env(environ, thp, libc, expected):
    env = runtime.huge_pages_env({"PATH": "/bin", **environ}, thp, libc)
    if expected is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == expected
        assert env["PATH"] == "/bin"  # the rest of the environment is kept


# Allocates 256 MiB with the C library's malloc, touches it, and reports how much of the process is
# backed by transparent huge pages.
PROBE = """
import ctypes, os, sys
from planet_jax import runtime
runtime.restart_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
block = libc.malloc(ctypes.c_size_t(size))
ctypes.memset(block, 1, size)
huge = [int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
print(repr((os.environ.get("GLIBC_TUNABLES", ""), huge[0] if huge else -1, sys.argv[1:])))
"""


def _probe(**extra_env):
    env = {**os.environ, **extra_env}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", PROBE, "kept"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_restart_with_huge_pages_backs_malloc_with_huge_pages():
    try:
        thp, libc = runtime.THP_SETTING.read_text(), os.confstr("CS_GNU_LIBC_VERSION")
    except (OSError, ValueError, AttributeError):
        pytest.skip("not Linux with glibc")
    if runtime.huge_pages_env({}, thp, libc) is None:
        pytest.skip(f"nothing to gain here (THP {thp.strip()!r}, {libc})")
    tunables, huge_kib, argv = _probe()
    assert tunables == TUNABLE and argv == ["kept"]  # restarted, with its arguments
    assert huge_kib >= 128 << 10  # at least half the block is in huge pages
    tunables, huge_kib, argv = _probe(PLANET_JAX_HUGE_PAGES="0")
    assert tunables == "" and argv == ["kept"]
    assert huge_kib < 128 << 10  # without the tunable, madvise mode gives malloc no huge pages
