"""planet_jax.loop pieces that the end-to-end CLI test does not pin down: the seed episodes' actions."""
import dataclasses

import numpy as np
import pytest

from planet_jax import config, loop, replay


def test_seed_action_scales_by_hand():
    np.testing.assert_array_equal(loop.seed_action_scales(0, 1, 5, graded=False), [1.0])
    np.testing.assert_array_equal(loop.seed_action_scales(2, 3, 5, graded=False), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(loop.seed_action_scales(0, 1, 5, graded=True), [0.2])
    np.testing.assert_allclose(loop.seed_action_scales(4, 1, 5, graded=True), [1.0])
    # A round of 4 environments starting at seed episode 3 of 5: the last one is past the seeds.
    np.testing.assert_allclose(loop.seed_action_scales(3, 4, 5, graded=True), [0.8, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("graded", [False, True])
def test_seed_episodes_use_their_action_range(tmp_path, graded):
    """A run of seed episodes only (no update): episode i's actions stay inside [-(i+1)/S, (i+1)/S]
    when graded, and reach beyond every smaller bound when not."""
    tiny = config.tiny()
    seeds = 4
    cfg = dataclasses.replace(tiny, train=dataclasses.replace(
        tiny.train, episodes=seeds, seed_episodes=seeds, graded_seed_actions=graded,
        cover_episode_ends=True))
    loop.train(cfg, "cartpole_balance", tmp_path / "run", seed=0, progress=False)
    memory = replay.Replay(tmp_path / "run" / "episodes", 0)
    assert memory.load() == seeds
    for i, episode in enumerate(memory.episodes):
        peak = np.abs(episode["action"][1:]).max()
        bound = (i + 1) / seeds
        if graded:
            assert peak <= bound + 1e-6
            assert peak > 0.5 * bound  # uniform over the range, not shrunk further
        else:
            assert peak > 0.5


class _Sampled(Exception):
    pass


@pytest.mark.parametrize("cover", [False, True])
def test_training_samples_with_cover_episode_ends(tmp_path, monkeypatch, cover):
    """The loop hands train.cover_episode_ends to the replay's sampler (stopped at the first draw)."""
    seen = []

    def sample(self, batch_size, chunk_length, cover_ends=False):
        seen.append((batch_size, chunk_length, cover_ends))
        raise _Sampled

    monkeypatch.setattr(replay.Replay, "sample", sample)
    tiny = config.tiny()
    cfg = dataclasses.replace(tiny, train=dataclasses.replace(tiny.train, cover_episode_ends=cover))
    with pytest.raises(_Sampled):
        loop.train(cfg, "cartpole_balance", tmp_path / "run", seed=0, progress=False)
    assert seen == [(tiny.train.batch_size, tiny.train.chunk_length, cover)]
