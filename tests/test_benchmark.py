"""The benchmark's profile: XLA's per-op events attributed to the JAX operations they came from."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from experiments import benchmark

HLO = """
  %while.3 = (s32[], f32[4]{0}) while(%tuple.1), condition=%cond, body=%body, metadata={op_name="jit(f)/while" stack_frame_id=1}
  %dot.7 = f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, metadata={op_name="jit(f)/while/body/closed_call/dot_general" stack_frame_id=2}
  ROOT %add.2 = f32[4]{0} add(%x, %y), metadata={op_name="jit(train_step)/jvp()/vmap(Decoder)/add"}
  %param.1 = f32[4]{0} parameter(0)
"""


def test_hlo_op_names_skip_control_flow_and_loop_scopes():
    assert benchmark._hlo_op_names(HLO) == {"dot.7": "dot_general", "add.2": "jvp()/vmap(Decoder)/add"}


def test_profile_ranks_the_operations_of_a_call():
    # 2 * 2048 flops of matmul per tanh, so the matmul leads even where the tanh is compiled without
    # vectorisation (the suite compiles at LLVM level 0).
    f = jax.jit(lambda y, x: lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ x), y))
    y, x = jnp.full((16, 2048), 0.01), jnp.full((2048, 2048), 0.01)
    f(y, x).block_until_ready()
    top = benchmark.profile_ops(lambda: f(y, x).block_until_ready(), f.lower(y, x).compile().as_text(), 3)
    assert 1 <= len(top) <= 3
    seconds = [s for s, _ in top]
    assert all(s > 0 for s in seconds) and seconds == sorted(seconds, reverse=True)
    assert "dot_general" in top[0][1]


def test_an_instruction_run_on_the_thread_pool_lasts_until_its_end_marker():
    # XLA:CPU's trace: conv.1's events cover its launches (10 us), 'end: conv.1' marks when each run
    # finished; add.2 ran inline (no marker); other events are ignored.
    events = [{"ph": "X", "name": "conv.1", "ts": 0, "dur": 10}, {"ph": "X", "name": "add.2", "ts": 20, "dur": 300},
              {"ph": "X", "name": "end: conv.1", "ts": 5000, "dur": 0}, {"ph": "X", "name": "ThunkExecutor", "ts": 0, "dur": 9000},
              {"ph": "X", "name": "conv.1", "ts": 6000, "dur": 10}, {"ph": "X", "name": "end: conv.1", "ts": 8000, "dur": 0},
              {"ph": "X", "name": "end: unknown.3", "ts": 8100, "dur": 0}]
    seconds = benchmark._op_seconds(events, {"conv.1", "add.2"})
    assert seconds == {"conv.1": pytest.approx(0.005 + 0.002), "add.2": pytest.approx(0.0003)}
    # A run without a marker (here conv.1's second) counts its event; the next marker ends the run
    # after it, in whatever order the events come.
    events[4:4] = [{"ph": "X", "name": "conv.1", "ts": 5500, "dur": 100}]
    seconds = benchmark._op_seconds(events[::-1], {"conv.1", "add.2"})
    assert seconds["conv.1"] == pytest.approx(0.005 + 0.0001 + 0.002)
    # A loop's runs whose markers all come after the loop: each run but the last counts its event;
    # a marker at the same time as the next run's start ends the run before it; no 'dur' is 0.
    loop = [{"ph": "X", "name": "fusion.4", "ts": 1000 * i, "dur": 100} for i in range(5)]
    late = [{"ph": "X", "name": "end: fusion.4", "ts": 9000 + i} for i in range(5)]
    assert benchmark._op_seconds(loop + late, {"fusion.4"})["fusion.4"] == pytest.approx(4 * 100e-6 + 5000e-6)
    tie = [{"ph": "X", "name": "fusion.4", "ts": 0, "dur": 50}, {"ph": "X", "name": "fusion.4", "ts": 200},
           {"ph": "X", "name": "end: fusion.4", "ts": 200, "dur": 0}]
    assert benchmark._op_seconds(tie, {"fusion.4"})["fusion.4"] == pytest.approx(200e-6)


def test_matmul_peak_reports_each_dtype_and_orientation(monkeypatch):
    monkeypatch.setattr(benchmark, "MATMUL_SHAPE", (256, 32, 16))
    monkeypatch.setattr(benchmark, "CEILING_SHAPES", ((64, 64, 64), (128, 16, 32)))
    record = benchmark.worker("matmul_peak", iters=2, warmup=0)
    assert record["gflop"] == round(2 * 256 * 32 * 16 / 1e9, 2)
    assert record["shape_mkn"] == [256, 32, 16]
    rates = record["gflops_per_s_by_case"]
    assert set(rates) == {"float32 x@w", "float32 xT@g", "bfloat16 x@w", "bfloat16 xT@g",
                          "float32 x@w 64x64x64", "float32 x@w 128x16x32"}
    assert all(rate > 0 for rate in rates.values())
    # the ceiling is the best float32 case, bfloat16's not counted
    assert record["ceiling_gflops_per_s"] == max(rates["float32 x@w"], rates["float32 xT@g"],
                                                 rates["float32 x@w 64x64x64"], rates["float32 x@w 128x16x32"])
    assert record["numpy_float32_gflops_per_s"] > 0
    assert record["n"] == 2 and record["min_s"] <= record["median_s"] <= record["max_s"]


def test_measurement_sets_name_known_measurements_and_the_cpu_preset_reference():
    for names in benchmark.GROUPS.values():
        assert names[0] == "matmul_peak" and set(names) <= set(benchmark.MEASUREMENTS)
    for name in benchmark.GROUPS["cpu"][1:]:
        preset, _, _, _, torch_args = benchmark.MEASUREMENTS[name]
        assert preset == "cpu" and torch_args[-2:] == ["--preset", "cpu"]
    assert [benchmark.MEASUREMENTS[n][3] for n in ("cpu_plan_1", "cpu_plan_8")] == [1, 8]


def test_machine_line_names_the_cpu_and_versions():
    line = benchmark.machine()
    assert line["machine"] and line["cpus"] >= 1 and len(line["load_avg"]) == 3
    assert line["jax"] == jax.__version__


def test_speed_table_takes_medians_over_rounds_and_names_the_machine():
    records = [
        {"machine": "AMD EPYC", "cpus": 2, "jax": "0.10.2", "torch": "2.13.0+cpu"},
        {"impl": "planet_jax", "measurement": "matmul_peak", "median_s": 0.1, "gflops_per_s": 84.4, "max_rss_mb": 1000},
        {"impl": "planet_jax", "measurement": "cpu_train", "median_s": 1.0, "max_rss_mb": 2048},
        {"impl": "torch-reference", "mode": "train", "measurement": "cpu_train", "median_s": 2.0, "max_rss_mb": 1024},
        {"impl": "planet_jax", "measurement": "cpu_train", "median_s": 3.0, "max_rss_mb": 1024},
        {"impl": "torch-reference", "mode": "train", "measurement": "cpu_train", "median_s": 4.0, "max_rss_mb": 512},
        {"ratio": "cpu_train", "time_jax_over_torch": 0.5},
        {"impl": "planet_jax", "measurement": "tiny_plan_1", "median_s": 0.25, "max_rss_mb": 512},
    ]
    table = benchmark.speed_table(records, "python -m experiments.benchmark --only cpu")
    lines = table.splitlines()
    assert "AMD EPYC (2 cores)" in lines[0] and "84.4 GFLOP/s" in lines[0]
    # a line with the ceiling fields: XLA's best over its shapes, NumPy's beside it
    records[1] = dict(records[1], ceiling_gflops_per_s=201.5, numpy_float32_gflops_per_s=290.0)
    head = benchmark.speed_table(records, "cmd").splitlines()[0]
    assert "ceiling 201.5 GFLOP/s (XLA's best of its shapes; NumPy's 290.0)" in head and "84.4" not in head
    assert "`python -m experiments.benchmark --only cpu`" in lines[0]
    # medians over the two rounds: jax (1 + 3) / 2 = 2 s, torch (2 + 4) / 2 = 3 s
    assert lines[4] == "| cpu_train | 2 s | 3 s | 0.67 | 2.0 / 1.0 GB |"
    assert lines[5] == "| tiny_plan_1 | 0.25 s | - | - | 0.5 / - GB |"
    assert len(lines) == 6  # nothing said of the compilation cache when the records do not say


def test_speed_table_says_which_lines_loaded_their_programs_from_the_compilation_cache():
    records = [{"machine": "AMD EPYC", "cpus": 2, "jax": "0.10.2", "torch": None},
               {"impl": "planet_jax", "measurement": "cpu_train", "median_s": 1.0, "max_rss_mb": 600,
                "compilation_cache": {"hits": 4, "misses": 0}},
               {"impl": "planet_jax", "measurement": "cpu_train", "median_s": 1.0, "max_rss_mb": 900,
                "compilation_cache": {"hits": 0, "misses": 4}},  # one round compiled: not "loaded"
               {"impl": "planet_jax", "measurement": "train", "median_s": 9.0, "max_rss_mb": 1700,
                "compilation_cache": {"hits": 3, "misses": 0}},
               {"impl": "planet_jax", "measurement": "plan_1", "median_s": 1.0, "max_rss_mb": 500,
                "compilation_cache": "off"}]
    last = benchmark.speed_table(records, "cmd").splitlines()[-1]
    assert last == ("planet_jax's programs were loaded from jax's compilation cache for train and compiled "
                    "in the process, in some rounds, for cpu_train, plan_1 (`runtime.use_compilation_cache`).")
