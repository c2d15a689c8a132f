"""Speed of the training step and the planner, optionally side by side with the PyTorch reference.

  python -m experiments.benchmark                      # all measurements, planet_jax only
  python -m experiments.benchmark --compare-torch      # alternate with ../shared/bench/torch_reference.py
  python -m experiments.benchmark --only train plan_1 --iters 5
  python -m experiments.benchmark --only cpu --compare-torch   # the cpu preset's sizes, and the matmul ceiling
  python -m experiments.benchmark --only train --profile 15   # and the 15 most expensive ops

Prints a first JSON line naming the machine (CPU model, cores, load averages, versions), then one
JSON line per measurement: median/min/max seconds over --iters calls after warm-up,
compile time, the analytic GFLOP of one call (matmuls and convolutions, forward and backward), the
achieved GFLOP/s and the peak resident memory of the process that ran it. Each measurement runs in
its own process so that its peak memory is its own. With --compare-torch the reference runs in the
same invocation, alternating with planet_jax, with THP_MEM_ALLOC_ENABLE=1, and a ratio line
(planet_jax / reference) follows each pair.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import cli

OS50 = "loss.overshooting_distance=50"
BF16 = "model.conv_dtype=bfloat16"
PLAN_BF16 = "planner.matmul_dtype=bfloat16"
MEASUREMENTS = {
    # name: (preset, kind, config overrides, planning batch, torch arguments)
    "train": ("paper", "train", [], 0, ["--mode", "train"]),
    "train_os50": ("paper", "train", [OS50], 0, ["--mode", "train_os", "--os-padded"]),
    # The same steps with bfloat16 operands in the convolutions' matmuls (model.conv_dtype); the
    # reference stays float32, so their ratios compare planet_jax's opt-in setting with its default.
    "train_bf16": ("paper", "train", [BF16], 0, ["--mode", "train"]),
    "train_os50_bf16": ("paper", "train", [OS50, BF16], 0, ["--mode", "train_os", "--os-padded"]),
    # The step with the encoder and decoder run on the whole batch at once (by default a CPU runs
    # them on a few sequences at a time: model.image_group).
    "train_whole_batch": ("paper", "train", ["model.image_group=50"], 0, ["--mode", "train"]),
    "plan_1": ("paper", "plan", [], 1, ["--mode", "plan", "--plan-batch", "1"]),
    "plan_8": ("paper", "plan", [], 8, ["--mode", "plan", "--plan-batch", "8"]),
    # This machine's matmuls: float32 and bfloat16 at a conv-like shape, in the forward (x @ w) and
    # kernel-gradient (x^T @ g) orientations, and float32 at CEILING_SHAPES. Its gflops_per_s is
    # float32 x @ w at the conv-like shape; ceiling_gflops_per_s the best float32 rate of them all.
    "matmul_peak": ("paper", "matmul", [], 0, None),
    # The `cpu` preset's sizes (what a CPU user trains at); the reference runs with --preset cpu.
    "cpu_train": ("cpu", "train", [], 0, ["--mode", "train", "--preset", "cpu"]),
    "cpu_plan_1": ("cpu", "plan", [], 1, ["--mode", "plan", "--plan-batch", "1", "--preset", "cpu"]),
    "cpu_plan_8": ("cpu", "plan", [], 8, ["--mode", "plan", "--plan-batch", "8", "--preset", "cpu"]),
    # Opt-in bfloat16 operands (model.conv_dtype, planner.matmul_dtype) at both sizes; the reference
    # stays float32, so these ratios compare an opt-in setting of planet_jax with the float32 reference.
    "cpu_train_bf16": ("cpu", "train", [BF16], 0, ["--mode", "train", "--preset", "cpu"]),
    "plan_1_bf16": ("paper", "plan", [PLAN_BF16], 1, ["--mode", "plan", "--plan-batch", "1"]),
    "plan_8_bf16": ("paper", "plan", [PLAN_BF16], 8, ["--mode", "plan", "--plan-batch", "8"]),
    "cpu_plan_1_bf16": ("cpu", "plan", [PLAN_BF16], 1, ["--mode", "plan", "--plan-batch", "1", "--preset", "cpu"]),
    "cpu_plan_8_bf16": ("cpu", "plan", [PLAN_BF16], 8, ["--mode", "plan", "--plan-batch", "8", "--preset", "cpu"]),
    "tiny_train": ("tiny", "train", [], 0, None),
    "tiny_plan_1": ("tiny", "plan", [], 1, None),
}
# Named sets of measurements for --only: the matmul ceiling beside each size's train step and decisions.
GROUPS = {
    "paper": ["matmul_peak", "train", "plan_1", "plan_8"],
    "cpu": ["matmul_peak", "cpu_train", "cpu_plan_1", "cpu_plan_8"],
    "bf16": ["matmul_peak", "train_bf16", "plan_1_bf16", "plan_8_bf16", "cpu_train_bf16", "cpu_plan_1_bf16",
             "cpu_plan_8_bf16"],
}
ACTION_DIM = 6  # walker, as in the reference
# ../shared/bench/torch_reference.py seen from the repository, looked up from the nearest folder
# above it that has one (a git worktree sits deeper than the main checkout).
TORCH_REFERENCE = next((p / "shared" / "bench" / "torch_reference.py" for p in Path(__file__).resolve().parents[1:]
                        if (p / "shared" / "bench" / "torch_reference.py").exists()),
                       Path(__file__).resolve().parents[2] / "shared" / "bench" / "torch_reference.py")


def _conv_flops(size_in: int, size_out: int, k: int, c_in: int, c_out: int, transposed: bool) -> int:
    """2 * multiply-adds of one image through a square conv (VALID); transposed convs scatter inputs."""
    positions = size_in * size_in if transposed else size_out * size_out
    return 2 * positions * k * k * c_in * c_out


def model_flops(cfg, action_dim: int) -> dict[str, int]:
    """Forward FLOPs (2 * multiply-adds of matmuls and convolutions) per image / per latent step."""
    m = cfg.model
    d = m.cnn_depth
    encoder = sum(_conv_flops(0, o, 4, ci, co, False) for o, ci, co in
                  ((31, 3, d), (14, d, 2 * d), (6, 2 * d, 4 * d), (2, 4 * d, 8 * d)))
    decoder = 2 * m.feature_size * 32 * d + sum(
        _conv_flops(i, 0, k, ci, co, True) for i, k, ci, co in
        ((1, 5, 32 * d, 4 * d), (5, 5, 4 * d, 2 * d), (13, 6, 2 * d, d), (30, 6, d, 3)))
    gru = 2 * 3 * (m.hidden + m.h_size) * m.h_size
    transition = 2 * (m.s_size + action_dim) * m.hidden + gru + 2 * (m.h_size * m.hidden + m.hidden * 2 * m.s_size)
    posterior = 2 * ((m.h_size + m.embed_size) * m.hidden + m.hidden * 2 * m.s_size)
    reward = 2 * (m.feature_size * m.reward_hidden + (m.reward_layers - 1) * m.reward_hidden ** 2
                  + m.reward_hidden)
    return {"encoder": encoder, "decoder": decoder, "transition": transition, "posterior": posterior,
            "reward": reward}


def train_gflop(cfg, action_dim: int, distance: int) -> float:
    f = model_flops(cfg, action_dim)
    n = cfg.train.batch_size * cfg.train.chunk_length
    forward = n * (f["encoder"] + f["decoder"] + f["transition"] + f["posterior"] + f["reward"])
    forward += (distance - 1) * n * f["transition"] if distance > 1 else 0
    return 3 * forward / 1e9  # backward ~ twice the forward


def plan_gflop(cfg, action_dim: int, batch: int) -> float:
    f = model_flops(cfg, action_dim)
    p = cfg.planner
    return batch * p.iterations * p.candidates * p.horizon * (f["transition"] + f["reward"]) / 1e9


def _timed(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


_LOOP_SCOPES = {"while", "body", "closed_call", "checkpoint"}


def _hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the JAX operation it came from (its op_name metadata without the jit
    prefix and the scopes of loops), for every instruction but control flow, whose events would
    contain those of its body."""
    names = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?)metadata=\{[^}]*?op_name=\"([^\"]*)\"",
                             hlo_text, re.MULTILINE):
        if re.search(r"\s(while|conditional|call)\(", match.group(2)):
            continue
        op = re.sub(r"^jit\([^)]*\)/", "", match.group(3))
        names[match.group(1)] = "/".join(part for part in op.split("/") if part not in _LOOP_SCOPES)
    return names


