"""Benchmark of a dataset of many shards (ds_mlm.data.manifest.ShardedStore), measured side by side in one run.

    .venv/bin/python bench/shards.py [--shards 10000] [--samples 200000] [--batch 64] [--seconds 2]

The same samples (lengths 16-128, ids < 8000) are written twice: as one store, and as a dataset of `--shards`
shards (20 samples each by default) with its manifest and index. Measured:

1. opening the dataset of 10,000 shards, in a fresh process: wall time and RSS growth (ShardedStore: the manifest,
   a stat per shard, the index mapped; no shard file opened), and the once-per-host checksum check when every
   shard has been checked before (a stat of each shard's two files against the stamps).
2. random batches of 64 through `__getitems__`: across the 10,000 shards (each batch touches ~64 of them) against
   the single store, in samples/s, after every shard has been touched once (maps made), and on a cold open.
   Target: >= 0.8x.

Writing the shards skips fsync (they are benchmark inputs, not data to keep). The load average is printed before
and after: the machine is shared.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ds_mlm.data.dataset_plan import BuildOptions, DatasetPlan, ShardPlan, SourcePlan  # noqa: E402
from ds_mlm.data.manifest import ShardedStore, finalize, shard_path  # noqa: E402
from ds_mlm.data.store import StoreWriter, TokenStore  # noqa: E402
from common import load_avg, rate  # noqa: E402 (bench/ is on sys.path: the script's own folder)

VOCAB = 8000


def random_samples(n: int, rng):
    lengths = rng.integers(16, 129, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return rng.integers(5, VOCAB, size=int(offsets[-1])).astype(np.uint16), offsets


def write_sharded(path: str, tokens, offsets, n_shards: int) -> None:
    """`tokens`/`offsets` as a dataset of `n_shards` shards of consecutive samples, with its manifest and index."""
    bounds = np.linspace(0, offsets.size - 1, n_shards + 1).astype(np.int64)
    shards = []
    with mock.patch("os.fsync"):
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            fp = f"{k:064x}"
            shards.append(ShardPlan(name=f"s{k:05d}.0.{fp[-16:]}", source=0, file=f"/bench/s{k}.txt", piece=0,
                                    byte_range=None, input_bytes=1, fingerprint=fp, identity={}))
            with StoreWriter(shard_path(path, shards[-1].name), np.uint16, fp) as writer:
                writer.append(tokens[offsets[a]:offsets[b]], offsets[a:b + 1] - offsets[a])
                writer.commit()
        plan = DatasetPlan(sources=[SourcePlan(name="bench", files=[s.file for s in shards], shards=shards)],
                           options=BuildOptions(block_size=130), tokenizer="0" * 64, vocab_size=VOCAB)
        counts = {s.name: (int(b - a), int(offsets[b] - offsets[a]), 0) for s, a, b in
                  zip(shards, bounds[:-1], bounds[1:])}
        finalize(plan, path, counts)


def write_single(path: str, tokens, offsets) -> None:
    with StoreWriter(path, np.uint16, "0" * 64) as writer:
        writer.append(tokens, offsets)
        writer.commit()


def open_in_fresh_process(path: str) -> dict:
    """Time and RSS growth of opening the dataset, and of the once-per-host check, in a new interpreter."""
    code = f"""
import json, os, sys, time, psutil
sys.path.insert(0, {str(REPO)!r})
from ds_mlm.data.manifest import ShardedStore
from ds_mlm.data.verify import check_shards
me = psutil.Process()
rss = me.memory_info().rss
start = time.perf_counter()
store = ShardedStore({path!r})
opened = time.perf_counter() - start
grown = me.memory_info().rss - rss
check_shards({path!r}, store.shard_names, "always")  # stamps every shard for this host
start = time.perf_counter()
damaged = check_shards({path!r}, store.shard_names, "once")
checked = time.perf_counter() - start
print(json.dumps({{"open_s": opened, "rss_mib": grown / 2**20, "once_s": checked, "n": len(store),
                  "shards": len(store.shard_names), "damaged": len(damaged)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])



def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    print(f"load average before: {load_avg()} (2 shared cores)")
    rng = np.random.default_rng(0)
    tokens, offsets = random_samples(args.samples, rng)
    with tempfile.TemporaryDirectory(prefix="ds-mlm-shards-") as workdir:
        sharded, single = os.path.join(workdir, "sharded"), os.path.join(workdir, "single")
        started = time.perf_counter()
        write_sharded(sharded, tokens, offsets, args.shards)
        write_single(single, tokens, offsets)
        print(f"(wrote {args.samples:,} samples as {args.shards:,} shards and as one store in "
              f"{time.perf_counter() - started:.1f} s)")
        opened = open_in_fresh_process(sharded)
        print(f"1. open a dataset of {opened['shards']:,} shards ({opened['n']:,} samples): "
              f"{opened['open_s'] * 1e3:.0f} ms, RSS +{opened['rss_mib']:.1f} MiB; the once-per-host checksum check with every shard checked before: "
              f"{opened['once_s'] * 1e3:.0f} ms (target: well under a second)")

        many, one = ShardedStore(sharded), TokenStore(single)
        probe = rng.integers(0, args.samples, size=500).tolist()
        assert [s.tolist() for s in many.__getitems__(probe)] == [s.tolist() for s in one.__getitems__(probe)]
        batches = lambda: rng.integers(0, args.samples, size=args.batch)  # noqa: E731
        cold = rate(lambda: many.__getitems__(batches()), args.seconds / 2) * args.batch  # maps made as it goes
        for start in range(0, args.samples, 5000):  # every shard touched once: its map exists
            many.__getitems__(np.arange(start, min(start + 5000, args.samples)))
        results = {"one": [], "many": []}
        for _ in range(3):  # interleaved: machine noise hits both sides alike; best of each
            results["one"].append(rate(lambda: one.__getitems__(batches()), args.seconds) * args.batch)
            results["many"].append(rate(lambda: many.__getitems__(batches()), args.seconds) * args.batch)
        a, b = max(results["one"]), max(results["many"])
        print(f"2. random batches of {args.batch}: one store {a:,.0f} samples/s, {args.shards:,} shards {b:,.0f} "
              f"samples/s: {b / a:.2f}x (target >= 0.8x); cold, maps made as it goes: {cold:,.0f} samples/s")
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
