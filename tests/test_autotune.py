"""Measured choices: the cache (write, read, corrupt, per machine), pins, the off switch, and the
four users (conv layers, image groups, the planner's matmuls and batching). Timers are fakes, so no test
depends on how fast anything runs."""
import contextlib
import dataclasses
import json
import math
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planet_jax import autotune, config, networks, objective, ops, planner
from tests.conftest import tiny_model


class FakeTimer:
    """Seconds per candidate name from a table; records which candidates it was asked to time."""

    def __init__(self, seconds):
        self.seconds, self.timed = seconds, []

    def __call__(self, name, build, fastest):
        self.timed.append(name)
        return self.seconds[name]


def never_timed(name, build, fastest):
    raise AssertionError(f"{name} was timed")


CANDIDATES = {"a": lambda: None, "b": lambda: None, "c": lambda: None}


def tuner(tmp_path, timer, search=True, machine="test machine", turns=None):
    """A Tuner on a folder of tmp_path; candidates timed in turns go to `turns`, by default to the
    same fake timer, one by one."""
    turns = turns or (lambda builders: {name: timer(name, build, math.inf) for name, build in builders.items()})
    return autotune.Tuner(tmp_path / "cache" / "autotune.json", search, timer, machine, turns)


class FakeMachine:
    """A clock and candidates for it: each call of candidate n costs cost[n] seconds, plus `drift`
    for every call made before it (a machine that slows down while it is timed), plus `spike` for
    every `period`-th call (another process waking up); `log` is the order of the calls."""

    def __init__(self, cost, drift=0.0, spike=0.0, period=0):
        self.cost, self.drift, self.spike, self.period = cost, drift, spike, period
        self.now, self.log = 0.0, []

    def clock(self):
        return self.now

    def builders(self):
        def build(name):
            def run():
                n = len(self.log)
                self.now += self.cost[name] + self.drift * n + (self.spike if self.period and n % self.period == 0 else 0.0)
                self.log.append(name)
            return lambda: run
        return {name: build(name) for name in self.cost}


def test_time_in_turns_rotates_the_order_and_is_fairer_than_one_after_another_on_a_drifting_machine(monkeypatch):
    m = FakeMachine({"a": 1.0, "b": 1.0, "c": 0.5}, drift=0.01)
    seconds = autotune.time_in_turns(m.builders(), budget_s=100.0, reps=3, clock=m.clock)
    # built and warmed up once each, then three rounds, each starting one candidate later
    assert m.log == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]
    # each candidate's minimum: its first timed call (the machine only slows down)
    assert seconds == pytest.approx({"a": 1.0 + 0.03, "b": 1.0 + 0.04, "c": 0.5 + 0.05})
    # a and b cost the same: in turns their times differ by one call's drift, timed one after
    # another by `time_candidate` (a warm-up and three timed calls each) by four
    m2 = FakeMachine({"a": 1.0, "b": 1.0}, drift=0.01)
    monkeypatch.setattr(autotune.time, "perf_counter", m2.clock)
    sequential = {name: autotune.time_candidate(name, build, budget_s=100.0, reps=3)
                  for name, build in m2.builders().items()}
    assert sequential["b"] - sequential["a"] == pytest.approx(0.04)
    assert seconds["b"] - seconds["a"] == pytest.approx(0.01)


def test_time_in_turns_shares_a_periodic_load_among_equal_candidates():
    # every third call is slowed: in rounds of three without rotation it would always hit the same
    # candidate, whose every call would be slow; rotated, each candidate meets it once
    m = FakeMachine({"a": 1.0, "b": 1.0, "c": 1.0}, spike=0.5, period=3)
    seconds = autotune.time_in_turns(m.builders(), budget_s=100.0, reps=3, clock=m.clock)
    assert seconds == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})


def test_time_in_turns_stops_at_the_budget_after_at_least_one_round():
    m = FakeMachine({"a": 2.0, "b": 3.0})
    assert autotune.time_in_turns(m.builders(), budget_s=1.0, reps=5, clock=m.clock) == {"a": 2.0, "b": 3.0}
    assert m.log == ["a", "b", "a", "b"]  # warm-ups, one round: over the budget already
    m = FakeMachine({"a": 0.1, "b": 0.1})
    autotune.time_in_turns(m.builders(), budget_s=0.25, reps=5, clock=m.clock)
    assert len(m.log) == 2 + 2 * 3  # 0.5 s for both: rounds start at 0, 0.2 and 0.4 s


def test_choose_times_in_turns_only_where_asked(tmp_path):
    turned = []
    turns = lambda builders: turned.append(sorted(builders)) or {"a": 3.0, "b": 1.0, "c": 2.0}
    t = tuner(tmp_path, never_timed, turns=turns)
    assert t.choose("op", "k1", CANDIDATES, "a", in_turns=True) == "b"
    assert turned == [["a", "b", "c"]]
    assert autotune.choices(t)["op"]["k1"] == {"choice": "b", "seconds": {"a": 3.0, "b": 1.0, "c": 2.0}}
    with pytest.raises(AssertionError, match="was timed"):  # without in_turns: the one-by-one timer
        t.choose("op", "k2", CANDIDATES, "a")


