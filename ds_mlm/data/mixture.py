"""Weighted mixtures of sources: one random-access dataset over each source's own store, nothing copied.

    train = Mixture([store_a, store_b], names=["news", "web"], weights=[0.7, 0.3], seed=42)
    train.__getitems__(indices)       zero-copy samples, as a store gives them
    train.sources_of(indices)         the source of each index (vectorised): the trainer's samples_by_source
    train.describe(planned_samples)   files, tokens, samples, weight and epochs per source, for the run's log

The layout is Megatron's blend made a pure function of the index. N = the sum of the sources' sizes; source k gets
n_k ~ N * w_k / sum(w) slots (at least 1; the largest remainders take the leftover slots, so the n_k sum to N
whatever the weights: a resume with other weights keeps the training set's size), laid out source after source: slots [S_k, S_k + n_k). Slot j of
source k is its sample perm_{k,r}(j mod size_k) with r = j // size_k, where perm_{k,r} is a keyed permutation of
the source (a Feistel network with cycle walking over splitmix64, keyed by (seed, k, r)): random access in O(1),
no table. A source whose share is larger than its size is repeated (every sample r or r + 1 times), a smaller
share is a random subset of it, the same at every pass over the mixture (so "epochs" of such a source in a long
run count passes over that subset; `describe` says how much of the source a pass uses).

The trainer's sampler permutes range(len(mixture)) every epoch and cuts global batches from that order, so every
batch draws from the sources in proportion to n_k, the same samples on any number of ranks, and a resume is a jump
(no iteration state here). Without weights n_k = size_k and slot i is sample i: the sources one after the other,
so one source is exactly its store (index i is sample i, today's behaviour).
"""

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
from numba import njit

from ds_mlm.errors import UserError
from ds_mlm.hashing import GOLDEN, U64, mix64

_ROUNDS = 6


