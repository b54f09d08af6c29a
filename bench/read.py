"""Benchmark of random-access reads: ds-mlm's memory-mapped token store against the ancestor's struct.unpack reader.

    .venv/bin/python bench/read.py [--samples 200000] [--batch 64] [--seconds 2]

The same samples (lengths 16-128, ids < 8000) are written in both layouts: the ancestor's (uint32 `arr.dat` +
uint32 offsets `idx_arr.dat`, a sample = two struct.unpack calls and a LongTensor) and a ds-mlm store (uint16
data.bin + int64 data.idx). Indices are uniformly random over the whole file. Measured, side by side in one run:

1. one sample at a time, as a LongTensor (`store[i]`). Target: >= 3x.
2. a batch of random samples through `__getitems__` (what the Trainer and DataLoader's batch sampler call) against
   the struct reader reading the same batch sample by sample, in samples/s, for one store and for the dataset
   the trainer reads (a ShardedStore, here the same samples in 100 shards). Target: >= 20x.
3. samples/s of the whole input path with ds_mlm.collator.MLMCollator: the Trainer's loop (indices ->
   `__getitems__` -> collator) and a torch DataLoader (batch sampler, collate_fn = the collator), for comparison
   with what a training step consumes.

The machine is shared: the load average is printed before and after.
"""

import argparse
import itertools
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shards import write_sharded  # noqa: E402

from ds_mlm.collator import MLMCollator  # noqa: E402
from ds_mlm.data.manifest import ShardedStore  # noqa: E402
from ds_mlm.data.store import StoreWriter, TokenStore  # noqa: E402
from common import rate  # noqa: E402 (bench/ is on sys.path: the script's own folder)

VOCAB = 8000


class StructReader:
    """The ancestor's reader: offsets and ids unpacked with struct from uint32 files."""

    def __init__(self, directory: str):
        self.idx = open(os.path.join(directory, "idx_arr.dat"), "rb")
        self.arr = open(os.path.join(directory, "arr.dat"), "rb")
        self.n = os.path.getsize(os.path.join(directory, "idx_arr.dat")) // 4 - 1

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.idx.seek(4 * i)
        start, end = struct.unpack("<2I", self.idx.read(8))
        self.arr.seek(4 * start)
        return torch.LongTensor(struct.unpack(f"<{end - start}I", self.arr.read(4 * (end - start))))


def write_both(workdir: str, n: int, rng):
    lengths = rng.integers(16, 129, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(5, VOCAB, size=int(offsets[-1]))
    ancestor = os.path.join(workdir, "ancestor")
    os.makedirs(ancestor)
    tokens.astype("<u4").tofile(os.path.join(ancestor, "arr.dat"))
    offsets.astype("<u4").tofile(os.path.join(ancestor, "idx_arr.dat"))
    with StoreWriter(os.path.join(workdir, "store"), np.uint16, "0" * 64) as writer:
        writer.append(tokens, offsets)
        writer.commit()
    write_sharded(os.path.join(workdir, "sharded"), tokens.astype(np.uint16), offsets, 100)
    return (StructReader(ancestor), TokenStore(os.path.join(workdir, "store")),
            ShardedStore(os.path.join(workdir, "sharded")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 shared cores)")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="ds-mlm-read-") as workdir:
        ancestor, store, sharded = write_both(workdir, args.samples, rng)
        probe = rng.integers(0, args.samples, size=200).tolist()
        assert all(ancestor[i].tolist() == store[i].tolist() == sharded[i].tolist() for i in probe), "layouts differ"
        single = iter(rng.integers(0, args.samples, size=10_000_000).tolist())
        batches = lambda: rng.integers(0, args.samples, size=args.batch).tolist()  # noqa: E731

        old_one = rate(lambda: ancestor[next(single)], args.seconds)
        new_one = rate(lambda: store[next(single)], args.seconds)
        old_batch = rate(lambda: [ancestor[i] for i in batches()], args.seconds) * args.batch
        new_batch = rate(lambda: store.__getitems__(batches()), args.seconds) * args.batch
        sharded_batch = rate(lambda: sharded.__getitems__(batches()), args.seconds) * args.batch
        print(f"1. one sample -> LongTensor: struct {old_one:,.0f}/s, store[i] {new_one:,.0f}/s: "
              f"{new_one / old_one:.1f}x (target >= 3x)")
        print(f"2. batches of {args.batch} random samples: struct {old_batch:,.0f} samples/s, __getitems__ "
              f"{new_batch:,.0f} samples/s: {new_batch / old_batch:.1f}x; ShardedStore of 100 shards "
              f"{sharded_batch:,.0f} samples/s: {sharded_batch / old_batch:.1f}x (target >= 20x)")

        collator = MLMCollator(mask_token_id=4, pad_token_id=1, vocab_size=VOCAB, special_token_ids=(0, 1, 2, 3, 4))

        def trainer_step():
            indices = batches()
            return collator(store.__getitems__(indices), indices, 0)

        loop = rate(trainer_step, args.seconds) * args.batch
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(store), args.batch, drop_last=True)
        loader = torch.utils.data.DataLoader(store, batch_sampler=sampler,
                                             collate_fn=lambda s: collator(s, list(range(len(s))), 0))
        stream = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch
        loaded = rate(lambda: next(stream), args.seconds) * args.batch
        print(f"3. with MLMCollator (batch {args.batch}, samples of 16-128 ids): Trainer loop {loop:,.0f} samples/s, "
              f"torch DataLoader (0 workers) {loaded:,.0f} samples/s")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