def test_measures_once_writes_the_cache_and_reads_it_back(tmp_path):
    timer = FakeTimer({"a": 3.0, "b": 1.0, "c": 2.0})
    assert tuner(tmp_path, timer).choose("op", "shape 1", CANDIDATES, "a") == "b"
    assert timer.timed == ["a", "b", "c"]
    data = json.loads((tmp_path / "cache" / "autotune.json").read_text())
    entry = data["entries"]["test machine"]["op"]["shape 1"]
    assert entry == {"choice": "b", "seconds": {"a": 3.0, "b": 1.0, "c": 2.0}}
    # A new tuner (a new process) finds it without timing; another shape or machine measures again.
    assert tuner(tmp_path, never_timed).choose("op", "shape 1", CANDIDATES, "a") == "b"
    other = FakeTimer({"a": 1.0, "b": 2.0, "c": 3.0})
    assert tuner(tmp_path, other).choose("op", "shape 2", CANDIDATES, "c") == "a"
    assert tuner(tmp_path, other, machine="another").choose("op", "shape 1", CANDIDATES, "c") == "a"
    assert autotune.choices(tuner(tmp_path, never_timed))["op"].keys() == {"shape 1", "shape 2"}


def test_an_entry_timed_with_a_later_revision_of_the_code_replaces_the_earlier_ones(tmp_path):
    timer = lambda: FakeTimer({"a": 3.0, "b": 1.0, "c": 2.0})
    for machine, op, key in [("test machine", "op", "x8 forward"), ("test machine", "op", "x8 forward r2"),
                             ("test machine", "op", "x9 forward"), ("test machine", "other", "x8 forward"),
                             ("another", "op", "x8 forward")]:
        tuner(tmp_path, timer(), machine=machine).choose(op, key, CANDIDATES, "a")
    assert autotune.revision("x8 forward r2") == ("x8 forward", 2)
    assert autotune.revision("x8 forward") == ("x8 forward", 1)
    assert autotune.revision("x8 forward r12") == ("x8 forward", 12)
    assert autotune.revision("x8 forward r0") == ("x8 forward r0", 1)
    assert autotune.revision("looped unroll3") == ("looped unroll3", 1)
    entries = lambda: json.loads((tmp_path / "cache" / "autotune.json").read_text())["entries"]
    assert entries()["test machine"]["op"].keys() == {"x8 forward r2", "x9 forward"}
    tuner(tmp_path, timer()).choose("op", "x8 forward r3", CANDIDATES, "a")
    mine = entries()["test machine"]
    assert mine["op"].keys() == {"x8 forward r3", "x9 forward"} and mine["other"].keys() == {"x8 forward"}
    assert mine["op"]["x8 forward r3"] == {"choice": "b", "seconds": {"a": 3.0, "b": 1.0, "c": 2.0}}
    assert entries()["another"]["op"].keys() == {"x8 forward"}  # other machines' entries are theirs
    # Code of an older revision sharing the file keeps its entry, and reads it back; reports
    # leave it out as superseded.
    tuner(tmp_path, timer()).choose("op", "x8 forward r2", CANDIDATES, "a")
    assert entries()["test machine"]["op"].keys() == {"x8 forward r2", "x8 forward r3", "x9 forward"}
    assert tuner(tmp_path, never_timed).choose("op", "x8 forward r2", CANDIDATES, "a") == "b"
    assert autotune.choices(tuner(tmp_path, never_timed))["op"].keys() == {"x8 forward r3", "x9 forward"}


def test_a_reporter_hears_of_each_measurement_while_it_runs_and_not_of_cached_choices(tmp_path):
    heard, open_ = [], []

    @contextlib.contextmanager
    def reporter(op, key):
        heard.append((op, key))
        open_.append(True)
        yield
        open_.pop()

    def timer(name, build, fastest):
        assert open_, "timed outside the reporter's context"
        return {"a": 3.0, "b": 1.0, "c": 2.0}[name]

    with autotune.reporting(reporter):
        assert tuner(tmp_path, timer).choose("op", "shape 1", CANDIDATES, "a") == "b"
        assert tuner(tmp_path, never_timed).choose("op", "shape 1", CANDIDATES, "a") == "b"  # cached
        assert tuner(tmp_path, never_timed).choose("op", "shape 2", CANDIDATES, "a", pin="c") == "c"
    assert tuner(tmp_path, FakeTimer({"a": 3.0, "b": 1.0, "c": 2.0})).choose("op", "shape 3", CANDIDATES, "a") == "b"
    assert heard == [("op", "shape 1")] and not open_  # nothing heard outside the block


def test_a_choice_cached_before_a_candidate_existed_is_measured_again(tmp_path):
    two = {"a": CANDIDATES["a"], "b": CANDIDATES["b"]}
    assert tuner(tmp_path, FakeTimer({"a": 2.0, "b": 1.0})).choose("op", "s", two, "a") == "b"
    assert tuner(tmp_path, never_timed).choose("op", "s", two, "a") == "b"
    timer = FakeTimer({"a": 2.0, "b": 1.0, "c": 0.5})
    assert tuner(tmp_path, timer).choose("op", "s", CANDIDATES, "a") == "c"
    assert timer.timed == ["a", "b", "c"]
    assert tuner(tmp_path, never_timed).choose("op", "s", CANDIDATES, "a") == "c"
    # An entry whose timings are not a table (edited by hand) is measured again, not a crash.
    path = tmp_path / "cache" / "autotune.json"
    data = json.loads(path.read_text())
    data["entries"]["test machine"]["op"]["s"]["seconds"] = 5.0
    path.write_text(json.dumps(data))
    assert tuner(tmp_path, FakeTimer({"a": 1.0, "b": 2.0, "c": 3.0})).choose("op", "s", CANDIDATES, "c") == "a"


