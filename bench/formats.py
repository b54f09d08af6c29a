"""Benchmark of the build by input format, and of the checksum check, measured side by side in one run.

    .venv/bin/python bench/formats.py [--repeats 2] [--mib 30]

The same Thai news (/work/shared/corpora/thaigov-bench-30MB.txt.gz, gunzipped to a temporary directory; else the
sample corpus) written as .txt, .jsonl.gz, .jsonl.zst and .parquet (records of 8 lines each, as articles; Parquet
row groups of 4096 records; conversion not timed), each built into a dataset (byte-level BPE, 8000 ids, all cores,
block 128: `ensure_store(..., overwrite=True)`). Measured:

1. build wall time of each format against the .txt build, best of `--repeats`, interleaved. Target: >= 0.9x.
   Also the CPU seconds of the build (main process and its reaped workers), which the load of others changes
   less than the wall time. The token data are checked byte-identical first.
2. the checksum check of the built dataset (verify.py, read back from the page cache) and its share of the build.

The load average is printed before and after: the machine is shared.
"""

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from build import BENCH_CORPUS, bpe_tokenizer, cpu_seconds, load_avg  # noqa: E402

from ds_mlm.data import DatasetSpec, ensure_store, list_input_files  # noqa: E402
from ds_mlm.data.manifest import SHARDS, read_manifest  # noqa: E402
from ds_mlm.data.store import DATA, HEADER_BYTES, INDEX  # noqa: E402
from ds_mlm.data.verify import check_shards  # noqa: E402

RECORD_LINES = 8


def write_formats(workdir: Path, text: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = text.read_text(encoding="utf-8").splitlines()
    records = ["\n".join(lines[i:i + RECORD_LINES]) for i in range(0, len(lines), RECORD_LINES)]
    jsonl = "".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in records).encode()
    folders = {}
    for ext in ("txt", "jsonl.gz", "jsonl.zst", "parquet"):
        folders[ext] = workdir / ext.replace(".", "_")
        folders[ext].mkdir()
    (folders["txt"] / "news.txt").write_text("\n".join(records) + "\n", encoding="utf-8")
    (folders["jsonl.gz"] / "news.jsonl.gz").write_bytes(gzip.compress(jsonl, compresslevel=6))
    (folders["jsonl.zst"] / "news.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(jsonl))
    pq.write_table(pa.table({"text": records}), folders["parquet"] / "news.parquet", row_group_size=4096)
    return folders


def token_data(path: str):
    manifest = read_manifest(path)
    [shard] = [s["name"] for src in manifest["sources"] for s in src["shards"]]
    index = open(os.path.join(path, SHARDS, shard, INDEX), "rb").read()[HEADER_BYTES:]
    return open(os.path.join(path, SHARDS, shard, DATA), "rb").read(), index


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mib", type=int, default=30, help="MiB of the 30 MB corpus to use")
    args = parser.parse_args()
    print(f"load average before: {load_avg()} (2 shared cores)")
    workdir = Path(tempfile.mkdtemp(prefix="ds-mlm-formats-"))
    try:
        tokenizer = bpe_tokenizer(workdir)
        text = workdir / "news-source.txt"
        if BENCH_CORPUS.exists():
            with gzip.open(BENCH_CORPUS, "rb") as src, open(text, "wb") as dst:
                dst.write(src.read(args.mib << 20))
                dst.write(src.readline())
        else:
            shutil.copy(REPO / "data" / "sample" / "train" / "thaigov.txt", text)
        folders = write_formats(workdir, text)
        sizes = {ext: sum(f.stat().st_size for f in folder.iterdir()) / 2**20 for ext, folder in folders.items()}
        specs = {ext: DatasetSpec(list_input_files(str(folder), ext), tokenizer, 128)
                 for ext, folder in folders.items()}
        times, cpu = {ext: [] for ext in folders}, {ext: [] for ext in folders}
        for _ in range(args.repeats):
            for ext, spec in specs.items():
                start, used = time.perf_counter(), cpu_seconds()
                report = ensure_store(spec, str(workdir / f"cache-{ext}"), overwrite=True)
                times[ext].append(time.perf_counter() - start)
                cpu[ext].append(cpu_seconds() - used)
        reference = token_data(str(workdir / "cache-txt"))
        assert all(token_data(str(workdir / f"cache-{ext}")) == reference for ext in folders), "formats differ"
        base, base_cpu = min(times["txt"]), min(cpu["txt"])
        print(f"1. build of {report.pack.tokens:,} tokens ({sizes['txt']:.1f} MiB of text), best of {args.repeats}:")
        for ext in folders:
            print(f"   {ext:10s} {sizes[ext]:6.1f} MiB on disk: {min(times[ext]):6.2f} s = "
                  f"{base / min(times[ext]):.3f}x the .txt build (target >= 0.9x); CPU {min(cpu[ext]):6.2f} s = "
                  f"{base_cpu / min(cpu[ext]):.3f}x")
        path = str(workdir / "cache-txt")
        names = [s["name"] for src in read_manifest(path)["sources"] for s in src["shards"]]
        nbytes = sum(os.path.getsize(os.path.join(path, SHARDS, n, f)) for n in names for f in (DATA, INDEX))
        start = time.perf_counter()
        assert check_shards(path, names, "always") == []
        checked = time.perf_counter() - start
        print(f"2. checksum check of the built dataset ({nbytes / 2**20:.1f} MiB, page cache): {checked * 1e3:.1f} ms "
              f"({nbytes / checked / 1e9:.2f} GB/s) = {checked / base:.2%} of the .txt build")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
