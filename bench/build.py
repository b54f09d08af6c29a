"""Benchmark of the token-store build, measured side by side in one run (not a test; prints ratios).

    .venv/bin/python bench/build.py [--repeats 2] [--skip-rss]

1. End-to-end build (read, tokenize on all cores, pack, write; `build_store`) against tokenizer-only throughput:
   the same fast tokenizer (byte-level BPE, 8000 ids, trained on the sample corpus) encoding the same lines in
   chunks of 2500 on a pool of all cores, ids discarded. Target: build >= 0.95x tokenizer-only. On the sample
   corpus and on /work/shared/corpora/thaigov-bench-30MB.txt.gz (gunzipped to a temporary directory; skipped with a
   note when absent).
2. A slow pure-Python tokenizer (PyThaiNLP's newmm word cutter, wrapped here as a minimal tokenizer with
   `batch_encode_ids`) on the first 3 MB of the 30 MB corpus (else the sample's Thai file), in chunks of 100 lines:
   build with 2 workers against 1. Target: >= 1.8x.
3. Peak RSS of a build (main process and worker processes, each build in a fresh process) for the first 3 MB of
   the 30 MB corpus and for all of it. Target: growth < 100 MB.

Repeats are interleaved so that machine noise hits both sides alike; the best of each is kept. The machine is
shared: the load average is printed before and after, and each timing says how many cores it actually got (CPU
seconds of the process and its workers / wall seconds).
"""

import argparse
import gzip
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BENCH_CORPUS = Path("/work/shared/corpora/thaigov-bench-30MB.txt.gz")
CHUNK = 2500
SLOW_CHUNK = 100  # newmm takes ~10 ms a line: chunks of 2500 lines would leave a worker idle on 1 MB of text

from ds_mlm.data import DatasetSpec, build_store, list_text_files  # noqa: E402
from common import load_avg  # noqa: E402 (bench/ is on sys.path: the script's own folder)

_ENCODER = None  # the tokenizer's Rust backend, inherited by the baseline's forked workers


def bpe_tokenizer(workdir: Path):
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_bpe_tokenizer
    from transformers import AutoTokenizer

    if not (workdir / "tokenizer" / "vocab.json").exists():
        build_bpe_tokenizer(workdir / "tokenizer", vocab_size=8000)
    return AutoTokenizer.from_pretrained(str(workdir / "tokenizer"))


def _encode_and_discard(lines):
    return sum(len(e.ids) for e in _ENCODER.encode_batch_fast(lines, add_special_tokens=False))


def _line_chunks(files):
    for path in files:
        chunk = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line := line.strip().lstrip("\ufeff"):  # as the build reads it: no byte-order marks
                    chunk.append(line)
                    if len(chunk) == CHUNK:
                        yield chunk
                        chunk = []
        if chunk:
            yield chunk


def tokenizer_only(tokenizer, files, workers) -> int:
    """Read the lines and encode them on a pool of `workers` processes, ids discarded; returns the id count."""
    global _ENCODER
    _ENCODER = tokenizer.backend_tokenizer
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return sum(pool.imap_unordered(_encode_and_discard, _line_chunks(files)))


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the pool's workers, once the pool has closed)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn):
    """(wall seconds, cores used on average, fn's result): on a shared machine, the cores we got explain the rest."""
    start, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    wall = time.perf_counter() - start
    return wall, (cpu_seconds() - cpu) / wall, result


def bench_fast_tokenizer(workdir, tokenizer, name, files, repeats):
    workers = len(os.sched_getaffinity(0))
    spec = DatasetSpec(files, tokenizer, 128)
    base, build = [], []
    for _ in range(repeats):
        *measured, ids = timed(lambda: tokenizer_only(tokenizer, files, workers))
        base.append(measured)
        *measured, report = timed(lambda: build_store(spec, str(workdir / "store"), num_workers=workers))
        build.append(measured)
        assert report.pack.tokens == ids, (report.pack.tokens, ids)  # the same work on both sides
    (b, b_cores), (t, t_cores) = min(base), min(build)
    mib = sum(os.path.getsize(f) for f in files) / 2**20
    print(f"1. {name} ({mib:.1f} MiB, {ids:,} ids, {workers} workers): tokenizer only {ids / b:,.0f} ids/s "
          f"({b:.2f} s, {b_cores:.2f} cores used), build {ids / t:,.0f} ids/s ({t:.2f} s, {t_cores:.2f} cores): "
          f"build = {b / t:.3f}x tokenizer-only (target >= 0.95x); in CPU seconds, which the load of others "
          f"does not change: tokenizer only {b * b_cores:.2f}, build {t * t_cores:.2f} = "
          f"{b * b_cores / (t * t_cores):.3f}x")


