"""The step loader: built ahead in a thread, yet exactly the batches (ids and masks) and positions of a plain loop."""

import numpy as np
import pytest
import torch

from ds_mlm.collator import MLMCollator
from ds_mlm.loader import StepLoader
from ds_mlm.sampler import GlobalBatchSampler


class Store:
    """A token store's interface: zero-copy arrays of varied lengths, and two sources."""

    source_names = ["a", "b"]

    def __init__(self, n=97):
        rng = np.random.default_rng(0)
        self.samples = [rng.integers(5, 300, rng.integers(3, 40)).astype(np.uint16) for _ in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitems__(self, indices):
        return [self.samples[i] for i in indices]

    def sources_of(self, indices):
        return (np.asarray(indices) % 3 == 0).astype(np.int64)


def collator():
    return MLMCollator(mask_token_id=4, pad_token_id=1, vocab_size=300, special_token_ids=(0, 1, 2, 3, 4), seed=9)


def plain_loop(store, steps, **kw):
    """What the training loop did before the loader existed: sampler, then collator, in the loop."""
    sampler, c, out = GlobalBatchSampler(len(store), **kw), collator(), []
    for _ in range(steps):
        epoch, micro_batches, _ = sampler.next_step()
        out.append([c(store.__getitems__(ix), ix, epoch) for ix in micro_batches])
    return out


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetched_batches_equal_the_plain_loops(prefetch):
    store, kw = Store(), dict(global_batch=8, micro_batch=2, rank=1, world_size=2, seed=5)  # accumulation 2
    loader = StepLoader(GlobalBatchSampler(len(store), **kw), store, collator(), "cpu", prefetch=prefetch)
    expected = plain_loop(store, 30, **kw)  # 30 steps of 8 from 97 samples: three epochs
    try:
        for want in expected:
            step = loader.next()
            assert len(step.micro_batches) == len(want) == 2
            for got, ref in zip(step.micro_batches, want):
                assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
            assert step.masked == sum(int((b["labels"] != -100).sum()) for b in want)
            assert step.tokens == sum(int(b["attention_mask"].sum()) for b in want)
    finally:
        loader.close()


def test_position_is_the_consumers_not_the_producers():
    store = Store()
    sampler = GlobalBatchSampler(len(store), 8, 4, seed=5)
    loader = StepLoader(sampler, store, collator(), "cpu", prefetch=3)
    for _ in range(5):
        step = loader.next()
    try:
        assert step.position == loader.state_dict() and loader.state_dict()["consumed_samples"] == 5 * 8
        assert sampler.consumed_samples > 5 * 8  # the thread is ahead, the state is not
        resumed = StepLoader(GlobalBatchSampler(len(store), 8, 4, seed=5), store, collator(), "cpu")
        resumed.load_state_dict(loader.state_dict())
        a, b = loader.next(), resumed.next()
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a.micro_batches, b.micro_batches) for k in x)
        resumed.close()
    finally:
        loader.close()


def test_global_source_counts_and_errors_reach_the_training_thread():
    store = Store()
    loader = StepLoader(GlobalBatchSampler(len(store), 8, 4, rank=0, world_size=2, seed=5), store, collator(), "cpu")
    step = loader.next()
    assert step.source_counts.sum() == 8  # the whole global batch, not this rank's half
    loader.close()

    class Broken(Store):
        def __getitems__(self, indices):
            raise OSError("input/output error")

    broken = StepLoader(GlobalBatchSampler(97, 8, 4), Broken(), collator(), "cpu", prefetch=2)
    with pytest.raises(OSError, match="input/output error"):
        broken.next()
    broken.close()


class HungStore(Store):
    """A token store on a file system that stopped answering: a read never returns (until released)."""

    def __init__(self):
        super().__init__()
        import threading
        self.release = threading.Event()

    def __getitems__(self, indices):
        self.release.wait(30)
        return super().__getitems__(indices)


def test_a_hung_producer_ends_the_wait_with_one_line():
    from ds_mlm.errors import UserError

    store = HungStore()
    loader = StepLoader(GlobalBatchSampler(len(store), global_batch=4, micro_batch=2, rank=0, world_size=1, seed=5),
                        store, collator(), "cpu", prefetch=2, stuck_seconds=0.3)
    try:
        with pytest.raises(UserError, match="no training step was read from the dataset for 0 s: reading the token "
                                            "store hangs"):
            loader.next()
    finally:
        store.release.set()
        loader.close()