def profile_ops(call, hlo_text: str, top: int) -> list[list]:
    """Runs call() once under jax.profiler; the `top` JAX operations by total time, as
    [seconds, operation] (`_op_seconds` per instruction, summed over the instructions compiled
    from one operation)."""
    import jax

    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            call()
        traces = list(Path(logdir).rglob("*.trace.json.gz"))
        events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"] if traces else []
    names = _hlo_op_names(hlo_text)
    totals: dict[str, float] = {}
    for instruction, seconds in _op_seconds(events, set(names)).items():
        totals[names[instruction]] = totals.get(names[instruction], 0.0) + seconds
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [[round(seconds, 6), op] for op, seconds in ranked]


def _op_seconds(events: list[dict], instructions: set[str]) -> dict[str, float]:
    """Seconds per XLA instruction in a trace's events, from each run's start to its end. XLA:CPU
    runs some instructions (its convolutions, some dots and loop fusions) on its thread pool: their
    event covers only the launch, and a later 'end: <name>' event follows the run's end. Not every
    run has one, and a marker can come late (after the enclosing loop, on two cores); a run of an
    instruction starts only after its previous run ended, so a marker ends the instruction's open
    run, and an open run without a marker when the next one starts counts its event alone. Runs of
    different instructions can overlap on a multi-core CPU, so the figures can add up to more than
    the call's time, and a late marker can still lengthen an instruction's last run."""
    seconds: dict[str, float] = {}
    running: dict[str, dict] = {}
    timed = (e for e in events if e.get("ph") == "X" and "ts" in e)
    for event in sorted(timed, key=lambda e: (e["ts"], not e.get("name", "").startswith("end: "))):
        name = event.get("name", "")
        if name in instructions:
            seconds[name] = seconds.get(name, 0.0) + event.get("dur", 0) / 1e6
            running[name] = event
        elif name.startswith("end: ") and name[5:] in running:
            start = running.pop(name[5:])
            seconds[name[5:]] += max(0.0, event["ts"] - start["ts"] - start.get("dur", 0)) / 1e6
    return seconds


