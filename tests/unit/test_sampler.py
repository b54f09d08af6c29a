"""GlobalBatchSampler: the same global batch per step for any world size and split, epochs, O(1) exact resume."""

import json

import numpy as np
import pytest

from ds_mlm.errors import UserError
from ds_mlm.sampler import GlobalBatchSampler


def steps(sampler, n):
    return [sampler.next_step() for _ in range(n)]


def global_batches(num_samples, global_batch, micro, world, n, seed=42):
    """[(epoch, [micro-batch j of the step for j = 0..W*A-1])] assembled from every rank's share."""
    ranks = [GlobalBatchSampler(num_samples, global_batch, micro, r, world, seed) for r in range(world)]
    out = []
    for _ in range(n):
        taken = [s.next_step() for s in ranks]
        epochs = {e for e, _, _ in taken}
        assert len(epochs) == 1  # every rank is in the same epoch at every step
        accumulation = len(taken[0][1])
        micro_batches = [taken[j % world][1][j // world] for j in range(world * accumulation)]
        assert all(np.array_equal(t[2], taken[0][2]) for t in taken)  # every rank knows the whole step
        assert [i for mb in micro_batches for i in mb] == taken[0][2].tolist()
        out.append((epochs.pop(), micro_batches))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 255, 1000, 4097, 65536])
def test_every_epoch_order_is_a_permutation(n):
    s = GlobalBatchSampler(n, 1, 1)
    orders = [s.global_indices(e, 0, n) for e in range(3)]
    for order in orders:
        assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))
    if n >= 15:
        assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], np.arange(n))
        assert np.array_equal(s.global_indices(2, 3, 11), orders[2][3:11])  # random access: a slice on its own


def test_the_order_looks_random():
    order = GlobalBatchSampler(100_000, 1, 1, seed=3).global_indices(0, 0, 100_000).astype(np.float64)
    assert abs(np.corrcoef(np.arange(order.size), order)[0, 1]) < 0.02  # far from the identity
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.02  # neighbours unrelated
    # the first sample of an epoch, over 4000 epochs, is uniform over 20 (chi-square with 19 dof: 60 is p ~ 1e-6)
    small = GlobalBatchSampler(20, 1, 1, seed=3)
    first = np.bincount([small.global_indices(e, 0, 1)[0] for e in range(4000)], minlength=20)
    assert ((first - 200.0) ** 2 / 200.0).sum() < 60


def test_a_step_is_the_same_samples_for_any_split_of_the_global_batch():
    n, g = 103, 8  # 12 steps per epoch (7 samples dropped): 40 steps cross three epoch boundaries
    reference = global_batches(n, g, 8, 1, 40)
    assert [e for e, _ in reference] == [0] * 12 + [1] * 12 + [2] * 12 + [3] * 4
    flat = [[i for mb in mbs for i in mb] for _, mbs in reference]
    for micro, world in ((4, 2), (2, 4), (1, 8), (2, 1), (1, 2), (4, 1)):
        split = global_batches(n, g, micro, world, 40)
        assert [[i for mb in mbs for i in mb] for _, mbs in split] == flat
        assert [e for e, _ in split] == [e for e, _ in reference]
    # the same micro batch gives the same micro-batches, whatever the world and accumulation
    two_by_two = global_batches(n, g, 2, 2, 40)
    two_by_four = global_batches(n, g, 2, 4, 40)
    assert two_by_two == two_by_four == global_batches(n, g, 2, 1, 40)


def test_a_rank_reads_every_world_th_micro_batch_of_the_step():
    s = GlobalBatchSampler(1000, 12, 2, rank=1, world_size=3, seed=7)  # accumulation 2
    epoch, mine, step = s.next_step()
    assert s.accumulation == 2 and [len(m) for m in mine] == [2, 2]
    assert mine == [step[2:4].tolist(), step[8:10].tolist()]  # micro-batches 1 and 4 of 0..5


