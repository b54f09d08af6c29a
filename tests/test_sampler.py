"""ResumableDistributedSampler: world-size-independent global order, sharding, epochs, O(1) exact resume."""

import itertools

import numpy as np
import pytest

from ds_mlm.errors import UserError
from ds_mlm.sampler import ResumableDistributedSampler


def take(sampler, n):
    return list(itertools.islice(sampler, n))


def global_stream(num_samples, micro, world, steps, seed=42):
    """[(epoch, concatenation of ranks 0..world-1's slices)] for `steps` global micro-batches."""
    per_rank = [take(ResumableDistributedSampler(num_samples, micro, r, world, seed), steps) for r in range(world)]
    out = []
    for step in zip(*per_rank):
        epochs = {epoch for epoch, _ in step}
        assert len(epochs) == 1  # all ranks are in the same epoch at every step
        out.append((epochs.pop(), [i for _, indices in step for i in indices]))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 255, 1000, 4097, 65536])
def test_every_epoch_order_is_a_permutation(n):
    s = ResumableDistributedSampler(n, 1)
    orders = [s.global_indices(e, 0, n) for e in range(3)]
    for order in orders:
        assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))
    if n >= 15:
        assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], np.arange(n))
        assert np.array_equal(s.global_indices(2, 3, 11), orders[2][3:11])  # random access: a slice on its own


def test_the_order_looks_random():
    order = ResumableDistributedSampler(100_000, 1, seed=3).global_indices(0, 0, 100_000).astype(np.float64)
    assert abs(np.corrcoef(np.arange(order.size), order)[0, 1]) < 0.02  # far from the identity
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.02  # neighbours unrelated
    # the first sample of an epoch, over 4000 epochs, is uniform over 20 (chi-square with 19 dof: 60 is p ~ 1e-6)
    small = ResumableDistributedSampler(20, 1, seed=3)
    first = np.bincount([small.global_indices(e, 0, 1)[0] for e in range(4000)], minlength=20)
    assert ((first - 200.0) ** 2 / 200.0).sum() < 60


def test_global_order_does_not_depend_on_world_size():
    n, steps = 103, 40  # 103 // 8 = 12 global micro-batches per epoch: 40 steps cross three epoch boundaries
    reference = global_stream(n, 8, 1, steps)
    assert [e for e, _ in reference] == [0] * 12 + [1] * 12 + [2] * 12 + [3] * 4
    assert global_stream(n, 4, 2, steps) == reference
    assert global_stream(n, 2, 4, steps) == reference
    # another global micro-batch size reads the same order, cut differently (only its dropped tail differs)
    order = ResumableDistributedSampler(n, 8).global_indices(0, 0, n).tolist()
    for micro, world in ((8, 1), (8, 2), (8, 4), (3, 5)):
        per_epoch = n // (micro * world)
        epoch0 = [i for _, b in global_stream(n, micro, world, per_epoch) for i in b]
        assert epoch0 == order[:per_epoch * micro * world]


def test_ranks_are_disjoint_and_an_epoch_has_no_duplicates():
    n, micro, world = 1001, 5, 4
    ranks = [ResumableDistributedSampler(n, micro, r, world, seed=7) for r in range(world)]
    assert ranks[0].micro_batches_per_epoch == 50
    seen = [[i for _, b in take(s, 50) for i in b] for s in ranks]
    everything = [i for rank in seen for i in rank]
    assert len(everything) == len(set(everything)) == 50 * 20  # the ragged tail of 1 sample is dropped
    assert all(not set(a) & set(b) for a, b in itertools.combinations(seen, 2))
    assert all(0 <= i < n for i in everything)
    # the epoch iterator is the same pass, and does not move the training position
    assert [i for b in ranks[1].epoch_iterator(0) for i in b] == seen[1]
    assert ranks[1].consumed_samples == 50 * 20