def worker(name: str, iters: int, warmup: int, profile: int = 0) -> dict:
    """Runs one measurement in this process and returns its JSON record (with the `profile` most
    expensive operations of one more call when profile > 0)."""
    import jax
    import jax.numpy as jnp

    from planet_jax import autotune, config, learner, planner, rssm, runtime
    from planet_jax.objective import Batch

    cache = runtime.use_compilation_cache()  # as the training entry point does
    events: list[str] = []
    listen = lambda event, **kwargs: events.append(event)
    jax.monitoring.register_event_listener(listen)

    preset, kind, overrides, plan_batch, _ = MEASUREMENTS[name]
    cfg = config.override(config.PRESETS[preset](), overrides)
    distance = cfg.loss.overshooting_distance
    key = jax.random.PRNGKey(0)
    extra = {}
    if kind == "matmul":
        call, hlo, gflop, compile_s, extra = _matmul_peak(iters, warmup)
    elif kind == "train":
        B, T = cfg.train.batch_size, cfg.train.chunk_length
        state = learner.init_train_state(cfg, ACTION_DIM, key)
        batch = Batch(jax.random.randint(key, (B, T, 64, 64, 3), 0, 256).astype(jnp.uint8),
                      jax.random.uniform(key, (B, T, ACTION_DIM), minval=-1, maxval=1),
                      jax.random.normal(key, (B, T)))
        step = learner.make_train_step(cfg)
        t0 = time.perf_counter()
        compiled = learner.compile_train_step(step, state, batch, key)  # as the training loop does
        compile_s = time.perf_counter() - t0
        box = {"state": state}

        def call():
            box["state"], metrics = compiled(box["state"], batch, key)
            jax.block_until_ready(metrics["loss"])

        hlo = compiled.as_text

        gflop = train_gflop(cfg, ACTION_DIM, distance)
    else:
        params = learner.init_train_state(cfg, ACTION_DIM, key).params
        plan = planner.make_planner(cfg.model, cfg.planner, ACTION_DIM)
        n = plan_batch
        state = rssm.RSSMState(jax.random.uniform(key, (n, cfg.model.h_size), minval=-1, maxval=1),
                               jax.random.normal(key, (n, cfg.model.s_size)))
        keys = jax.random.split(key, n)
        t0 = time.perf_counter()
        jax.block_until_ready(plan(params, state, keys))
        compile_s = time.perf_counter() - t0  # first call: trace + compile + one run

        def call():
            jax.block_until_ready(plan(params, state, keys))

        hlo = lambda: plan.lower(params, state, keys).compile().as_text()

        gflop = plan_gflop(cfg, ACTION_DIM, n)
    jax.monitoring.unregister_event_listener(listen)  # what compiled before the timed calls
    compile_events = events
    times = _timed(call, iters, warmup)
    median = statistics.median(times)
    record = {"impl": "planet_jax", "measurement": name, "median_s": round(median, 4),
              "min_s": round(min(times), 4), "max_s": round(max(times), 4), "n": len(times),
              "compile_s": round(compile_s, 2), "gflop": round(gflop, 2),
              "gflops_per_s": round(gflop / median, 2),
              "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "jax": jax.__version__, "backend": jax.default_backend(),
              "load_1m": round(os.getloadavg()[0], 2),
              # programs loaded from jax's compilation cache (a run after the first on this machine)
              # or not found there and compiled; 'off' without the cache
              "compilation_cache": "off" if cache is None else {
                  "hits": compile_events.count("/jax/compilation_cache/cache_hits"),
                  "misses": compile_events.count("/jax/compilation_cache/cache_misses")},
              **extra}
    if kind != "matmul":  # what planet_jax.autotune chose on this machine (cached), by op and shape
        record["autotune"] = {f"{op} {key}": entry.get("choice") for op, by_key in autotune.choices().items()
                              for key, entry in by_key.items()}
    if profile:  # after the peak-memory reading, which profiling would inflate
        record["top_ops"] = profile_ops(call, hlo(), profile)
    return record


