"""The procedural video dataset: deterministic per seed, disjoint splits, classes, sharding."""

from __future__ import annotations

import pytest
import torch

from salad_bench.harness.quality.data import (
    CLASS_NAMES,
    NUM_CLASSES,
    VAL_SEED_OFFSET,
    ProceduralVideos,
    ShardedSampler,
    VideoSpec,
    render_videos,
)

SMALL = VideoSpec(frames=4, height=16, width=16)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_default_spec_has_at_least_4096_tokens():
    spec = VideoSpec()
    assert spec.grid == (16, 16, 16)
    assert spec.tokens == 4096


def test_same_seed_same_video_and_different_seeds_differ():
    a = render_videos([3, 4], [1, 1], SMALL)
    b = render_videos([3, 4], [1, 1], SMALL)
    assert a.shape == (2, 3, 4, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    assert a.min() >= -1 and a.max() <= 1


def test_videos_move():
    v = render_videos([11], [0], SMALL)  # discs drifting
    assert (v[:, :, 1:] - v[:, :, :-1]).abs().mean() > 0.01


def test_classes_and_labels():
    assert NUM_CLASSES == 16 and len(set(CLASS_NAMES)) == 16
    ds = ProceduralVideos("train", 40, SMALL)
    x, y = ds.batch([0, 1, 17], "cpu")
    assert y.tolist() == [0, 1, 1]
    assert x.shape[0] == 3


def test_splits_are_disjoint():
    tr, va = ProceduralVideos("train", 2000, SMALL), ProceduralVideos("val", 64, SMALL)
    assert {tr.seed(i) for i in range(2000)}.isdisjoint({va.seed(i) for i in range(64)})
    assert va.seed(0) == VAL_SEED_OFFSET


def test_index_out_of_range_and_bad_split():
    with pytest.raises(IndexError):
        ProceduralVideos("train", 4, SMALL).batch([4])
    with pytest.raises(ValueError, match="split"):
        ProceduralVideos("test", 4, SMALL)


def test_spec_must_divide_by_patch():
    with pytest.raises(ValueError, match="patch"):
        VideoSpec(frames=4, height=15, width=16)


def test_sharded_sampler_partitions_each_global_batch():
    size, per_rank, world = 40, 2, 4
    steps_per_epoch = size // (per_rank * world)
    seen = []
    for step in range(steps_per_epoch):
        parts = [ShardedSampler(size, per_rank, rank=r, world=world).batch_indices(step) for r in range(world)]
        flat = [i for p in parts for i in p]
        assert len(flat) == len(set(flat)) == per_rank * world
        seen += flat
    assert sorted(seen) == list(range(size))  # one epoch covers the split exactly once
    nxt = ShardedSampler(size, per_rank).batch_indices(steps_per_epoch)  # next epoch reshuffles
    assert len(nxt) == per_rank


def test_stream_sampler_never_repeats():
    s0, s1 = ShardedSampler(None, 3, rank=0, world=2), ShardedSampler(None, 3, rank=1, world=2)
    idx = [i for step in range(5) for i in s0.batch_indices(step) + s1.batch_indices(step)]
    assert len(idx) == len(set(idx))