def test_a_candidate_slower_than_the_budget_in_its_warm_up_call_is_not_called_again():
    calls = []

    def build(seconds):
        def run():
            calls.append(seconds)
            time.sleep(seconds)
        return lambda: run

    assert autotune.time_candidate("slow", build(0.05), budget_s=0.01, reps=5) >= 0.05
    assert calls == [0.05]  # its warm-up, over 3 budgets, is its measurement
    calls.clear()
    assert autotune.time_candidate("near", build(0.03), budget_s=0.02, reps=5) >= 0.03
    assert calls == [0.03, 0.03]  # over the budget but within 3 of it: warm-up, then one timed call
    calls.clear()
    assert 0.001 <= autotune.time_candidate("fast", build(0.001), budget_s=10.0, reps=3) < 0.05
    assert calls == [0.001] * 4  # warm-up, then `reps` timed calls within the budget
    calls.clear()
    # Far behind the fastest candidate so far (5 times it, and at least 0.1 s): the warm-up only.
    assert autotune.time_candidate("behind", build(0.12), fastest=0.02, budget_s=10.0, reps=3) >= 0.12
    assert calls == [0.12]
    calls.clear()
    assert autotune.time_candidate("close", build(0.12), fastest=0.03, budget_s=10.0, reps=2) >= 0.12
    assert calls == [0.12] * 3
    calls.clear()
    assert autotune.time_candidate("small", build(0.05), fastest=0.001, budget_s=10.0, reps=2) >= 0.05
    assert calls == [0.05] * 3  # under 0.1 s, timed as usual whatever the fastest


def test_each_candidate_is_told_the_fastest_so_far_in_its_own_calls(tmp_path):
    told = {}

    def timer(name, build, fastest):
        told[name] = fastest
        return {"a": 2.0, "b": 1.0, "c": 3.0}[name]

    calls = {"a": 1, "b": 2, "c": 4}  # the op's time: a 2 s, b 2 s, c 12 s
    assert tuner(tmp_path, timer).choose("op", "s", CANDIDATES, "a", calls=calls) == "a"
    assert told == {"a": float("inf"), "b": 2.0 / 2, "c": 2.0 / 4}


def test_ties_go_to_the_default_and_calls_weigh_the_times(tmp_path):
    timer = FakeTimer({"a": 1.0, "b": 1.0, "c": 1.0})
    assert tuner(tmp_path, timer).choose("op", "tie", CANDIDATES, "c") == "c"
    # b is slower per call but needs a quarter of the calls.
    timer = FakeTimer({"a": 1.0, "b": 3.0, "c": 2.0})
    assert tuner(tmp_path, timer).choose("op", "w", CANDIDATES, "a", calls={"a": 4, "b": 1, "c": 4}) == "b"


def test_with_a_min_gain_the_default_stays_unless_a_candidate_saves_that_much(tmp_path):
    just_under = FakeTimer({"a": 1.0, "b": 0.71, "c": 2.0})
    assert tuner(tmp_path, just_under).choose("op", "under", CANDIDATES, "a", min_gain=0.3) == "a"
    enough = FakeTimer({"a": 1.0, "b": 0.69, "c": 2.0})
    assert tuner(tmp_path, enough).choose("op", "enough", CANDIDATES, "a", min_gain=0.3) == "b"
    # The cached choice is the rule's, not the raw fastest.
    assert tuner(tmp_path, never_timed).choose("op", "under", CANDIDATES, "a", min_gain=0.3) == "a"


def test_cached_timings_are_decided_again_under_a_changed_rule_without_timing(tmp_path):
    assert tuner(tmp_path, FakeTimer({"a": 1.0, "b": 0.55, "c": 2.0})).choose(
        "op", "s", CANDIDATES, "a", min_gain=0.5) == "a"
    path = tmp_path / "cache" / "autotune.json"
    assert json.loads(path.read_text())["entries"]["test machine"]["op"]["s"]["choice"] == "a"
    # A smaller margin (a newer planet_jax) picks b from the same timings, and the report says so.
    assert tuner(tmp_path, never_timed).choose("op", "s", CANDIDATES, "a", min_gain=0.4) == "b"
    assert autotune.choices(tuner(tmp_path, never_timed))["op"]["s"] == {
        "choice": "b", "seconds": {"a": 1.0, "b": 0.55, "c": 2.0}}
    assert tuner(tmp_path, never_timed).choose("op", "s", CANDIDATES, "a", calls={"b": 2}) == "a"
    # An unchanged choice leaves the file as it is.
    mtime = path.stat().st_mtime_ns
    assert tuner(tmp_path, never_timed).choose("op", "s", CANDIDATES, "a", calls={"b": 2}) == "a"
    assert path.stat().st_mtime_ns == mtime
    # A timing that is not a usable number (edited by hand, NaN, not positive) is measured again.
    for bad in ("fast", float("nan"), -1.0, 0.0, True):
        data = json.loads(path.read_text())
        data["entries"]["test machine"]["op"]["s"]["seconds"]["c"] = bad
        path.write_text(json.dumps(data))
        timer = FakeTimer({"a": 1.0, "b": 2.0, "c": 0.1})
        assert tuner(tmp_path, timer).choose("op", "s", CANDIDATES, "a") == "c" and timer.timed == ["a", "b", "c"]


