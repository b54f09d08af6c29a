"""The resumable distributed sampler: one global order per (seed, epoch), sharded, resumed in O(1)."""

import itertools

import numpy as np
import pytest

from ds_mlm.errors import UserError
from ds_mlm.sampler import ResumableDistributedSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def global_stream(num_samples, micro, world, steps, seed=7):
    """The global sample order seen by a world of `world` ranks, step by step."""
    ranks = [take(ResumableDistributedSampler(num_samples, micro, r, world, seed), steps) for r in range(world)]
    return [i for step in zip(*ranks) for _, idx in step for i in idx]


def test_global_order_does_not_depend_on_world_size():
    one = global_stream(100, 4, 1, 24)
    assert one == global_stream(100, 2, 2, 24) == global_stream(100, 1, 4, 24)


def test_an_epoch_has_no_duplicates_ranks_are_disjoint_and_epochs_differ():
    world, micro = 3, 5
    batches = [take(ResumableDistributedSampler(100, micro, r, world, seed=1), 12) for r in range(world)]
    per_epoch = 100 // (micro * world)  # 6 global micro-batches, 10 samples dropped
    first = [i for b in batches for epoch, idx in b[:per_epoch] for i in idx]
    assert len(first) == len(set(first)) == per_epoch * micro * world
    assert {e for b in batches for e, _ in b[:per_epoch]} == {0}
    assert {e for b in batches for e, _ in b[per_epoch:]} == {1}
    second = [i for b in batches for _, idx in b[per_epoch:] for i in idx]
    assert first != second and len(set(second)) == len(second)


@pytest.mark.parametrize("stop", [0, 1, 5, 6, 7, 13])
def test_resume_yields_exactly_what_continuing_would(stop):
    original = ResumableDistributedSampler(100, 4, rank=1, world_size=4, seed=3)
    it = iter(original)
    for _ in range(stop):
        next(it)
    state = original.state_dict()
    expected = [next(it) for _ in range(10)]
    resumed = ResumableDistributedSampler(100, 4, rank=1, world_size=4, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 10) == expected


def test_resume_jumps_without_replaying():
    sampler = ResumableDistributedSampler(10**6, 8, seed=0)
    sampler.load_state_dict({"consumed_samples": 10**12, "seed": 0, "num_samples": 10**6})
    epoch, offset = sampler.position()
    assert (epoch, offset) == divmod(10**12, 10**6)
    (got_epoch, idx), = take(sampler, 1)
    assert got_epoch == epoch and idx == sampler.order(epoch)[offset:offset + 8].tolist()


def test_order_is_a_seeded_permutation():
    a, b = ResumableDistributedSampler(50, 2, seed=5), ResumableDistributedSampler(50, 2, seed=6)
    assert sorted(a.order(0)) == list(range(50))
    assert not np.array_equal(a.order(0), b.order(0)) and not np.array_equal(a.order(0), a.order(1))
    assert np.array_equal(a.order(3), ResumableDistributedSampler(50, 2, seed=5).order(3))


def test_errors_name_the_fix():
    with pytest.raises(UserError, match="per_device_train_batch_size"):
        ResumableDistributedSampler(7, 4, 0, 2)
    sampler = ResumableDistributedSampler(100, 4)
    with pytest.raises(UserError, match="same data"):
        sampler.load_state_dict({"consumed_samples": 8, "seed": 42, "num_samples": 99})
    with pytest.raises(UserError, match="same seed"):
        sampler.load_state_dict({"consumed_samples": 8, "seed": 1, "num_samples": 100})