def test_epochs_follow_each_other_and_differ():
    s = ResumableDistributedSampler(64, 8, seed=1)
    batches = take(s, 24)
    assert [e for e, _ in batches] == [0] * 8 + [1] * 8 + [2] * 8
    epochs = [[i for _, b in batches[8 * k:8 * k + 8] for i in b] for k in range(3)]
    assert all(sorted(e) == list(range(64)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert all(len(b) == 8 and all(type(i) is int for i in b) for _, b in batches)
    assert s.consumed_samples == 24 * 8 and (s.epoch, s.epoch_offset) == (3, 0)


def test_seed_changes_the_order_and_shuffle_false_is_sequential():
    a = take(ResumableDistributedSampler(50, 5, seed=1), 10)
    assert a == take(ResumableDistributedSampler(50, 5, seed=1), 10)
    assert a != take(ResumableDistributedSampler(50, 5, seed=2), 10)
    plain = take(ResumableDistributedSampler(10, 2, rank=1, world_size=2, shuffle=False), 3)
    assert plain == [(0, [2, 3]), (0, [6, 7]), (1, [2, 3])]


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("stop", [0, 1, 5, 6, 7, 12, 13, 20, 21])
def test_resume_from_a_state_equals_continuing(world, stop):
    n, micro = 40, 2  # world 3: 6 global micro-batches per epoch (boundaries at 6, 12, 18), 4 samples dropped
    for rank in range(world):
        original = ResumableDistributedSampler(n, micro, rank, world, seed=11)
        assert len(take(original, stop)) == stop
        state = original.state_dict()
        assert state["consumed_samples"] == stop * micro * world
        expected = take(original, 15)
        resumed = ResumableDistributedSampler(n, micro, rank, world, seed=11)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        assert take(resumed, 15) == expected
        assert resumed.state_dict() == original.state_dict()


def test_resume_through_a_json_round_trip():
    import json

    original = ResumableDistributedSampler(30, 4, seed=5)
    take(original, 9)
    resumed = ResumableDistributedSampler(30, 4, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert take(resumed, 10) == take(original, 10)


def test_resume_from_a_bare_consumed_samples_counter():
    original = ResumableDistributedSampler(30, 4, seed=5)  # 7 micro-batches per epoch
    take(original, 17)
    expected = take(original, 10)
    resumed = ResumableDistributedSampler(30, 4, seed=5)
    resumed.load_state_dict({"consumed_samples": 17 * 4, "seed": 5, "num_samples": 30})
    assert take(resumed, 10) == expected


def test_resume_with_another_world_size_keeps_the_global_order():
    before = ResumableDistributedSampler(1000, 4, 0, 2, seed=9)  # global micro-batch 8
    take(before, 30)
    state = before.state_dict()
    assert (state["epoch"], state["epoch_offset"]) == (0, 240)
    after = [ResumableDistributedSampler(1000, 3, r, 4, seed=9) for r in range(4)]  # global micro-batch 12
    for s in after:
        s.load_state_dict(state)
    step = [take(s, 1)[0] for s in after]
    assert [i for _, b in step for i in b] == before.global_indices(0, 240, 252).tolist()
    assert after[0].consumed_samples == 240 + 12
    # a position that another world size cannot fill goes on with the next epoch
    end = ResumableDistributedSampler(100, 12, seed=9)
    end.load_state_dict({**state, "num_samples": 100, "epoch": 4, "epoch_offset": 96})
    assert take(end, 1)[0] == (5, end.global_indices(5, 0, 12).tolist())


def test_load_state_dict_jumps_without_iterating(monkeypatch):
    n = 10**6
    s = ResumableDistributedSampler(n, 8, rank=1, world_size=2, seed=3)
    consumed = 10**12 + 5 * 16  # 62500 global micro-batches of 16 per epoch: epoch 10**6, offset 80
    calls = []
    real = ResumableDistributedSampler.global_indices

    def counting(self, epoch, start, stop):
        calls.append((epoch, start, stop))
        assert len(calls) == 1, "the sampler replays batches"  # fail at once rather than replay 6e10 batches
        return real(self, epoch, start, stop)

    monkeypatch.setattr(ResumableDistributedSampler, "global_indices", counting)
    s.load_state_dict({"consumed_samples": consumed, "seed": 3, "num_samples": n})
    epoch, indices = next(iter(s))
    # one micro-batch was computed, straight at the position: nothing before it was generated or replayed
    assert calls == [(10**6, 88, 96)]
    assert epoch == 10**6 and s.consumed_samples == consumed + 16
    assert indices == real(s, 10**6, 0, 96)[88:96].tolist()


def test_state_from_another_dataset_or_seed_is_refused():
    s = ResumableDistributedSampler(100, 4, seed=1)
    state = s.state_dict()
    with pytest.raises(UserError, match="trained on 100 samples but this training set has 99.*overwrite_output_dir"):
        ResumableDistributedSampler(99, 4, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="resume with --seed 1"):
        ResumableDistributedSampler(100, 4, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="no consumed_samples"):
        s.load_state_dict({"epoch": 3})
    with pytest.raises(UserError, match="damaged"):
        s.load_state_dict({**state, "epoch_offset": 101})
    with pytest.raises(UserError, match="consumed_samples must be an integer"):
        s.load_state_dict({**state, "consumed_samples": -4})
    assert s.state_dict() == state  # a refused state leaves the position alone


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match=r"fewer than one global micro-batch of 32 \(micro-batch size 8 x 4 "
                                        r"processes\).*per_device_train_batch_size"):
        ResumableDistributedSampler(31, 8, 0, 4)
    assert ResumableDistributedSampler(32, 8, 3, 4).micro_batches_per_epoch == 1  # one global micro-batch is enough
    with pytest.raises(UserError, match="rank 4 is not below world_size 4"):
        ResumableDistributedSampler(100, 1, 4, 4)
    with pytest.raises(UserError, match="micro_batch_size must be an integer >= 1"):
        ResumableDistributedSampler(100, 0)
    with pytest.raises(UserError, match="seed must be an integer"):
        ResumableDistributedSampler(100, 1, seed="x")