def test_a_changed_choice_that_cannot_be_written_back_is_still_taken_without_a_warning(tmp_path):
    tuner(tmp_path, FakeTimer({"a": 1.0, "b": 0.55, "c": 2.0})).choose("op", "s", CANDIDATES, "a", min_gain=0.5)
    lock = tmp_path / "cache" / "autotune.json.lock"
    lock.unlink()
    lock.mkdir()  # the lock cannot be opened, so nothing is written
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            assert tuner(tmp_path, never_timed).choose("op", "s", CANDIDATES, "a", min_gain=0.4) == "b"
    assert autotune.choices(tuner(tmp_path, never_timed))["op"]["s"]["choice"] == "a"


def test_processes_writing_at_once_keep_each_others_entries(tmp_path):
    script = (f"import sys; from planet_jax import autotune; from pathlib import Path\n"
              f"t = autotune.Tuner(Path({str(tmp_path / 'cache' / 'autotune.json')!r}), True, lambda n, b, f: 1.0, 'm')\n"
              f"for i in range(30): t.choose('op', f'{{sys.argv[1]}} {{i}}', {{'a': None}}, 'a')\n")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(w)]) for w in range(4)]
    assert [w.wait(timeout=120) for w in workers] == [0] * 4
    assert len(autotune.choices(tuner(tmp_path, never_timed, machine="m"))["op"]) == 120


@pytest.mark.parametrize("text", ["{not json", '{"version": 0, "entries": {}}', "[1, 2]",
                                  '{"version": 1, "entries": {"test machine": {"op": {"k": {"choice": "c", '
                                  '"seconds": {"a": 2.0, "b": 1.0, "c": 0.1}}}}}}'])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, text):
    path = tmp_path / "cache" / "autotune.json"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.warns(autotune.AutotuneWarning, match="ignored"):
        choice = tuner(tmp_path, FakeTimer({"a": 2.0, "b": 1.0, "c": 3.0})).choose("op", "k", CANDIDATES, "a")
    assert choice == "b"
    assert json.loads(path.read_text())["entries"]["test machine"]["op"]["k"]["choice"] == "b"


@pytest.mark.parametrize("mine", [[1, 2], {"op": "edited"}, {"op": {"k": 3}}])
def test_a_hand_edited_entry_is_measured_again_and_rewritten(tmp_path, mine):
    path = tmp_path / "cache" / "autotune.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"version": autotune.CACHE_VERSION, "entries": {"test machine": mine}}))
    assert tuner(tmp_path, FakeTimer({"a": 2.0, "b": 1.0, "c": 3.0})).choose("op", "k", CANDIDATES, "a") == "b"
    assert json.loads(path.read_text())["entries"]["test machine"]["op"]["k"]["choice"] == "b"


def test_an_unwritable_cache_warns_and_still_chooses(tmp_path):
    (tmp_path / "cache").write_text("a file where the folder should be")
    with pytest.warns(autotune.AutotuneWarning, match="not written"):
        choice = tuner(tmp_path, FakeTimer({"a": 2.0, "b": 1.0, "c": 3.0})).choose("op", "k", CANDIDATES, "a")
    assert choice == "b"


def test_pins_search_off_and_small_work_take_no_measurement(tmp_path):
    t = tuner(tmp_path, never_timed)
    assert t.choose("op", "k", CANDIDATES, "a", pin="c") == "c"
    assert t.choose("op", "k", CANDIDATES, "a", pin="default") == "a"
    assert t.choose("op", "k", CANDIDATES, "a", gflop=autotune.MIN_SEARCH_GFLOP / 2) == "a"
    assert tuner(tmp_path, never_timed, search=False).choose("op", "k", CANDIDATES, "b") == "b"
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="choose from auto, default, a, b, c"):
        t.choose("op", "k", CANDIDATES, "a", pin="d")
    with pytest.raises(ValueError, match="default"):
        t.choose("op", "k", CANDIDATES, "d")


def test_environment_sets_the_folder_and_the_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(autotune.ENV_CACHE_DIR, raising=False)
    assert autotune.cache_dir() == tmp_path / "xdg" / "planet_jax"
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "mine"))
    assert autotune.Tuner().path == tmp_path / "mine" / "autotune.json"
    for word, on in (("off", False), ("0", False), ("no", False), ("1", True), ("on", True)):
        monkeypatch.setenv(autotune.ENV_SEARCH, word)
        assert autotune.search_enabled() is on
    assert jax.__version__ in autotune.machine_id() and autotune.cpu_model()


def test_measuring_while_jax_traces_runs_the_candidates_for_real(tmp_path):
    """Choices are made at trace time; the candidates still run on concrete arrays (a worker thread)."""
    ran = []

    def build(name):
        f = jax.jit(lambda x: x * 2.0)
        return lambda: ran.append((name, float(f(jnp.float32(1.0)))))

    t = tuner(tmp_path, lambda name, b, fastest: autotune.time_candidate(name, b, fastest, budget_s=0.0, reps=1))
    chosen = []

    @jax.jit
    def traced(x):
        chosen.append(t.choose("op", "k", {n: (lambda n=n: build(n)) for n in ("p", "q")}, "p"))
        return x + 1

    assert float(traced(1.0)) == 2.0
    assert chosen[0] in ("p", "q") and {name for name, _ in ran} == {"p", "q"}
    assert all(value == 2.0 for _, value in ran)


