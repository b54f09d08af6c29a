"""Benchmark of full-sentence packing: ds-mlm's numba kernel against the ancestor's algorithm in plain Python.

    .venv/bin/python bench/packing.py [--sentences 1000000] [--block-size 128] [--repeats 3]

Both pack the same sentences with the same greedy rule (<s> s1 SEP s2 ... </s>, at most block_size ids); each gets
its natural input: the ancestor a list of id lists (what its tokenizer returned), the kernel the flat arrays the
build passes it. Sentence lengths are drawn from a long-tailed lognormal mixture shaped like tokenized news lines
(mean ~55 ids, ~9 % longer than a block of 128); ids are random. Outputs are checked equal before timing. The
kernel is timed on everything at once (a 100 MB output, page faults included) and chunk by chunk as the build calls
it. Target: >= 100x. The machine is shared: the load average is printed.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_mlm.data.packing import CONCAT, Packer, pack_full_sentences  # noqa: E402

BOS, EOS, SEP = 0, 2, 4
CHUNK = 2500  # sentences per call in the build (--tokenize_chunksize)


def python_pack(sentences, block_size):
    """The ancestor's algorithm, written from its description: greedy, whole sentences, long ones split."""
    usable, blocks, current = block_size - 2, [], []
    for s in sentences:
        if not s:
            continue
        for start in range(0, len(s), usable):
            piece = s[start:start + usable]
            if current and len(current) + 1 + len(piece) > usable:
                blocks.append([BOS] + current + [EOS])
                current = []
            if current:
                current.append(SEP)
            current.extend(piece)
    if current:
        blocks.append([BOS] + current + [EOS])
    return blocks


def sentence_lengths(n, rng):
    """Lengths with the shape of tokenized sample-corpus lines: mostly 5-150 ids, a long tail to ~2000."""
    lengths = np.where(rng.random(n) < 0.85, rng.lognormal(3.3, 0.8, n), rng.lognormal(4.8, 0.7, n))
    return np.clip(lengths, 1, 4000).astype(np.int64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1_000_000)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 shared cores)")
    rng = np.random.default_rng(0)
    lengths = sentence_lengths(args.sentences, rng)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(5, 8000, size=int(offsets[-1])).astype(np.uint16)
    as_lists = [tokens[a:b].tolist() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    print(f"{args.sentences:,} sentences, {tokens.size:,} ids, mean {lengths.mean():.1f}, "
          f"{(lengths > args.block_size - 2).mean():.1%} longer than a block of {args.block_size}")

    blocks, block_offsets, stats = pack_full_sentences(tokens, offsets, args.block_size, BOS, EOS, SEP)  # compiles
    expected = python_pack(as_lists, args.block_size)
    assert len(expected) == stats.blocks and blocks.tolist() == [t for b in expected for t in b], "outputs differ"

    def streamed():  # as the build calls it: chunk after chunk, the open block carried over
        packer = Packer(CONCAT, args.block_size, BOS, EOS, SEP, dtype=tokens.dtype)
        for a in range(0, args.sentences, CHUNK):
            packer.feed(tokens, offsets[a:a + CHUNK + 1])
        packer.finish()

    timings = {"plain Python": [], "numba, all at once": [], f"numba, {CHUNK} sentences a call": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        for name, run in zip(timings, (lambda: python_pack(as_lists, args.block_size),
                                       lambda: pack_full_sentences(tokens, offsets, args.block_size, BOS, EOS, SEP),
                                       streamed)):
            t = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - t)
    python_s = min(timings["plain Python"])
    for name, seconds in timings.items():
        best = min(seconds)
        print(f"{name:28s} {best:7.4f} s  {tokens.size / best / 1e6:7.1f} M ids/s  {python_s / best:5.0f}x")
    print(f"target: numba >= 100x plain Python; {stats.blocks:,} blocks, mean fill "
          f"{stats.block_tokens / stats.blocks / args.block_size:.1%}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