MATMUL_SHAPE = (65536, 576, 128)  # (M, K, N): about the encoder's second layer over a group of images
# Large products, where XLA's float32 matmuls come nearest the machine's peak: the matmul ceiling is
# the best rate over these and MATMUL_SHAPE (a conv-like shape alone understates it).
CEILING_SHAPES = ((2048, 2048, 2048), (8192, 512, 512))


def _matmul_peak(iters: int, warmup: int):
    """GFLOP/s of M x K by K x N matmuls (float32 accumulation): at MATMUL_SHAPE in float32 and
    bfloat16, as x @ w and as x^T @ g (contracting the long axis, as kernel gradients do), and in
    float32 at each of CEILING_SHAPES; the ceiling is the best float32 rate of them all, with
    NumPy's float32 rate at CEILING_SHAPES[0] beside it (the machine's BLAS, outside XLA). Returns
    the benchmark's (call, hlo, gflop, compile seconds, extra fields) for float32 x @ w at MATMUL_SHAPE."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    forward = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    kernel_grad = jax.jit(lambda x, g: lax.dot_general(x, g, (((0,), (0,)), ((), ())),
                                                       preferred_element_type=jnp.float32))
    normal = lambda seed, shape, dtype: jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)
    gflop = lambda m, k, n: 2 * m * k * n / 1e9
    cases = []  # (label, function, arguments, GFLOP of one call)
    m, k, n = MATMUL_SHAPE
    for dtype in ("float32", "bfloat16"):
        x, w, g = normal(0, (m, k), dtype), normal(1, (k, n), dtype), normal(2, (m, n), dtype)
        cases += [(f"{dtype} x@w", forward, (x, w), gflop(m, k, n)),
                  (f"{dtype} xT@g", kernel_grad, (x, g), gflop(m, k, n))]
    for cm, ck, cn in CEILING_SHAPES:
        cases.append((f"float32 x@w {cm}x{ck}x{cn}", forward, (normal(3, (cm, ck), "float32"),
                                                             normal(4, (ck, cn), "float32")), gflop(cm, ck, cn)))
    rates, calls = {}, {}
    for label, fn, args, work in cases:
        call = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        call()
        calls[label] = (call, time.perf_counter() - t0, lambda fn=fn, args=args: fn.lower(*args).compile().as_text())
        rates[label] = round(work / statistics.median(_timed(call, iters, warmup)), 2)
    cm, ck, cn = CEILING_SHAPES[0]
    a, b = np.ones((cm, ck), np.float32), np.ones((ck, cn), np.float32)
    numpy_rate = round(gflop(cm, ck, cn) / statistics.median(_timed(lambda: a @ b, iters, warmup)), 2)
    call, compile_s, hlo = calls["float32 x@w"]
    return call, hlo, gflop(m, k, n), compile_s, {
        "shape_mkn": list(MATMUL_SHAPE), "gflops_per_s_by_case": rates,
        "ceiling_gflops_per_s": max(rate for label, rate in rates.items() if label.startswith("float32")),
        "numpy_float32_gflops_per_s": numpy_rate}


def machine() -> dict:
    """The machine a set of figures was measured on: CPU model, cores, load averages, versions."""
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    import jax

    from planet_jax import autotune
    return {"machine": autotune.cpu_model(), "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "jax": jax.__version__, "torch": torch_version, "python": platform.python_version()}


def _subprocess_json(cmd: list[str], env: dict) -> dict:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{' '.join(cmd[1:4])} failed: {tail}"}
    return json.loads(lines[-1])


def _ceiling(records: list[dict]) -> str:
    """The matmul line's ceiling for the table: XLA's best float32 rate over the line's shapes
    (median over rounds) and NumPy's beside it, or, in records without them, the line's own rate."""
    rates = [r.get("ceiling_gflops_per_s", r["gflops_per_s"]) for r in records]
    text = f"{statistics.median(rates):.1f} GFLOP/s"
    if numpy_rates := [r["numpy_float32_gflops_per_s"] for r in records if "numpy_float32_gflops_per_s" in r]:
        text += f" (XLA's best of its shapes; NumPy's {statistics.median(numpy_rates):.1f})"
    return text


def speed_table(records: list[dict], command: str) -> str:
    """The README's speed table (markdown) from one invocation's JSON lines: the machine line (CPU
    model, cores, versions), the matmul ceiling, and per measurement the medians of planet_jax and
    of the reference (median over rounds), their ratio and peak resident memory."""
    head = records[0]
    by_name: dict[str, dict[str, list[dict]]] = {}
    for r in records[1:]:
        if "median_s" in r:
            side = "jax" if r.get("impl") == "planet_jax" else "torch"
            by_name.setdefault(r["measurement"], {"jax": [], "torch": []})[side].append(r)
    ceiling = by_name.pop("matmul_peak", {}).get("jax")
    lines = [f"Measured on {head['machine']} ({head['cpus']} cores), jax {head['jax']}, "
             f"PyTorch {head.get('torch', 'not installed')}"
             + (f", float32 matmul ceiling {_ceiling(ceiling)}" if ceiling else "")
             + f"; `{command}`:", "",
             "| measurement | planet_jax | PyTorch | ratio | peak memory (jax / torch) |",
             "|---|---|---|---|---|"]
    seconds = lambda rs: statistics.median(r["median_s"] for r in rs) if rs else None
    gigabytes = lambda rs: f"{max(r['max_rss_mb'] for r in rs) / 1024:.1f}" if rs else "-"
    for name, sides in by_name.items():
        jax_s, ref_s = seconds(sides["jax"]), seconds(sides["torch"])
        cells = [f"{x:.3g} s" if x is not None else "-" for x in (jax_s, ref_s)]
        ratio = f"{jax_s / ref_s:.2f}" if jax_s and ref_s else "-"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} | "
                     f"{gigabytes(sides['jax'])} / {gigabytes(sides['torch'])} GB |")
    # Loading a program instead of compiling it saves the compiler's time and its peak memory.
    origin = {"loaded": [], "compiled": []}
    for name, sides in by_name.items():
        caches = [r.get("compilation_cache") for r in sides["jax"] if r.get("compilation_cache")]
        if caches:
            loaded = all(c != "off" and c["hits"] and not c["misses"] for c in caches)
            origin["loaded" if loaded else "compiled"].append(name)
    if origin["loaded"]:
        lines += ["", f"planet_jax's programs were loaded from jax's compilation cache for {', '.join(origin['loaded'])}"
                      + (f" and compiled in the process, in some rounds, for {', '.join(origin['compiled'])}"
                         if origin["compiled"] else "")
                      + " (`runtime.use_compilation_cache`)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(MEASUREMENTS) + sorted(GROUPS),
                        default=list(MEASUREMENTS), metavar="NAME",
                        help=f"measurements ({', '.join(MEASUREMENTS)}) or sets of them ({', '.join(GROUPS)}: "
                             "the matmul ceiling, the train step and decisions for 1 and 8 environments)")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also run ../shared/bench/torch_reference.py, alternating, and print ratios")
    parser.add_argument("--torch-reference", type=Path, default=TORCH_REFERENCE, metavar="PATH",
                        help=f"the reference script (default: {TORCH_REFERENCE})")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compare-torch: alternate this many times per measurement")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="add the N most expensive operations of one more profiled call (top_ops)")
    parser.add_argument("--table", action="store_true",
                        help="end with the README's speed table (markdown) made from this invocation's lines")
    parser.add_argument("--worker", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.rounds < 1 or args.profile < 0:
        parser.error("--iters and --rounds must be positive and --warmup and --profile non-negative")
    if args.worker:
        print(json.dumps(worker(args.worker, args.iters, args.warmup, args.profile)))
        return 0
    if args.compare_torch:
        try:
            import torch  # noqa: F401  (only the reference needs it)
        except ImportError:
            parser.exit(2, f"{parser.prog}: error: --compare-torch needs PyTorch (pip install torch==2.13.0)\n")
        if not args.torch_reference.exists():
            parser.exit(2, f"{parser.prog}: error: {args.torch_reference} not found\n")
    env = dict(os.environ)
    records = [machine()]
    print(json.dumps(records[0]), flush=True)
    names = list(dict.fromkeys(n for item in args.only for n in GROUPS.get(item, [item])))
    for name in names:
        ours_cmd = [sys.executable, "-m", "experiments.benchmark", "--worker", name,
                    "--iters", str(args.iters), "--warmup", str(args.warmup), "--profile", str(args.profile)]
        torch_args = MEASUREMENTS[name][4]
        compare = args.compare_torch and torch_args is not None
        for _ in range(args.rounds if compare else 1):
            ours = _subprocess_json(ours_cmd, env)
            records.append(ours)
            print(json.dumps(ours), flush=True)
            if not compare:
                continue
            ref_cmd = [sys.executable, str(args.torch_reference), *torch_args, "--iters", str(args.iters),
                       "--warmup", str(args.warmup)]
            ref = _subprocess_json(ref_cmd, {**env, "THP_MEM_ALLOC_ENABLE": "1"})
            ref["measurement"] = name
            ref["load_1m"] = round(os.getloadavg()[0], 2)
            records.append(ref)
            print(json.dumps(ref), flush=True)
            if "median_s" in ours and "median_s" in ref:
                print(json.dumps({"ratio": name, "time_jax_over_torch": round(ours["median_s"] / ref["median_s"], 3),
                                  "rss_jax_over_torch": round(ours["max_rss_mb"] / ref["max_rss_mb"], 3)}),
                      flush=True)
    if args.table:
        print("\n" + speed_table(records, "python -m experiments.benchmark " + " ".join(argv or sys.argv[1:])))
    return 0


if __name__ == "__main__":
    cli.restart_with_huge_pages()
    raise SystemExit(main())