def test_conv_layers_take_the_measured_or_pinned_formulation(tmp_path):
    t = tuner(tmp_path, FakeTimer({"mixed": 3.0, "xla": 4.0, "conv": 2.0, "im2col": 1.0, "taps": 5.0, "outer": 6.0}))
    args = (ops.conv_s2, "conv1", (64, 31, 31, 16), (4, 4, 16, 32), "float32")
    assert ops.layer_impl(*args, tuner=t) == "im2col"
    never = tuner(tmp_path, never_timed)
    assert ops.layer_impl(*args, tuner=never) == "im2col"  # cached
    with ops.conv_impl_scope("conv1=taps,deconv0=xla"):
        assert ops.layer_impl(*args, tuner=never) == "taps"
        assert ops.layer_impl(ops.conv_s2, "conv2", (64, 14, 14, 32), (4, 4, 32, 64), "float32",
                              tuner=tuner(tmp_path, FakeTimer(dict.fromkeys(config.CONV_IMPLS, 1.0)))) == "mixed"
    with ops.conv_impl_scope("default"):
        assert ops.layer_impl(*args, tuner=never) == "mixed"
    with pytest.raises(ValueError, match="conv_impl"):
        with ops.conv_impl_scope("conv1=fastest"):
            pass


def test_conv_layer_passes_are_measured_and_pinned_apart(tmp_path):
    # The forward and the gradients each take their own fastest formulation (by half a default's time).
    seconds = {"forward": {"mixed": 4.0, "xla": 9.0, "conv": 1.0, "im2col": 3.0, "taps": 5.0, "outer": 6.0},
               "gradients": {"mixed": 4.0, "xla": 9.0, "conv": 8.0, "im2col": 3.0, "taps": 1.5, "outer": 6.0}}
    timed = []

    def timer(name, build, fastest):  # build: functools.partial(_timed_layer, op, impl, pass, ...)
        timed.append(build.args[1:3])
        return seconds[build.args[2]][name]
    args = (ops.conv_transpose_s2, "deconv2", (64, 13, 13, 16), (6, 6, 16, 8), "float32")
    assert ops.layer_impl(*args, tuner=tuner(tmp_path, timer)) == "conv/taps"
    assert sorted(timed) == sorted((impl, p) for p in ops._PASSES for impl in config.CONV_IMPLS)
    assert ops.layer_impl(*args, tuner=tuner(tmp_path, never_timed)) == "conv/taps"  # cached
    with ops.conv_impl_scope("deconv2=xla/auto"):
        assert ops.layer_impl(*args, tuner=tuner(tmp_path, never_timed)) == "xla/taps"
    with ops.conv_impl_scope("im2col/default"):
        assert ops.layer_impl(*args, tuner=tuner(tmp_path, never_timed)) == "im2col/mixed"
    with ops.conv_impl_scope("taps/taps"):
        assert ops.layer_impl(*args, tuner=tuner(tmp_path, never_timed)) == "taps"
    # What the image-group candidates use: every pass a spec leaves 'auto' takes the default, unmeasured.
    with ops.conv_impl_scope("deconv2=xla/auto", auto="default"):
        fresh = tuner(tmp_path / "never", never_timed)
        assert ops.layer_impl(*args, tuner=fresh) == "xla/mixed"
        assert ops.layer_impl(ops.conv_transpose_s2, "deconv3", *args[2:], tuner=fresh) == "mixed"
    with pytest.raises(ValueError, match="auto"):
        with ops.conv_impl_scope("auto", auto="conv"):
            pass
    seconds["gradients"]["taps"] = 2.5  # saves less than half of mixed's time: mixed stays
    assert ops.layer_impl(*args, tuner=tuner(tmp_path / "fresh", timer)) == "conv/mixed"


def test_pinned_conv_formulations_give_the_same_encoder_and_decoder(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    cfg = tiny_model()
    from planet_jax import networks
    params = networks.init_params(cfg, 2, jax.random.PRNGKey(0))
    o = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-0.5, maxval=0.5)
    feat = jax.random.normal(jax.random.PRNGKey(2), (2, cfg.feature_size))
    results = {}
    for spec in config.CONV_IMPLS + ("conv/taps", "deconv2=xla/im2col,conv1=outer/conv"):
        with ops.conv_impl_scope(spec):
            results[spec] = (networks.encode(params, cfg, o), networks.decode(params, cfg, feat))
    for spec, (e, image) in results.items():
        np.testing.assert_allclose(e, results["xla"][0], atol=1e-5, rtol=1e-5, err_msg=spec)
        np.testing.assert_allclose(image, results["xla"][1], atol=1e-5, rtol=1e-5, err_msg=spec)


