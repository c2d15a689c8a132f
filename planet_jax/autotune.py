"""Choosing among exact, interchangeable implementations by timing them on the machine in use.

Several of planet_jax's speed choices depend on the machine more than on the model: how a stride-2
convolution layer is computed (`ops.CONV_IMPLS`), how many sequences the encoder and decoder see at
a time (`objective.image_group`), how XLA:CPU runs the planner's matmuls (`planner.cpu_dots`),
and whether the planner maps or vmaps over environments (`planner.PLAN_BATCHING`). Like XLA's and
cuDNN's autotuners, `choose` times each candidate once for the shapes in use (the planner's, whole
decisions, taking turns), when a function is traced or (the planner's matmuls) first called, in a
worker thread outside any trace, remembers the timings, and takes the fastest (or the default,
unless the fastest saves at least the op's `min_gain` of its time; decided again from the
remembered timings on every call, so a changed rule needs no new measurement):

  cache   one JSON file, `cache_dir() / "autotune.json"`: {"version": 2, "entries": {machine:
          {op: {shape key: {"choice": name, "seconds": {name: s}}}}}}, where machine is
          `machine_id()` (CPU model or accelerator kind, core count, jax version), so a cache that
          travels with a home folder to another machine or jax is not reused there. The folder is
          $PLANET_JAX_CACHE_DIR, else $XDG_CACHE_HOME/planet_jax, else ~/.cache/planet_jax. A
          corrupt or unreadable file is ignored (with an AutotuneWarning) and rewritten; an
          unwritable folder only loses the memory of the choice. Writes hold an flock on
          `autotune.json.lock` beside it, so processes measuring at once keep each other's entries.
          A shape key that ends in ' r<N>' was timed with revision N of the candidates' code
          (`revision`); writing it drops the same key's earlier revisions, and `choices` leaves
          out entries superseded so.
  search  on unless $PLANET_JAX_AUTOTUNE is 0/off/false/no; when off, or when the work is too
          small for timings to mean anything (`MIN_SEARCH_GFLOP`), each op takes its fixed default
          (the rule planet_jax used before it measured). Config values pin a choice per op
          (`ModelConfig.conv_impl`, `ModelConfig.image_group`, `PlannerConfig.cpu_dots`,
          `PlannerConfig.batching`).

Every candidate computes the same function (tests/test_ops.py, test_objective.py and
test_planner.py check each against the plain flax/XLA version), so a choice changes speed and
memory only, never results beyond float32 rounding.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import json
import math
import os
import platform
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

try:
    import fcntl
except ImportError:  # Windows: writes are not locked
    fcntl = None

ENV_CACHE_DIR = "PLANET_JAX_CACHE_DIR"
ENV_SEARCH = "PLANET_JAX_AUTOTUNE"
CACHE_FILE = "autotune.json"
CACHE_VERSION = 2  # 2: a choice keeps the default unless another candidate saves `min_gain`

# Below this much work per call (GFLOP, forward) a candidate's time is mostly dispatch and noise on
# any machine, so the default is taken without measuring (this keeps tiny test models from searching).
MIN_SEARCH_GFLOP = 0.05

# A candidate whose warm-up call takes this many timing budgets is not called again (`time_candidate`).
SLOW_WARM_UP = 3.0
# Nor is one whose warm-up call takes FAR_BEHIND times the fastest time so far, and at least
# FAR_BEHIND_MIN_S: it cannot come within the margins `Tuner.choose` asks for.
FAR_BEHIND = 5.0
FAR_BEHIND_MIN_S = 0.1

# A candidate builder compiles the candidate and returns a zero-argument callable that runs it once,
# on concrete inputs, and blocks until it is done (a first call that compiled would be timed too).
Builder = Callable[[], Callable[[], Any]]
# A timer gets the candidate's name, its builder and the fastest time per call measured so far among
# the other candidates (in the candidate's own calls; inf for the first), and returns its time per
# call in seconds.
Timer = Callable[[str, Builder, float], float]
# Times several candidates together: gets {name: builder}, returns {name: seconds per call}.
Turns = Callable[[Mapping[str, Builder]], Mapping[str, float]]
# Told what is about to be measured (op, shape key); the context it returns is open while it is.
Reporter = Callable[[str, str], ContextManager]
_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("autotune_reporter", default=None)


@contextlib.contextmanager
def reporting(reporter: Reporter):
    """Within this block, every measurement that `Tuner.choose` makes (not a choice read from the
    cache) runs inside `reporter(op, key)`: how a progress display says why a first run's compile
    takes minutes."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def random_array(shape: tuple[int, ...], seed: int, uniform: tuple[float, float] | None = None,
                 scale: float = 1.0) -> Any:
    """A float32 jax array of `shape` to time candidates on: normal with standard deviation `scale`,
    or uniform between low and high for uniform=(low, high); the same for the same seed. Drawn by
    numpy, since jax.random compiles a program for every new shape, which a first search would pay
    for each candidate's inputs (so would `jnp.asarray`; `jax.device_put` compiles nothing)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    if uniform is None:
        return jax.device_put(np.float32(scale) * rng.standard_normal(shape, dtype=np.float32))
    low, high = uniform
    return jax.device_put(np.float32(low) + np.float32(high - low) * rng.random(shape, dtype=np.float32))


class AutotuneWarning(UserWarning):
    """The cache could not be read or written; choices are then measured again or defaulted."""


def cache_dir() -> Path:
    """The folder of the choice cache: $PLANET_JAX_CACHE_DIR, $XDG_CACHE_HOME/planet_jax or
    ~/.cache/planet_jax (XDG base directory convention)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "planet_jax"