class NewmmWords:
    """A minimal word-level tokenizer over PyThaiNLP's newmm: what a slow Python tokenizer costs the build."""

    bos_token_id, eos_token_id, unk_token_id = 0, 2, 3

    def __init__(self, lines):
        from pythainlp.tokenize import word_tokenize

        self.cut = word_tokenize
        words = sorted({w for line in lines for w in self.words(line)})
        self.vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *words])}

    def words(self, line):
        return [w for w in self.cut(line, engine="newmm") if not w.isspace()]

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self):
        return self.vocab

    def batch_encode_ids(self, lines):
        return [[self.vocab.get(w, self.unk_token_id) for w in self.words(line)] for line in lines]


def bench_slow_tokenizer(workdir, corpus, repeats):
    text = workdir / "newmm.txt"
    with open(corpus, "rb") as f, open(text, "wb") as out:
        out.write(f.read(3 << 20))  # long enough that fixed costs (fork, fingerprint) are small
        out.write(f.readline())  # end on a whole line
    lines = [line.strip() for line in open(text, encoding="utf-8") if line.strip()]
    spec = DatasetSpec([str(text)], NewmmWords(lines[:300]), 128)
    one, two = [], []
    for _ in range(repeats):
        one.append(timed(lambda: build_store(spec, str(workdir / "newmm"), num_workers=1, chunk_size=SLOW_CHUNK))[:2])
        two.append(timed(lambda: build_store(spec, str(workdir / "newmm"), num_workers=2, chunk_size=SLOW_CHUNK))[:2])
    (a, a_cores), (b, b_cores) = min(one), min(two)
    print(f"2. newmm words, {len(lines):,} lines ({text.stat().st_size / 2**20:.1f} MiB) of Thai, chunks of "
          f"{SLOW_CHUNK} lines: 1 worker {a:.2f} s ({a_cores:.2f} cores used), 2 workers {b:.2f} s ({b_cores:.2f} "
          f"cores): {a / b:.2f}x (target >= 1.8x)")


def rss_worker(tokenizer_dir, corpus, store):
    """In a fresh process: build, then print the peak RSS (MiB) of this process and of its largest child."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_store(DatasetSpec([corpus], tokenizer, 128), store)
    kib = {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
    print(json.dumps({k: v / 1024 for k, v in kib.items()}))


def bench_rss(workdir, corpus):
    small = workdir / "first-3MB.txt"
    with open(corpus, "rb") as f, open(small, "wb") as out:
        out.write(f.read(3 << 20))
        out.write(f.readline())  # end on a whole line
    peaks = {}
    for path in (small, corpus):
        proc = subprocess.run([sys.executable, __file__, "--rss-worker", str(workdir / "tokenizer"), str(path),
                               str(workdir / "rss-store")], capture_output=True, text=True, check=True)
        peaks[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b = peaks[small], peaks[corpus]
    print(f"3. peak RSS, {small.stat().st_size / 2**20:.0f} MiB corpus -> {corpus.stat().st_size / 2**20:.0f} MiB: "
          f"main {a['main']:.0f} -> {b['main']:.0f} MiB (+{b['main'] - a['main']:.0f}), largest worker "
          f"{a['worker']:.0f} -> {b['worker']:.0f} MiB (+{b['worker'] - a['worker']:.0f}) (target: growth < 100 MB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        return rss_worker(*args.rss_worker)
    print(f"load average before: {load_avg()} (2 shared cores; numbers are only comparable within this run)")
    workdir = Path(tempfile.mkdtemp(prefix="ds-mlm-build-bench-"))
    try:
        tokenizer = bpe_tokenizer(workdir)
        sample = list_text_files(str(REPO / "data" / "sample" / "train"), "txt")
        bench_fast_tokenizer(workdir, tokenizer, "sample corpus", sample, args.repeats)
        corpus = workdir / "thaigov-bench-30MB.txt"
        if BENCH_CORPUS.exists():
            with gzip.open(BENCH_CORPUS, "rb") as src, open(corpus, "wb") as dst:
                shutil.copyfileobj(src, dst)
            bench_fast_tokenizer(workdir, tokenizer, "thaigov 30 MB", [str(corpus)], args.repeats)
        else:
            print(f"1. {BENCH_CORPUS} is absent: the 30 MB part is skipped")
        bench_slow_tokenizer(workdir, corpus if BENCH_CORPUS.exists() else sample[-1], args.repeats)
        if BENCH_CORPUS.exists() and not args.skip_rss:
            bench_rss(workdir, corpus)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