def test_layers_report_their_work_to_the_search(monkeypatch):
    # The work per call gates the search: each layer's GFLOP, from its output positions.
    seen = {}

    def choose(self, op, key, candidates, default, pin="auto", gflop=None, calls=None, min_gain=0.0):
        seen[key] = gflop
        return default
    monkeypatch.setattr(autotune.Tuner, "choose", choose)
    from planet_jax import networks
    cfg = config.paper().model
    mods = networks.modules(cfg)
    jax.eval_shape(mods["encoder"].init, jax.random.PRNGKey(0), jnp.zeros((3, 64, 64, 3)))
    jax.eval_shape(mods["decoder"].init, jax.random.PRNGKey(0), jnp.zeros((3, cfg.feature_size)))
    d = cfg.cnn_depth
    layers = [("conv", 64, 31, 4, 3, d), ("conv", 31, 14, 4, d, 2 * d), ("conv", 14, 6, 4, 2 * d, 4 * d),
              ("conv", 6, 2, 4, 4 * d, 8 * d), ("deconv", 5, 5, 5, 4 * d, 2 * d), ("deconv", 13, 13, 6, 2 * d, d),
              ("deconv", 30, 30, 6, d, 3)]
    want = {(f"x3x{size}x{size}x{c_in} k{k} o{c_out} float32", kind): 2 * 3 * out * out * k * k * c_in * c_out / 1e9
            for kind, size, out, k, c_in, c_out in layers}
    # Each layer's forward pass and its gradients (twice the forward's work) are searched apart; the
    # transposed convs' gradients and both of the strided convs' passes under a revised key
    # (ops._PASS_REVISION).
    forward = lambda key, kind: f"{key} forward" + (" r2" if kind == "conv" else "")
    gradients = lambda key, kind: f"{key} gradients r2"
    assert seen.keys() == {forward(*layer) for layer in want} | {gradients(*layer) for layer in want}
    for (key, kind), gflop in want.items():
        assert seen[forward(key, kind)] == pytest.approx(gflop), key
        assert seen[gradients(key, kind)] == pytest.approx(2 * gflop), key


def test_the_image_group_revision_was_weighed_against_the_current_layer_revisions():
    """The group candidates run every layer at its default formulation: when a layer pass's
    revision changes, its timings may be stale too."""
    assert objective._GROUP_REVISION_LAYERS == ops._PASS_REVISION, (
        "ops._PASS_REVISION changed: if a layer's default ('mixed') formulation changed, bump "
        "objective._GROUP_REVISION; either way set objective._GROUP_REVISION_LAYERS to the new revisions")


def test_image_group_is_the_fastest_over_the_same_sequences_or_the_pin(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    cfg = tiny_model()
    # Groups of 1, 2, 4, 8 sequences, each candidate covering the largest group's 8 sequences.
    timer = FakeTimer({"1": 3.0, "2": 2.0, "4": 1.5, "8": 4.0})
    t = tuner(tmp_path, timer)
    monkeypatch.setattr(autotune, "MIN_SEARCH_GFLOP", 0.0)
    assert objective.image_group(cfg, 8, 4, tuner=t) == 4
    assert timer.timed == ["1", "2", "4", "8"]
    assert objective.image_group(cfg, 8, 4, tuner=tuner(tmp_path, never_timed)) == 4
    assert objective.image_group(config.override(config.tiny(), ["model.image_group=3"]).model, 8, 4,
                                 tuner=tuner(tmp_path, never_timed)) == 3
    off = tuner(tmp_path, never_timed, search=False)
    assert objective.image_group(cfg, 8, 4, tuner=off) == objective.CPU_IMAGE_GROUP
    # Groups past MAX_CPU_SEARCH_IMAGES are not timed on a CPU; the others then cover 4 sequences,
    # except groups of 3, which need 2 groups (6 sequences): 12 sequences are 2 of their calls and 3
    # of the others', so 3 (2 x 2.0 s) beats 4 (3 x 1.5 s) and the default 2 (3 x 1.8 s).
    monkeypatch.setattr(objective, "MAX_CPU_SEARCH_IMAGES", 16)
    timer = FakeTimer({"1": 4.0, "2": 1.8, "3": 2.0, "4": 1.5})
    assert objective.image_group(cfg, 12, 4, tuner=tuner(tmp_path / "2", timer)) == 3
    assert timer.timed == ["1", "2", "3", "4"]


def test_image_group_candidate_is_the_loss_image_work_over_groups():
    cfg = tiny_model()
    params = objective._image_params(cfg)
    grads, head_grad = objective._timed_groups(cfg, 1, 3, 2, lambda: params)()
    # 3 groups of 1 sequence of 2 frames; the head's layers are outside the group, so their
    # gradients are zero and the body's are not.
    assert head_grad.shape == (3, 2, 5, 5, 4 * cfg.cnn_depth)
    assert not np.any(grads["decoder"]["dense"]["kernel"]) and np.any(grads["decoder"]["deconv1"]["kernel"])
    # The grouped loop's gradients are those of the same images in one call (recomputed here).
    from planet_jax import networks
    o = autotune.random_array((3, 2, 64, 64, 3), 0, uniform=(-0.5, 0.5)).reshape(6, 64, 64, 3)
    head = autotune.random_array((3, 2, 5, 5, 4 * cfg.cnn_depth), 1).reshape(6, 5, 5, 4 * cfg.cnn_depth)

    def whole(p, head):  # the image term as the loss has it: 0.5 * squared error, mean over images
        return (jnp.mean(0.5 * jnp.sum(jnp.square(networks.decode_body(p, cfg, head) - o), (1, 2, 3)))
                + jnp.sum(jnp.square(networks.encode(p, cfg, o))))
    want, want_head = jax.jit(jax.grad(whole, (0, 1)))(params, head)
    np.testing.assert_allclose(head_grad.reshape(want_head.shape), want_head, rtol=1e-4, atol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(want):
        got = dict(jax.tree_util.tree_leaves_with_path(grads))[path]
        np.testing.assert_allclose(got, g, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(g))), err_msg=str(path))


