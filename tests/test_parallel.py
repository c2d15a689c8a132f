"""Data-parallel training on 4 forced host devices.

XLA_FLAGS must be set before JAX starts, so every check runs in a subprocess of its own.
"""
import json
import os
import subprocess
import sys

from tests.conftest import xla_flags

FOUR_DEVICES = "--xla_force_host_platform_device_count=4"
ENV = "cartpole_swingup"

# Three steps of the single-device step and of the 4-device step from the same state, batches and
# keys; prints what the test checks as one JSON line.
SHARDED_VS_SINGLE = r"""
import json
import jax, numpy as np
from planet_jax import config, learner, objective, parallel

cfg = config.override(config.tiny(), ["loss.overshooting_distance=3"])
B, T = 8, 8
rng = np.random.default_rng(0)
batches = [objective.Batch(rng.integers(0, 256, (B, T, 64, 64, 3), dtype=np.uint8),
                           rng.uniform(-1, 1, (B, T, 2)).astype(np.float32),
                           rng.normal(size=(B, T)).astype(np.float32)) for _ in range(3)]
keys = [jax.random.PRNGKey(10 + i) for i in range(3)]

def run(mesh):
    state = learner.init_train_state(cfg, 2, jax.random.PRNGKey(0))
    step = learner.make_train_step(cfg, mesh)
    placed = None
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    for batch, key in zip(batches, keys):
        if mesh is not None:
            batch, key = parallel.shard_batch(batch, mesh), parallel.replicate(key, mesh)
            placed = batch
        state, metrics = step(state, batch, key)
    return state, metrics, placed, step

single, m1, _, _ = run(None)
mesh = parallel.make_mesh()
sharded, m4, batch, sharded_step = run(mesh)
diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                    single.params, sharded.params)
out = {
    "devices": len(jax.devices()),
    "max_param_diff": max(jax.tree.leaves(diff)),
    "lr": cfg.optim.lr,
    "grad_norm": [float(m1["grad_norm"]), float(m4["grad_norm"])],
    "changed": float(np.max(np.abs(np.asarray(jax.tree.leaves(single.params)[0])
                     - np.asarray(jax.tree.leaves(learner.init_train_state(cfg, 2, jax.random.PRNGKey(0)).params)[0])))),
    "loss": [float(m1["loss"]), float(m4["loss"])],
    "steps": [int(single.step), int(sharded.step)],
    "batch_devices": sorted(d.id for d in batch.obs.sharding.device_set),
    "shard_shapes": sorted({tuple(s.data.shape) for s in batch.obs.addressable_shards}),
    "shard_devices": sorted(s.device.id for s in batch.obs.addressable_shards),
    "param_devices": sorted(d.id for d in jax.tree.leaves(sharded.params)[0].sharding.device_set),
    "param_replicated": all(l.sharding.is_fully_replicated for l in jax.tree.leaves(sharded.params)),
}
# A NaN reward in the last sequence, which only device 3 holds: the all-reduced gradient is NaN on
# every device, so every replica keeps its state.
before = jax.device_get(sharded)
reward = batches[0].reward.copy()
reward[B - 1, 2] = np.nan
after, m_nan = sharded_step(sharded, parallel.shard_batch(batches[0]._replace(reward=reward), mesh),
                            parallel.replicate(keys[0], mesh))
out["nan_skipped"] = float(m_nan["skipped"])
out["nan_unchanged"] = all(np.array_equal(a, b) for a, b in
                           zip(jax.tree.leaves(jax.device_get(after)), jax.tree.leaves(before)))
out["nan_replicated"] = all(l.sharding.is_fully_replicated for l in jax.tree.leaves(after))
print(json.dumps(out))
"""


def _run(args, timeout=300):
    env = dict(os.environ, XLA_FLAGS=xla_flags(FOUR_DEVICES), MUJOCO_GL="egl")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_sharded_step_matches_single_device_step():
    result = _run(["-c", SHARDED_VS_SINGLE])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    # The batch is split along B over all four devices, two sequences each.
    assert out["batch_devices"] == [0, 1, 2, 3] and out["shard_devices"] == [0, 1, 2, 3]
    assert out["shard_shapes"] == [[2, 8, 64, 64, 3]]
    # Parameters stay replicated and equal the single-device result to float32 tolerance.
    assert out["param_devices"] == [0, 1, 2, 3] and out["param_replicated"]
    assert out["steps"] == [3, 3] and out["changed"] > 1e-4
    assert abs(out["loss"][0] - out["loss"][1]) <= 1e-5 * abs(out["loss"][0])
    assert abs(out["grad_norm"][0] - out["grad_norm"][1]) <= 1e-4 * out["grad_norm"][0], out  # third step
    # Sharding sums the gradients in another order (partial sums per device, then an all-reduce), so
    # they agree to float32 rounding, not bit for bit; Adam divides by sqrt(v) + eps, which turns the
    # rounding of near-zero gradient entries into update differences of up to ~|dg| / eps. Three
    # steps stay within 1% of one step's size (lr) of the single-device parameters.
    assert out["max_param_diff"] < 1e-2 * out["lr"], out
    # A non-finite update is skipped on the mesh as on one device: state bit for bit unchanged.
    assert out["nan_skipped"] == 1.0 and out["nan_unchanged"] and out["nan_replicated"], out


def test_batch_size_must_divide_across_devices(tmp_path):
    result = _run(["-m", "experiments.train", "--env", ENV, "--preset", "tiny", "--logdir",
                   str(tmp_path / "run"), "--set", "train.batch_size=6", "--no-progress"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "train.batch_size (6) must be a multiple of the number of devices (4 cpu devices)" in error
    assert "train.batch_size=4 or --set train.batch_size=8" in error
    assert not (tmp_path / "run").exists()


def test_training_run_on_four_devices(tmp_path):
    logdir = tmp_path / "run"
    result = _run(["-m", "experiments.train", "--env", ENV, "--preset", "tiny", "--logdir", str(logdir),
                   "--episodes", "3", "--no-progress"])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [1, 2, 3]
    assert records[-1]["updates"] == 5 and "test_return" in records[-1]
    assert (logdir / "videos" / "openloop_000003.mp4").stat().st_size > 0
    assert (logdir / "checkpoints" / "3").is_dir()
