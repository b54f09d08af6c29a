"""Weighted mixtures: realized shares match the weights, the same samples on 1 and 2 ranks, a resume continues the
same sequence, small sources repeat and large ones are subsampled, and bad weights are one-line errors."""

import numpy as np
import pytest

from ds_mlm.data import DatasetSpec, ShardedStore, ensure_store, list_input_files
from ds_mlm.data.mixture import Mixture, apportion
from ds_mlm.errors import UserError
from ds_mlm.sampler import GlobalBatchSampler

from unit.data.test_build import ByteTokenizer


class Numbers:
    """A source whose sample i is [tag, i]: which source and sample every read came from."""

    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitems__(self, idx):
        return [np.array([self.tag, i], dtype=np.uint32) for i in np.asarray(idx).tolist()]


def global_batches(mixture, world, micro, steps, seed=7, state=None):
    """The samples of each step's global batch: what every rank read, put together (sorted: order within a batch
    is the ranks' concatenation, the same on any world size by construction)."""
    samplers = [GlobalBatchSampler(len(mixture), micro * world, micro, r, world, seed) for r in range(world)]
    if state is not None:
        for s in samplers:
            s.load_state_dict(state)
    out = []
    for _ in range(steps):
        indices = [i for s in samplers for mb in s.next_step()[1] for i in mb]
        out.append(sorted(tuple(x.tolist()) for x in mixture.__getitems__(indices)))
    return out, samplers[0].state_dict()


def test_shares_sum_to_the_sources_size_whatever_the_weights():
    for weights in ((3, 1), (1, 1, 1), (0.6, 0.3, 0.1), (1e-9, 1, 1), (2, 7, 11, 13)):
        for total in (len(weights), 544, 545, 6500, 10**6 + 7):  # every source has a sample at least
            slots = apportion(total, weights)
            exact = [w * total / sum(weights) for w in weights]
            assert sum(slots) == total and min(slots) >= 1  # a resume with other weights keeps len(mixture)
            assert all(abs(n - e) < 1 or (n == 1 and e < 1) for n, e in zip(slots, exact))


def test_realized_shares_match_the_weights_within_sampling_error():
    sizes, weights = (5000, 300, 1200), (0.5, 0.3, 0.2)
    mix = Mixture([Numbers(k, n) for k, n in enumerate(sizes)], ["web", "news", "novel"], weights, seed=3)
    assert mix.slots == [round(6500 * w) for w in weights] and len(mix) == 6500
    batches, _ = global_batches(mix, world=1, micro=64, steps=60)  # 3840 samples through the real sampler
    drawn = np.array([tag for batch in batches for tag, _ in batch])
    counts = np.bincount(drawn, minlength=3)
    n = drawn.size
    for k, w in enumerate(weights):
        assert abs(counts[k] - n * w) < 4 * np.sqrt(n * w * (1 - w)), (counts, n)
    assert np.array_equal(np.bincount(mix.sources_of(range(len(mix))), minlength=3), mix.slots)


def test_the_same_samples_on_one_and_two_ranks_and_after_a_resume():
    mix = Mixture([Numbers(0, 700), Numbers(1, 90)], ["a", "b"], [1.0, 2.0], seed=11)
    one, _ = global_batches(mix, world=1, micro=8, steps=200)  # crosses epoch ends
    two, _ = global_batches(mix, world=2, micro=4, steps=200)
    assert one == two
    head, state = global_batches(mix, world=2, micro=4, steps=77)
    again = Mixture([Numbers(0, 700), Numbers(1, 90)], ["a", "b"], [1.0, 2.0], seed=11)  # a new process
    tail, _ = global_batches(again, world=1, micro=8, steps=123, state=state)
    assert head + tail == one


def test_small_sources_repeat_and_large_ones_are_a_random_subset():
    mix = Mixture([Numbers(0, 10), Numbers(1, 1000)], ["small", "large"], [1, 1], seed=5)
    assert mix.slots == [505, 505]
    small = mix.samples_of(0, np.arange(505))
    assert sorted(np.bincount(small).tolist()) == [50] * 5 + [51] * 5  # every sample 50 or 51 times
    large = mix.samples_of(1, np.arange(505))
    assert len(set(large.tolist())) == 505 and large.max() > 900  # no repeat, spread over the whole source
    other = Mixture([Numbers(0, 10), Numbers(1, 1000)], ["small", "large"], [1, 1], seed=6)
    assert not np.array_equal(other.samples_of(1, np.arange(505)), large)  # another seed, another subset
    assert np.array_equal(Mixture([Numbers(0, 10), Numbers(1, 1000)], ["s", "l"], [1, 1], seed=5)
                          .samples_of(1, np.arange(505)), large)  # the same seed: the same subset
    text = mix.describe(2020)
    assert "2 source(s), 1,010 samples per pass" in text and "2.00 passes" in text
    assert "large: ? file(s), 0 tokens, 1,000 samples; weight 0.500 (505 slots, a pass uses 50% of it); draws " \
           "1,010 samples = 1.01 epochs" in text
    assert "small: " in text and "= 101.00 epochs" in text


def test_without_weights_the_sources_are_concatenated_and_one_source_is_its_store(tmp_path):
    for k in range(2):
        (tmp_path / f"src{k}").mkdir()
        (tmp_path / f"src{k}" / "a.txt").write_text("".join(f"source {k} line {i}\n" for i in range(50 + 30 * k)))
    stores = []
    for k in range(2):
        path = str(tmp_path / f"cache{k}")
        ensure_store(DatasetSpec(list_input_files(str(tmp_path / f"src{k}"), "txt"), ByteTokenizer(), 64,
                                 "MemmapLineByLineTextDataset"), path)
        stores.append(ShardedStore(path))
    mix = Mixture(stores, ["src0", "src1"])
    assert len(mix) == len(stores[0]) + len(stores[1]) and mix.shares == [50 / 130, 80 / 130]
    everything = [s.tolist() for s in stores[0].__getitems__(range(50))] + \
        [s.tolist() for s in stores[1].__getitems__(range(80))]
    picks = [129, 0, 50, 49, -1]
    assert [s.tolist() for s in mix.__getitems__(picks)] == [everything[i] for i in picks]
    assert mix.sources_of(picks).tolist() == [1, 0, 1, 0, 1] and mix[3].tolist() == everything[3]
    single = Mixture(stores[:1], ["src0"])
    assert [s.tolist() for s in single.__getitems__(range(50))] == everything[:50]
    assert "src0: 1 file(s), " in single.describe(100)


@pytest.mark.parametrize("weights, words", [
    ([1.0], "1 value\\(s\\) for 2 --train_dir source\\(s\\)"),
    ([1.0, 0.0], "every weight must be a positive number"),
    ([1.0, -2.0], "every weight must be a positive number"),
    ([1.0, float("nan")], "every weight must be a positive number"),
])
def test_bad_weights_are_one_line_errors(weights, words):
    with pytest.raises(UserError, match=words):
        Mixture([Numbers(0, 5), Numbers(1, 5)], ["a", "b"], weights)
    with pytest.raises(UserError, match="--train_dir b: no training sample"):
        Mixture([Numbers(0, 5), Numbers(1, 0)], ["a", "b"])