def test_image_group_candidate_takes_its_frames_as_an_argument(monkeypatch):
    # Closed over, the frames would be a constant of the program: as large as they are, in every
    # candidate, and in jax's compilation cache.
    cfg = tiny_model()
    params = objective._image_params(cfg)
    lowered, jit = [], jax.jit

    def spy(fn, *args, **kwargs):
        jitted = jit(fn, *args, **kwargs)

        class Spy:
            def lower(self, *a):
                lowered.append(jitted.lower(*a))
                return lowered[-1]
        return Spy()

    monkeypatch.setattr(jax, "jit", spy)
    objective._timed_groups(cfg, 1, 3, 8, lambda: params)
    frames_bytes = 3 * 8 * 64 * 64 * 3 * 4
    (text,) = [low.as_text() for low in lowered]
    assert len(text) < frames_bytes, len(text)
    assert (3, 8, 64, 64, 3) in [a.shape for a in jax.tree.leaves(lowered[0].args_info)]


def test_candidate_inputs_are_seeded_draws_that_compile_nothing():
    compiles = []
    listen = lambda event, duration, **kwargs: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.jit(lambda v: v + 1)(jnp.zeros(3)).block_until_ready()  # the listener sees compiles
        assert compiles
        compiles.clear()
        x = autotune.random_array((40, 30, 17), 5)  # a shape nothing here has drawn before
        u = autotune.random_array((20000,), 6, uniform=(-0.5, 0.5))
        half = autotune.random_array((40, 30, 17), 5, scale=0.5)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert not compiles
    assert x.shape == (40, 30, 17) and x.dtype == u.dtype == jnp.float32
    np.testing.assert_array_equal(x, autotune.random_array((40, 30, 17), 5))
    assert not np.array_equal(x, autotune.random_array((40, 30, 17), 7))
    assert abs(float(x.mean())) < 0.03 and abs(float(x.std()) - 1) < 0.03
    np.testing.assert_allclose(half, 0.5 * x, rtol=1e-6)
    assert -0.5 <= float(u.min()) and float(u.max()) <= 0.5 and abs(float(u.mean())) < 0.01
    assert abs(float(u.std()) - 1 / 12 ** 0.5) < 0.01


def test_plan_batching_measured_pinned_or_default(tmp_path, monkeypatch):
    cfg = tiny_model()
    small = config.PlannerConfig(horizon=4, iterations=2, candidates=32, top_k=4)
    monkeypatch.setattr(autotune, "MIN_SEARCH_GFLOP", 0.0)
    timer = FakeTimer({"map": 2.0, "vmap": 1.0})
    assert planner.plan_batching(cfg, small, 2, 8, tuner=tuner(tmp_path, timer)) == "vmap"
    never = tuner(tmp_path, never_timed)
    assert planner.plan_batching(cfg, small, 2, 8, tuner=never) == "vmap"
    pinned = config.PlannerConfig(horizon=4, iterations=2, candidates=32, top_k=4, batching="map")
    assert planner.plan_batching(cfg, pinned, 2, 8, tuner=never) == "map"
    assert planner.plan_batching(cfg, small, 2, 1, tuner=never) == "map"  # one environment: default
    off = tuner(tmp_path / "off", never_timed, search=False)
    assert planner.plan_batching(cfg, small, 2, 3, tuner=off) == "map"
    # The candidate itself: a real decision for 3 environments.
    action, mean = planner._timed_plan(cfg, small, 2, 3, "vmap")()
    assert action.shape == (3, 2) and mean.shape == (3, 4, 2)