def switched_on(variable: str) -> bool:
    """False when the environment variable is 0, off, false or no (any case, spaces ignored); True
    when it is anything else or unset."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "off", "false", "no")


def search_enabled() -> bool:
    """False when $PLANET_JAX_AUTOTUNE is 0, off, false or no (then every op takes its default)."""
    return switched_on(ENV_SEARCH)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_id() -> str:
    """What a measured choice is valid for: the default device's kind (the CPU model on a CPU) with
    the number of devices or cores, and the jax version, e.g. 'cpu AMD EPYC x2 jax 0.10.2'."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        device = f"cpu {cpu_model()} x{os.cpu_count()}"
    else:
        device = f"{backend} {jax.devices()[0].device_kind} x{jax.device_count()}"
    return f"{device} jax {jax.__version__}"


def time_candidate(name: str, build: Builder, fastest: float = math.inf, budget_s: float = 1.0,
                   reps: int = 5) -> float:
    """Seconds per call of a candidate: built (compiled) and called once (warm-up), then the minimum
    over up to `reps` timed calls, stopping once `budget_s` is spent. The minimum, since on a shared
    machine other work only ever adds time. A warm-up call that alone takes more than
    `SLOW_WARM_UP` times `budget_s`, or more than FAR_BEHIND times `fastest` (the best of the
    candidates timed before it) and FAR_BEHIND_MIN_S, is the measurement: such candidates (XLA:CPU's
    strided-conv gradients, 0.1 to seconds per call where the reformulations take milliseconds)
    cost a first run minutes if called again, and are too far behind for a first call's extra cost
    (page faults) to matter, which it would for candidates near the budget or the fastest."""
    del name
    run = build()
    t0 = time.perf_counter()
    run()
    warm_up = time.perf_counter() - t0
    if warm_up > SLOW_WARM_UP * budget_s or warm_up > max(FAR_BEHIND * fastest, FAR_BEHIND_MIN_S):
        return warm_up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_in_turns(builders: Mapping[str, Builder], budget_s: float = 1.0, reps: int = 5,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per call of each candidate, timed in turns: all built (compiled) and called once
    (warm-up), then rounds in which each is called once, the order rotated every round, until each
    has `reps` timed calls or `budget_s` per candidate is spent (at least one round); each
    candidate's minimum. Timed one after another (`time_candidate`), candidates of similar cost
    see different spells of a shared machine, and a load that comes or goes between them decides
    the choice; taking turns, they see the same. All candidates are held at once, so this is for a
    few whole programs (the planner's), not for many layers; and every candidate gets a timed call
    after its warm-up, however slow (no `SLOW_WARM_UP` cut-off), since turns are about candidates
    of similar cost. `clock` is for tests."""
    runs = {name: build() for name, build in builders.items()}
    for run in runs.values():
        run()
    names, times = list(runs), {name: [] for name in runs}
    start = clock()
    for i in range(reps):
        if i and clock() - start >= budget_s * len(names):
            break
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = clock()
            runs[name]()
            times[name].append(clock() - t0)
    return {name: min(t) for name, t in times.items()}


@dataclasses.dataclass(frozen=True)
class Tuner:
    """Measures and remembers choices. `Tuner()` reads the environment (cache folder, search switch)
    and times with `time_candidate` (or `time_in_turns`); tests pass a folder, a switch and fake
    timers."""
    path: Path = dataclasses.field(default_factory=lambda: cache_dir() / CACHE_FILE)
    search: bool = dataclasses.field(default_factory=search_enabled)
    timer: Timer = time_candidate
    machine: str = dataclasses.field(default_factory=machine_id)
    turns: Turns = time_in_turns

    def choose(self, op: str, key: str, candidates: Mapping[str, Builder], default: str,
               pin: str = "auto", gflop: float | None = None,
               calls: Mapping[str, float] | None = None, min_gain: float = 0.0, in_turns: bool = False) -> str:
        """The candidate to use for `op` at shape `key` (a string naming the shapes and settings).

        pin: 'auto' (the fastest by the cached timings if every candidate was timed, else measure,
        cache and return the fastest, see below), 'default' (`default` without measuring), or a candidate's name
        (returned as is). `default` is also taken when searching is off or `gflop` (work per call)
        is below MIN_SEARCH_GFLOP. calls: how many calls of each candidate the op needs (default 1);
        the least total time wins if it is at most (1 - min_gain) times the default's, else the
        default: where candidates are timed apart from the computation they serve, small measured
        gains need not carry over, so such ops ask for a margin. in_turns: the candidates are timed
        taking turns (`turns`, `time_in_turns`) instead of one after another (`timer`), for a few
        whole programs of similar cost.
        Raises ValueError naming the choices for a pin or default that is not a candidate.
        Measuring runs in a worker thread, so this may be called while jax traces a function.
        """
        names = list(candidates)
        if default not in names:
            raise ValueError(f"default {default!r} of {op} is not one of its candidates {', '.join(names)}")
        if pin not in ("auto", "default", *names):
            raise ValueError(f"unknown {op} choice {pin!r}: choose from auto, default, {', '.join(names)}")
        if pin != "auto":
            return default if pin == "default" else pin
        if not self.search or (gflop is not None and gflop < MIN_SEARCH_GFLOP):
            return default
        entry = _dict(_dict(self._read().get(self.machine)).get(op)).get(key)
        stored = entry.get("seconds") if isinstance(entry, dict) else None
        # Cached timings are decided again under today's rule (min_gain, calls); a shape timed before
        # a candidate existed (one missing from its timings) is measured again.
        cached = isinstance(stored, dict) and set(names) <= set(stored) and all(_is_timing(stored[n]) for n in names)
        calls = {n: (calls or {}).get(n, 1.0) for n in names}
        if cached:
            seconds = {n: float(stored[n]) for n in names}
        else:
            reporter = _REPORTER.get()
            with reporter(op, key) if reporter else contextlib.nullcontext(), \
                    concurrent.futures.ThreadPoolExecutor(1) as pool:  # outside any jax trace
                measure = (lambda: dict(self.turns(candidates))) if in_turns else (
                    lambda: self._measure(candidates, calls))
                seconds = pool.submit(measure).result()
        total = {n: seconds[n] * calls[n] for n in names}
        fastest = min(names, key=lambda n: (total[n], n != default))
        choice = fastest if total[fastest] <= (1 - min_gain) * total[default] else default
        if not cached:
            self._write(op, key, {"choice": choice, "seconds": {n: round(s, 6) for n, s in seconds.items()}})
        elif entry.get("choice") != choice:  # so that reports (`choices`) show what is used
            self._write(op, key, {**entry, "choice": choice}, quiet=True)
        return choice

    def _measure(self, candidates: Mapping[str, Builder], calls: Mapping[str, float]) -> dict[str, float]:
        """Each candidate's seconds per call, timed one after another; each timer call is told the
        fastest so far, in the candidate's own calls (the op's time over its number of calls)."""
        seconds: dict[str, float] = {}
        for name, build in candidates.items():
            fastest = min((seconds[m] * calls[m] for m in seconds), default=math.inf) / calls[name]
            seconds[name] = float(self.timer(name, build, fastest))
        return seconds

    def _read(self) -> dict:
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as err:
            warnings.warn(f"autotune cache {self.path} unreadable ({err}); measuring again", AutotuneWarning)
            return {}
        try:
            data = json.loads(text)
            if isinstance(data.get("version"), int) and 0 < data["version"] < CACHE_VERSION:
                raise ValueError(f"made by an older planet_jax, cache version {data['version']}")
            if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a version-{CACHE_VERSION} autotune cache")
            return data["entries"]
        except (ValueError, AttributeError) as err:
            warnings.warn(f"autotune cache {self.path} ignored ({err}); it will be rewritten", AutotuneWarning)
            return {}

    def _write(self, op: str, key: str, entry: dict, quiet: bool = False) -> None:
        """Adds one entry; the read-modify-write holds an flock on a lock file beside the cache, so
        processes writing at once (test workers, benchmark processes) keep each other's entries.
        quiet: no warning if the folder cannot be written (an entry that can be worked out again)."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(f"{self.path.name}.lock"), "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
                entries = self._read()
                mine = entries[self.machine] = _dict(entries.get(self.machine))
                by_key = mine[op] = _dict(mine.get(op))  # a hand-edited non-dict is rewritten
                base, rev = revision(key)
                # Earlier revisions of this key only: code of an older revision that shares the
                # file (another checkout, a second environment) keeps its own entries.
                for old in [k for k in by_key if k != key and revision(k)[0] == base and revision(k)[1] < rev]:
                    del by_key[old]
                by_key[key] = entry
                tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True))
                os.replace(tmp, self.path)  # atomic: a reader without the lock sees the old or the new file
        except OSError as err:
            if not quiet:
                warnings.warn(f"autotune cache {self.path} not written ({err}); the choice is not remembered",
                              AutotuneWarning)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def revision(key: str) -> tuple[str, int]:
    """(shape key without its revision, revision): a key may end in ' r<N>' (N a positive integer
    without leading zeros) naming the revision of the candidates' code it was timed with (ops' and
    objective's `_*REVISION`); a key without one is revision 1."""
    match = _REVISION_RE.search(key)
    return (key[:match.start()], int(match.group(1))) if match else (key, 1)


_REVISION_RE = re.compile(r" r([1-9][0-9]*)$")


def _current(by_key: Any) -> Any:
    """The entries of one op without those superseded by a later revision of the same key: timings
    of code that has since changed, which today's choices never read (a hand-edited value that is
    not a dict of entries is returned as it is)."""
    if not isinstance(by_key, dict):
        return by_key
    revisions = {key: revision(key) for key in by_key}
    latest: dict[str, int] = {}
    for base, rev in revisions.values():
        latest[base] = max(latest.get(base, rev), rev)
    return {key: entry for key, entry in by_key.items() if latest[revisions[key][0]] == revisions[key][1]}


def _is_timing(value: Any) -> bool:
    """A usable cached time: a finite positive number (not a bool, NaN or a hand-edited string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def choices(tuner: Tuner | None = None) -> dict[str, dict[str, Any]]:
    """This machine's cached choices, {op: {shape key: {'choice', 'seconds'}}} (for reports),
    without entries superseded by a later revision of their key."""
    tuner = tuner or Tuner()
    return {op: _current(by_key) for op, by_key in _dict(tuner._read().get(tuner.machine)).items()}