def test_epochs_follow_each_other_drop_the_tail_and_differ():
    s = GlobalBatchSampler(70, 8, 4, seed=1)  # 8 steps per epoch, 6 samples dropped each time
    assert s.steps_per_epoch == 8
    taken = steps(s, 24)
    assert [e for e, _, _ in taken] == [0] * 8 + [1] * 8 + [2] * 8
    epochs = [np.concatenate([t[2] for t in taken[8 * k:8 * k + 8]]) for k in range(3)]
    assert all(len(set(e.tolist())) == 64 and e.max() < 70 for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    assert s.consumed_samples == 24 * 8 and (s.epoch, s.epoch_offset) == (3, 0)


def test_seed_changes_the_order_and_shuffle_false_is_sequential():
    a = [t[2].tolist() for t in steps(GlobalBatchSampler(50, 5, 5, seed=1), 10)]
    assert a == [t[2].tolist() for t in steps(GlobalBatchSampler(50, 5, 5, seed=1), 10)]
    assert a != [t[2].tolist() for t in steps(GlobalBatchSampler(50, 5, 5, seed=2), 10)]
    plain = steps(GlobalBatchSampler(10, 4, 2, rank=1, world_size=2, shuffle=False), 3)
    assert [mine for _, mine, _ in plain] == [[[2, 3]], [[6, 7]], [[2, 3]]]


@pytest.mark.parametrize("stop", [0, 1, 5, 6, 7, 12, 13, 20])
def test_resume_from_a_state_equals_continuing_on_any_split(stop):
    n, g = 40, 6  # 6 steps per epoch, 4 samples dropped
    original = GlobalBatchSampler(n, g, 3, seed=11)
    steps(original, stop)
    state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint stores it
    assert state["consumed_samples"] == stop * g
    expected = [t[2].tolist() for t in steps(original, 15)]
    for micro, world in ((3, 1), (1, 2), (1, 3), (2, 3)):
        ranks = [GlobalBatchSampler(n, g, micro, r, world, seed=11) for r in range(world)]
        for s in ranks:
            s.load_state_dict(state)
            assert s.state_dict() == state
        assert [ranks[0].next_step()[2].tolist() for _ in range(15)] == expected


def test_resume_with_another_global_batch_goes_on_from_the_same_place():
    before = GlobalBatchSampler(1000, 8, 4, seed=9)
    steps(before, 30)
    state = before.state_dict()
    assert (state["epoch"], state["epoch_offset"]) == (0, 240)
    after = GlobalBatchSampler(1000, 12, 3, rank=0, world_size=4, seed=9)
    after.load_state_dict(state)
    assert after.next_step()[2].tolist() == before.global_indices(0, 240, 252).tolist()
    assert after.consumed_samples == 240 + 12
    end = GlobalBatchSampler(100, 12, 12, seed=9)  # a position the new batch cannot fill goes on with the next epoch
    end.load_state_dict({**state, "num_samples": 100, "epoch": 4, "epoch_offset": 96})
    epoch, _, step = end.next_step()
    assert epoch == 5 and step.tolist() == end.global_indices(5, 0, 12).tolist()


def test_load_state_dict_jumps_without_iterating(monkeypatch):
    n = 10**6
    s = GlobalBatchSampler(n, 16, 8, rank=1, world_size=2, seed=3)
    calls = []
    real = GlobalBatchSampler.global_indices

    def counting(self, epoch, start, stop):
        calls.append((epoch, start, stop))
        assert len(calls) == 1, "the sampler replays batches"  # fail at once rather than replay 6e10 batches
        return real(self, epoch, start, stop)

    monkeypatch.setattr(GlobalBatchSampler, "global_indices", counting)
    s.load_state_dict({"consumed_samples": 10**12, "epoch": 10**6, "epoch_offset": 80, "seed": 3, "num_samples": n})
    epoch, mine, _ = s.next_step()
    assert calls == [(10**6, 80, 96)]  # one step computed, straight at the position
    assert epoch == 10**6 and s.consumed_samples == 10**12 + 16
    assert mine == [real(s, 10**6, 0, 96)[88:96].tolist()]


def test_state_from_another_dataset_or_seed_is_refused():
    s = GlobalBatchSampler(100, 4, 4, seed=1)
    state = s.state_dict()
    with pytest.raises(UserError, match="trained on 100 samples but this training set has 99.*overwrite_output_dir"):
        GlobalBatchSampler(99, 4, 4, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="resume with --seed 1"):
        GlobalBatchSampler(100, 4, 4, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="incomplete"):
        s.load_state_dict({"epoch": 3})
    with pytest.raises(UserError, match="damaged"):
        s.load_state_dict({**state, "epoch_offset": 101})
    with pytest.raises(UserError, match="consumed_samples must be an integer"):
        s.load_state_dict({**state, "consumed_samples": -4})
    assert s.state_dict() == state  # a refused state leaves the position alone


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match=r"fewer than one global batch of 32 \(micro batch 8 x gradient accumulation 1 "
                                        r"x 4 processes\)"):
        GlobalBatchSampler(31, 32, 8, 0, 4)
    assert GlobalBatchSampler(32, 32, 8, 3, 4).steps_per_epoch == 1  # one global batch is enough
    with pytest.raises(UserError, match="rank 4 is not below world_size 4"):
        GlobalBatchSampler(100, 4, 1, 4, 4)
    with pytest.raises(UserError, match="not a multiple"):
        GlobalBatchSampler(100, 10, 4, 0, 1)
    with pytest.raises(UserError, match="micro_batch must be an integer >= 1"):
        GlobalBatchSampler(100, 1, 0)
    with pytest.raises(UserError, match="seed must be an integer"):
        GlobalBatchSampler(100, 1, 1, seed="x")