def test_cpu_dots_measured_pinned_or_default(tmp_path, monkeypatch):
    cfg = tiny_model()
    small = config.PlannerConfig(horizon=4, iterations=2, candidates=32, top_k=4)
    monkeypatch.setattr(autotune, "MIN_SEARCH_GFLOP", 0.0)
    monkeypatch.setattr(planner, "_ynn_option_known", lambda: True)  # as on jaxlib 0.10's CPUs
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    # The faster of the two, timed on one environment's decision; XLA's default on a tie.
    faster = FakeTimer({"xla": 1.0, "eigen": 0.9})
    assert planner.cpu_dots(cfg, small, 2, tuner(tmp_path / "a", faster)) == "eigen"
    assert faster.timed == ["xla", "eigen"]
    assert planner.cpu_dots(cfg, small, 2, tuner(tmp_path / "a", never_timed)) == "eigen"  # cached
    assert planner.cpu_dots(cfg, small, 2, tuner(tmp_path / "b", FakeTimer({"xla": 1.0, "eigen": 1.1}))) == "xla"
    assert planner.cpu_dots(cfg, small, 2, tuner(tmp_path / "e", FakeTimer({"xla": 1.0, "eigen": 1.0}))) == "xla"
    # A batching measured while a program with Eigen's dots is traced is cached under its own key.
    token = planner._TRACED_DOTS.set("eigen")
    try:
        assert planner.plan_batching(cfg, small, 2, 8, tuner(tmp_path / "a", FakeTimer({"map": 1.0, "vmap": 2.0}))) == "map"
    finally:
        planner._TRACED_DOTS.reset(token)
    batching_keys = list(autotune.choices(tuner(tmp_path / "a", never_timed))["planner.batching"])
    assert len(batching_keys) == 1 and batching_keys[0].endswith(" eigen dots" + planner._PLAN_REVISION)
    # Pinned, the default, the search off: never timed.
    never = tuner(tmp_path / "c", never_timed)
    for pin, expected in (("eigen", "eigen"), ("xla", "xla"), ("default", "xla")):
        assert planner.cpu_dots(cfg, dataclasses.replace(small, cpu_dots=pin), 2, never) == expected
    assert planner.cpu_dots(cfg, small, 2, tuner(tmp_path / "d", never_timed, search=False)) == "xla"
    # Off a CPU, or on a jaxlib without the option, XLA's default, even pinned.
    monkeypatch.setattr(planner, "_ynn_option_known", lambda: False)
    assert planner.cpu_dots(cfg, dataclasses.replace(small, cpu_dots="eigen"), 2, never) == "xla"
    monkeypatch.setattr(planner, "_ynn_option_known", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert planner.cpu_dots(cfg, dataclasses.replace(small, cpu_dots="eigen"), 2, never) == "xla"
    assert planner.compiler_options(cfg, dataclasses.replace(small, cpu_dots="eigen"), 2) is None


def test_config_rejects_unknown_choices():
    for item in ("model.conv_impl=fastest", "model.conv_impl=conv0", "planner.batching=pmap", "planner.cpu_dots=mkl",
                 "model.conv_impl=conv/fastest", "model.conv_impl=conv0=taps/", "model.conv_impl=conv/taps/xla"):
        with pytest.raises(ValueError, match="conv_impl|batching|cpu_dots"):
            config.override(config.tiny(), [item]).validate()
    config.override(config.tiny(), ["model.conv_impl=conv0=taps,deconv3=conv/auto", "planner.batching=vmap",
                                     "planner.cpu_dots=eigen"]).validate()
    config.override(config.tiny(), ["model.conv_impl=xla/default"]).validate()
    # Spaces around '=', ',' and '/' are ignored alike.
    assert config.conv_impl_pin(" conv / taps ", "conv1") == "conv/taps"
    assert config.conv_impl_pin("conv0 = im2col , deconv3 = conv / auto", "deconv3") == "conv/auto"
    assert config.conv_impl_pin("conv0 = im2col , deconv3 = conv / auto", "conv0") == "im2col"


def test_config_rejects_a_layer_name_the_networks_do_not_have():
    with pytest.raises(ValueError, match="names no layer deconv0, decov2: the stride-2 layers are conv0, "):
        config.override(config.tiny(), ["model.conv_impl=decov2=taps,conv1=xla,deconv0=taps"]).validate()
    with pytest.raises(ValueError, match="pins conv1 twice"):
        config.override(config.tiny(), ["model.conv_impl=conv1=taps, conv1 = xla"]).validate()
    # CONV_LAYERS are the networks' stride-2 layers, each of which asks for its pin by that name.
    asked = []
    real_pin = config.conv_impl_pin
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "conv_impl_pin", lambda spec, layer: asked.append(layer) or real_pin(spec, layer))
        cfg = config.tiny().model
        mods = networks.modules(cfg)
        mods["encoder"].init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
        mods["decoder"].init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.feature_size)))
    assert sorted(set(asked)) == sorted(config.CONV_LAYERS)


def test_layer_candidates_run_one_pass_of_the_layer_in_a_loop():
    g = ops._LOOP_GROUPS
    for op, x_shape, kernel_shape, y_shape in ((ops.conv_transpose_s2, (3, 5, 5, 4), (5, 5, 4, 2), (3, 13, 13, 2)),
                                               (ops.conv_s2, (3, 6, 6, 4), (4, 4, 4, 2), (3, 2, 2, 2))):
        y = ops._timed_layer(op, "taps", "forward", x_shape, kernel_shape, "float32")()
        # What the forward candidate computed is the layer's output on the candidate's inputs.
        x = autotune.random_array((g,) + x_shape, 0)
        kernel = autotune.random_array(kernel_shape, 1, scale=1 / kernel_shape[0])
        assert y.shape == (g,) + y_shape
        np.testing.assert_allclose(y, op(x, kernel, impl="xla"), rtol=1e-5, atol=1e-5)
        dx, dw = ops._timed_layer(op, "taps", "gradients", x_shape, kernel_shape, "float32")()
        assert dx.shape == (g,) + x_shape and dw.shape == (g,) + kernel_shape


def test_the_planners_choices_are_timed_in_turns(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "MIN_SEARCH_GFLOP", 0.0)
    monkeypatch.setattr(planner, "_ynn_option_known", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    cfg, small = tiny_model(), config.PlannerConfig(horizon=4, iterations=2, candidates=32, top_k=4)
    turned = []
    turns = lambda builders: turned.append(sorted(builders)) or {name: 1.0 + (name in ("map", "xla")) for name in builders}
    t = tuner(tmp_path, never_timed, turns=turns)
    assert planner.plan_batching(cfg, small, 2, 8, tuner=t) == "vmap"
    assert planner.cpu_dots(cfg, small, 2, tuner=t) == "eigen"
    assert turned == [["map", "vmap"], ["eigen", "xla"]]