@njit(cache=True)
def _permuted(slots, size, half_bits, source_key, out):
    """out[i] = perm_{k, r}(slots[i] mod size) with r = slots[i] // size (module docstring)."""
    half = np.uint64(half_bits)
    low = (np.uint64(1) << half) - np.uint64(1)
    usize = np.uint64(size)
    for i in range(slots.size):
        j = np.uint64(slots[i])
        key = mix64(source_key ^ (j // usize))
        x = j % usize
        while True:  # cycle walking: the network permutes range(4**half) >= size; walk until back in range
            left = x >> half
            right = x & low
            for r in range(_ROUNDS):
                round_key = mix64(key + np.uint64(r + 1) * GOLDEN)
                left, right = right, left ^ (mix64(right ^ round_key) & low)
            x = (left << half) | right
            if x < usize:
                break
        out[i] = np.int64(x)


def apportion(total: int, weights: Sequence[float]) -> List[int]:
    """`total` slots shared in proportion to `weights`, each at least 1, by largest remainder: they sum to `total`."""
    raw = [w * total / sum(weights) for w in weights]
    slots = [max(1, math.floor(r)) for r in raw]
    furthest_below = sorted(range(len(raw)), key=lambda k: (slots[k] - raw[k], k))
    for k in furthest_below[:max(0, total - sum(slots))]:
        slots[k] += 1
    return slots


class Mixture(torch.utils.data.Dataset):
    """See the module docstring. `sources`: datasets with `len` and `__getitems__`; `names`: as given on the command
    line; `weights`: None (shares follow the sizes) or one positive number per source (need not sum to 1)."""

    def __init__(self, sources: Sequence, names: Sequence[str], weights: Optional[Sequence[float]] = None,
                 seed: int = 42):
        self.sources, self.source_names = list(sources), [str(n) for n in names]
        if not self.sources or len(self.source_names) != len(self.sources):
            raise ValueError("a Mixture needs one name per source, and at least one source")
        self.sizes_of_sources = [len(s) for s in self.sources]
        empty = [n for n, size in zip(self.source_names, self.sizes_of_sources) if size == 0]
        if empty:
            raise UserError(f"--train_dir {', '.join(empty)}: no training sample; add text there or leave it out")
        total = sum(self.sizes_of_sources)
        self.weights = None if weights is None else [float(w) for w in weights]
        if self.weights is None:
            self.slots = list(self.sizes_of_sources)
        else:
            if len(self.weights) != len(self.sources):
                raise UserError(f"--train_weights has {len(self.weights)} value(s) for {len(self.sources)} "
                                "--train_dir source(s): give one weight per source, in the same order")
            if not all(math.isfinite(w) and w > 0 for w in self.weights):
                raise UserError(f"--train_weights {' '.join(map(str, self.weights))}: every weight must be a "
                                "positive number (leave a source out rather than give it 0)")
            self.slots = apportion(total, self.weights)
        self.seed = int(seed)
        self._starts = np.concatenate([[0], np.cumsum(self.slots)]).astype(np.int64)
        base = np.uint64(mix64(np.uint64(self.seed & U64) ^ GOLDEN))  # mix64 hands back a Python int
        self._keys = [np.uint64(mix64(base ^ np.uint64(mix64(np.uint64(k + 1))))) for k in range(len(self.sources))]

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shares(self) -> List[float]:
        """The share of the mixture's samples each source gets."""
        return [n / len(self) for n in self.slots]

    def sources_of(self, indices) -> np.ndarray:
        """The source index of each sample index (int64 array)."""
        idx = np.asarray(indices, dtype=np.int64) % max(len(self), 1)
        return np.searchsorted(self._starts, idx, side="right") - 1

    def samples_of(self, k: int, slots) -> np.ndarray:
        """The samples of source k at its slots (0 <= slot < n_k)."""
        slots = np.asarray(slots, dtype=np.int64)
        if self.weights is None:
            return slots
        out = np.empty(slots.size, dtype=np.int64)
        size = self.sizes_of_sources[k]
        half_bits = max(1, ((size - 1).bit_length() + 1) // 2)  # the smallest domain 4**half_bits >= size
        _permuted(slots, size, half_bits, self._keys[k], out)
        return out

    def __getitems__(self, indices) -> list:
        n = len(self)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"sample index out of range for a mixture of {n} samples")
        idx %= n
        if len(self.sources) == 1 and self.weights is None:
            return self.sources[0].__getitems__(idx)
        source = np.searchsorted(self._starts, idx, side="right") - 1
        out = [None] * idx.size
        for k in np.unique(source).tolist():
            where = np.flatnonzero(source == k)
            samples = self.samples_of(k, idx[where] - self._starts[k])
            for at, sample in zip(where.tolist(), self.sources[k].__getitems__(samples)):
                out[at] = sample
        return out

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a mixture of {len(self)} samples")
        return torch.from_numpy(np.asarray(self.__getitems__([i])[0]).astype(np.int64))

    def describe(self, planned_samples: int) -> str:
        """What each source contributes to a run that draws `planned_samples` samples, one line per source."""
        weights = self.weights or self.sizes_of_sources
        lines = [f"training data: {len(self.sources)} source(s), {len(self):,} samples per pass over the mixture; "
                 f"this run draws {planned_samples:,} samples ({planned_samples / len(self):.2f} passes)"]
        for k, name in enumerate(self.source_names):
            store, size = self.sources[k], self.sizes_of_sources[k]
            files = getattr(store, "files", None)
            tokens = getattr(store, "num_tokens", None)
            drawn = planned_samples * self.slots[k] / len(self)
            used = f", a pass uses {self.slots[k] / size:.0%} of it" if self.slots[k] < size else ""
            lines.append(f"  {name}: {len(files) if files is not None else '?'} file(s), "
                         f"{tokens if tokens is not None else 0:,} tokens, {size:,} samples; weight "
                         f"{weights[k] / sum(weights):.3f} ({self.slots[k]:,} slots{used}); draws {drawn:,.0f} "
                         f"samples = {drawn / size:.2f} epochs of this source")
        return "\n".join(lines)
