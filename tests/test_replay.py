"""Tests for planet_jax.replay: file format, atomic writes, corruption handling, chunk sampling."""
import errno
import json
import os
import warnings

import numpy as np
import pytest
from planet_jax import replay as replay_module

from planet_jax.replay import (CorruptEpisodeError, Replay, load_episode, save_episode)

A = 2
SIZE = 8  # small frames keep the tests fast; the code does not depend on 64x64


def coded_episode(episode_id: int, rows: int) -> dict:
    """An episode whose every value encodes (episode id, row), so a chunk reveals its origin."""
    t = np.arange(rows)
    obs = np.zeros((rows, SIZE, SIZE, 3), np.uint8)
    obs[:, 0, 0, 0] = episode_id
    obs[:, 0, 0, 1] = t % 256
    obs[:, 0, 0, 2] = t // 256
    action = np.stack([np.full(rows, episode_id), t], axis=1).astype(np.float32)
    reward = (1000 * episode_id + t).astype(np.float32)
    return {"obs": obs, "action": action, "reward": reward}


def random_episode(rng, rows: int) -> dict:
    return {
        "obs": rng.integers(0, 256, (rows, SIZE, SIZE, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, (rows, A)).astype(np.float32),
        "reward": rng.normal(size=rows).astype(np.float32),
    }


def test_save_load_roundtrip(tmp_path):
    episode = random_episode(np.random.default_rng(0), 13)
    path = save_episode(tmp_path, episode, 7)
    assert path.name == "episode_000007_13.npz"
    loaded = load_episode(path)
    assert set(loaded) == {"obs", "action", "reward"}
    for key in episode:
        assert loaded[key].dtype == episode[key].dtype
        np.testing.assert_array_equal(loaded[key], episode[key])


def test_atomic_write_leaves_only_final_file(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        save_episode(tmp_path, random_episode(rng, 5 + i), i)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["episode_000000_5.npz", "episode_000001_6.npz", "episode_000002_7.npz"]


@pytest.mark.parametrize("bad", [
    {"obs": np.zeros((4, SIZE, SIZE, 3), np.float32)},  # wrong obs dtype
    {"action": np.zeros((3, A), np.float32)},           # length mismatch
    {"reward": np.zeros((4, 1), np.float32)},           # wrong rank
    {"action": np.zeros((4, A), np.float64)},           # wrong action dtype
])
def test_save_rejects_inconsistent_episode(tmp_path, bad):
    episode = {**random_episode(np.random.default_rng(2), 4), **bad}
    with pytest.raises(ValueError):
        save_episode(tmp_path, episode, 0)
    assert list(tmp_path.iterdir()) == []


def _episodes_then_failed_write(tmp_path, monkeypatch, target, failure):
    """Two episodes written, then a third whose `target` call (in planet_jax.replay) raises
    `failure`, after writing part of the file where it is the writer. Returns the error."""
    rng = np.random.default_rng(9)
    first = [random_episode(rng, 5 + i) for i in range(2)]
    for i, episode in enumerate(first):
        save_episode(tmp_path, episode, i)
    module, name = target
    original = getattr(module, name)

    def failing(*args, **kwargs):
        if name == "savez_compressed":
            args[0].write(b"PK\x03\x04 part of an episode")
        raise failure
    monkeypatch.setattr(module, name, failing)
    with pytest.raises(replay_module.StorageError) as info:
        save_episode(tmp_path, random_episode(rng, 9), 2)
    monkeypatch.setattr(module, name, original)
    # Nothing partial anywhere (no temp file either), and the earlier episodes read back whole.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episode_000000_5.npz", "episode_000001_6.npz"]
    for i, episode in enumerate(first):
        loaded = load_episode(tmp_path / f"episode_{i:06d}_{5 + i}.npz")
        np.testing.assert_array_equal(loaded["obs"], episode["obs"])
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("target, code", [
    ((replay_module.np, "savez_compressed"), errno.ENOSPC),   # disk full while writing
    ((replay_module.tempfile, "mkstemp"), errno.EACCES),      # permission lost
    ((replay_module.os, "replace"), errno.ENOENT),            # folder removed before the rename
])
def test_a_failed_episode_write_is_one_line_and_leaves_nothing_partial(tmp_path, monkeypatch, target, code):
    error = _episodes_then_failed_write(tmp_path, monkeypatch, target, OSError(code, os.strerror(code)))
    path = tmp_path / "episode_000002_9.npz"
    assert str(error) == f"cannot write episode {path}: {os.strerror(code)} ({errno.errorcode[code]})"
    assert isinstance(error, OSError) and error.errno == code and error.filename == str(path)
    # Once the disk is fixed the same write succeeds.
    episode = random_episode(np.random.default_rng(10), 9)
    assert load_episode(save_episode(tmp_path, episode, 2))["reward"].tolist() == episode["reward"].tolist()


# A real failed write, no patching: the child may write files of at most 4 KiB (RLIMIT_FSIZE), so
# the kernel refuses the first episode's bytes past that with EFBIG, as a full disk refuses them.
SIZE_LIMITED_WRITER = """
import resource, signal, sys
import numpy as np
from planet_jax import replay
rng = np.random.default_rng(0)
episode = lambda rows: {"obs": rng.integers(0, 256, (rows, 8, 8, 3), dtype=np.uint8),
                        "action": np.zeros((rows, 2), np.float32), "reward": np.zeros(rows, np.float32)}
replay.save_episode(sys.argv[1], episode(2), 0)  # about 1 KiB: fits
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal that kills
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    replay.save_episode(sys.argv[1], episode(200), 1)
except replay.StorageError as err:
    print(err)
"""


def test_a_write_the_kernel_refuses_leaves_nothing_partial(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", SIZE_LIMITED_WRITER, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "episode_000001_200.npz"
    assert result.stdout == f"cannot write episode {path}: File too large (EFBIG)\n"
    assert [p.name for p in tmp_path.iterdir()] == ["episode_000000_2.npz"]
    assert load_episode(tmp_path / "episode_000000_2.npz")["obs"].shape == (2, 8, 8, 3)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_file_raises_corrupt_episode_error(tmp_path):
    path = save_episode(tmp_path, random_episode(np.random.default_rng(3), 20), 0)
    truncate(path)
    with pytest.raises(CorruptEpisodeError, match=path.name) as info:
        load_episode(path)
    assert "\n" not in str(info.value)


def test_missing_key_raises_corrupt_episode_error(tmp_path):
    path = tmp_path / "episode_000000_3.npz"
    np.savez_compressed(path, obs=np.zeros((3, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(CorruptEpisodeError, match=path.name):
        load_episode(path)


def test_replay_load_skips_corrupt_file_with_warning(tmp_path):
    writer = Replay(tmp_path, seed=0)
    for i, rows in enumerate([6, 7, 8]):
        writer.add(coded_episode(i, rows))
    bad = tmp_path / "episode_000001_7.npz"
    truncate(bad)

    replay = Replay(tmp_path, seed=0)
    with pytest.warns(UserWarning, match=bad.name):
        assert replay.load() == 2
    assert replay.num_episodes == 2
    assert replay.num_steps == 5 + 7
    assert [ep["reward"][0] for ep in replay.episodes] == [0.0, 2000.0]
    # A new episode must not overwrite the corrupt file's index.
    path = replay.add(coded_episode(3, 4))
    assert path.name == "episode_000003_4.npz"


def test_add_and_reload_preserves_order(tmp_path):
    replay = Replay(tmp_path, seed=0)
    for i in range(12):  # past 10, so file order matters (index is zero-padded)
        replay.add(coded_episode(i, 3 + i))
    assert replay.num_episodes == 12
    assert replay.num_steps == sum(2 + i for i in range(12))
    reloaded = Replay(tmp_path, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reloaded.load() == 12
    for i, episode in enumerate(reloaded.episodes):
        np.testing.assert_array_equal(episode["action"][:, 0], i)
        assert len(episode["reward"]) == 3 + i


def test_sample_shapes_and_dtypes(tmp_path):
    replay = Replay(tmp_path, seed=0)
    replay.add(coded_episode(0, 10))
    replay.add(coded_episode(1, 12))
    batch = replay.sample(4, 6)
    assert batch.obs.shape == (4, 6, SIZE, SIZE, 3) and batch.obs.dtype == np.uint8
    assert batch.action.shape == (4, 6, A) and batch.action.dtype == np.float32
    assert batch.reward.shape == (4, 6) and batch.reward.dtype == np.float32


@pytest.mark.parametrize("cover_ends", [False, True])
def test_sampled_chunks_are_contiguous_slices_of_one_episode(tmp_path, cover_ends):
    lengths = [5, 9, 16, 7]
    replay = Replay(tmp_path, seed=1)
    for i, rows in enumerate(lengths):
        replay.add(coded_episode(i, rows))
    chunk = 5
    batch = replay.sample(200, chunk, cover_ends)
    seen_starts = set()
    for b in range(200):
        episode_id = int(batch.action[b, 0, 0])
        start = int(batch.action[b, 0, 1])
        assert 0 <= start <= lengths[episode_id] - chunk
        expected = coded_episode(episode_id, lengths[episode_id])
        for key in ("obs", "action", "reward"):
            np.testing.assert_array_equal(getattr(batch, key)[b], expected[key][start:start + chunk])
        seen_starts.add((episode_id, start))
    # Every valid (episode, start) pair is reachable: 1 + 5 + 12 + 3 = 21 pairs, 200 draws.
    assert len(seen_starts) == sum(n - chunk + 1 for n in lengths)


def test_sampling_is_uniform_over_valid_starts(tmp_path):
    replay = Replay(tmp_path, seed=2)
    replay.add(coded_episode(0, 10))
    replay.add(coded_episode(1, 30))
    chunk, draws = 5, 20000
    episode_ids = replay.sample(draws, chunk).action[:, 0, 0]
    p = (30 - chunk + 1) / ((10 - chunk + 1) + (30 - chunk + 1))  # 26 / 32
    std = np.sqrt(p * (1 - p) / draws)
    assert abs(np.mean(episode_ids == 1) - p) < 5 * std


def test_cover_ends_start_distribution_and_coverage(tmp_path):
    """Start frequencies against an enumeration of the clamped starts; every row covered at least
    as often as a middle row, where uniform starts cover row 0 L times less."""
    lengths, chunk, draws = [3, 12, 30], 5, 60000
    replay = Replay(tmp_path, seed=3)
    for i, rows in enumerate(lengths):
        replay.add(coded_episode(i, rows))
    # Independent expectation: every start in -(L-1) .. R-1 of every long-enough episode equally
    # likely, clamped into 0 .. R-L.
    expected = {}
    for episode_id, rows in enumerate(lengths):
        if rows < chunk:
            continue
        for start in range(-(chunk - 1), rows):
            pair = (episode_id, min(max(start, 0), rows - chunk))
            expected[pair] = expected.get(pair, 0) + 1
    total = sum(expected.values())
    batch = replay.sample(draws, chunk, cover_ends=True)
    pairs = [(int(e), int(s)) for e, s in batch.action[:, 0]]
    counts = {pair: pairs.count(pair) for pair in set(pairs)}
    assert set(counts) == set(expected)  # the 3-row episode never, every clamped start reachable
    for pair, weight in expected.items():
        p = weight / total
        assert abs(counts[pair] / draws - p) < 5 * np.sqrt(p * (1 - p) / draws), pair
    assert expected[(2, 0)] == chunk and expected[(2, 1)] == 1  # reset frame: L times a middle start

    # Row coverage of the 30-row episode: uniform starts against cover_ends.
    def coverage(sample):
        rows = sample.action[sample.action[:, 0, 0] == 2][:, :, 1].astype(int)
        return np.bincount(rows.ravel(), minlength=30) / len(rows)
    uniform = coverage(replay.sample(draws, chunk))
    covered = coverage(batch)
    middle = slice(chunk, 30 - chunk)
    assert uniform[0] < 0.4 * uniform[middle].mean()
    assert covered.min() > 0.9 * covered[middle].mean()


def test_sample_errors(tmp_path):
    replay = Replay(tmp_path, seed=0)
    with pytest.raises(ValueError, match="empty"):
        replay.sample(2, 3)
    replay.add(coded_episode(0, 4))
    replay.add(coded_episode(1, 6))
    with pytest.raises(ValueError, match="chunk_length"):
        replay.sample(2, 7)
    with pytest.raises(ValueError):
        replay.sample(0, 3)
    with pytest.raises(ValueError):
        replay.sample(2, 0)
    # A chunk exactly as long as the longest episode has one valid start.
    batch = replay.sample(3, 6)
    np.testing.assert_array_equal(batch.action[:, :, 0], 1)
    np.testing.assert_array_equal(batch.action[:, 0, 1], 0)


@pytest.mark.parametrize("cover_ends", [False, True])
def test_episodes_shorter_than_a_chunk_are_skipped_not_padded(tmp_path, cover_ends):
    """Terminal episodes of 3 and 2 rows beside longer ones: never drawn, and no chunk is padded."""
    lengths = [3, 12, 2, 7]
    replay = Replay(tmp_path, seed=2)
    for i, rows in enumerate(lengths):
        replay.add(coded_episode(i, rows))
    batch = replay.sample(300, 6, cover_ends)
    drawn = {int(e) for e in batch.action[:, 0, 0]}
    assert drawn == {1, 3}
    np.testing.assert_array_equal(batch.action[:, :, 0], batch.action[:, :1, 0].repeat(6, 1))
    np.testing.assert_array_equal(np.diff(batch.action[:, :, 1], axis=1), 1)  # consecutive rows
    with pytest.raises(ValueError) as info:
        replay.sample(2, 13, cover_ends)
    message = str(info.value)
    assert "\n" not in message and "longest has 12" in message and "skipped, not padded" in message


def test_add_rejects_mismatched_action_dim(tmp_path):
    replay = Replay(tmp_path, seed=0)
    replay.add(coded_episode(0, 4))
    other = coded_episode(1, 4)
    other["action"] = np.zeros((4, A + 1), np.float32)
    with pytest.raises(ValueError):
        replay.add(other)
    assert replay.num_episodes == 1


def fill(replay):
    for i, rows in enumerate([8, 20, 13]):
        replay.add(coded_episode(i, rows))


def test_same_seed_same_samples(tmp_path):
    first, second = Replay(tmp_path / "a", seed=5), Replay(tmp_path / "b", seed=5)
    fill(first)
    fill(second)
    for _ in range(3):
        np.testing.assert_array_equal(first.sample(8, 4).reward, second.sample(8, 4).reward)
    other = Replay(tmp_path / "c", seed=6)
    fill(other)
    assert not np.array_equal(first.sample(8, 4).reward, other.sample(8, 4).reward)


def test_state_dict_restore_continues_stream(tmp_path):
    replay = Replay(tmp_path, seed=9)
    fill(replay)
    replay.sample(8, 4)
    state = json.loads(json.dumps(replay.state_dict()))  # survives a JSON checkpoint
    expected = [replay.sample(8, 4).reward for _ in range(3)]

    resumed = Replay(tmp_path, seed=123)
    resumed.load()
    resumed.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(resumed.sample(8, 4).reward, want)
