"""Benchmark of a build spread over two processes, measured side by side in one run.

    .venv/bin/python bench/distributed_build.py [--repeats 3] [--mib 12] [--files 8]

A tokenizer-bound corpus: the first `--mib` MiB of the 30 MB Thai news (else the sample corpus) cut into `--files`
files, tokenized by PyThaiNLP's newmm word cutter (pure Python, bench/build.py's NewmmWords). Sides:

- one process, one tokenizer worker (`prepare_datasets` in a world of one);
- two processes as two "nodes" on loopback (a gloo process group, LOCAL_WORLD_SIZE 1 each, one shared cache
  directory), one tokenizer worker each: the leader deals the shards by size, both build, the leader writes the
  manifest.

Each side is timed inside its processes, from just before `prepare_datasets` to just after (startup excluded;
the two-process time is the slower process's). Caches are rebuilt each time (--overwrite_cache). Interleaved, best
of `--repeats`. Target: >= 1.6x. The load average is printed before and after: the machine is shared.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from build import BENCH_CORPUS, NewmmWords, load_avg  # noqa: E402


def worker(rank: int, world: int, port: int, corpus: str, cache: str) -> None:
    """One process of a side: join the group (if two), prepare the datasets, print the seconds it took."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from ds_mlm.args import DataArguments
    from ds_mlm.distributed import barrier, env_info
    from ds_mlm.data.prepare import prepare_datasets

    if world > 1:
        torch.distributed.init_process_group("gloo")
    lines = [x for p in sorted(Path(corpus).glob("*.txt")) for x in p.read_text(encoding="utf-8").splitlines()
             if x.strip()]
    tokenizer = NewmmWords(lines[:300])  # the same vocabulary in every process: the same fingerprint
    args = DataArguments(train_dir=corpus, max_seq_length=128, preprocessing_num_workers=1, tokenize_chunksize=100,
                         cache_scope="shared", overwrite_cache=True)
    barrier()
    start = time.perf_counter()
    train, _ = prepare_datasets(args, tokenizer, env_info(), cache)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "samples": len(train)}), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


def side(world: int, corpus: Path, cache: Path) -> dict:
    from ds_mlm.distributed import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port), str(corpus),
                               str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"a worker failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {"seconds": max(r["seconds"] for r in results), "samples": results[0]["samples"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mib", type=float, default=12)  # ~9 s on one worker: fixed costs (~1 s) stay small
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank, world, port, corpus, cache = args.worker
        return worker(int(rank), int(world), int(port), corpus, cache)
    print(f"load average before: {load_avg()} (2 shared cores)")
    workdir = Path(tempfile.mkdtemp(prefix="ds-mlm-distributed-build-"))
    try:
        if BENCH_CORPUS.exists():
            with gzip.open(BENCH_CORPUS, "rb") as f:
                data = f.read(int(args.mib * 2**20))
        else:
            data = (REPO / "data" / "sample" / "train" / "thaigov.txt").read_bytes()
        lines = data[:data.rindex(b"\n")].decode().splitlines()
        corpus = workdir / "corpus"
        corpus.mkdir()
        per = -(-len(lines) // args.files)
        for k in range(args.files):
            (corpus / f"part-{k}.txt").write_text("\n".join(lines[k * per:(k + 1) * per]) + "\n", encoding="utf-8")
        one, two = [], []
        for _ in range(args.repeats):
            one.append(side(1, corpus, workdir / "cache-one"))
            two.append(side(2, corpus, workdir / "cache-two"))
        a, b = min(r["seconds"] for r in one), min(r["seconds"] for r in two)
        assert one[0]["samples"] == two[0]["samples"]
        print(f"newmm, {len(lines):,} lines ({len(data) / 2**20:.1f} MiB) in {args.files} files, "
              f"{one[0]['samples']:,} samples: 1 process x 1 worker {a:.2f} s, 2 processes x 1 worker {b:.2f} s: "
              f"{a / b:.2f}x (target >= 1.6x)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
