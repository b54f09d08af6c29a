"""Benchmark of an incremental rebuild: one new file after a full build, measured side by side in one run.

    .venv/bin/python bench/incremental.py [--files 30] [--mib 30]

The 30 MB Thai news corpus (/work/shared/corpora/thaigov-bench-30MB.txt.gz, else the sample corpus) cut into
`--files` files of whole lines; a full build (byte-level BPE, 8000 ids, all cores, block 128), then one more
1 MiB file of other Thai news (the rest of the corpus) and `ensure_store` again: it plans (a stat per file, the
content hashes of the manifest reused), checks the existing shards' stamps, tokenizes the new file only and writes a
new manifest and index. Both timed inside one process (startup excluded: imports, the tokenizer). Also timed: a
third `ensure_store` with nothing changed. Target: the rebuild <= 0.1x the first build.
"""

import argparse
import gzip
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
from build import BENCH_CORPUS, bpe_tokenizer, load_avg  # noqa: E402

from ds_mlm.data import DatasetSpec, ensure_store, list_input_files  # noqa: E402


def cut(lines, n_files: int, folder: Path) -> None:
    folder.mkdir()
    per = -(-len(lines) // n_files)
    for k in range(n_files):
        (folder / f"news-{k:03d}.txt").write_text("\n".join(lines[k * per:(k + 1) * per]) + "\n", encoding="utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=30)
    parser.add_argument("--mib", type=int, default=30)
    args = parser.parse_args()
    print(f"load average before: {load_avg()} (2 shared cores)")
    workdir = Path(tempfile.mkdtemp(prefix="ds-mlm-incremental-"))
    try:
        tokenizer = bpe_tokenizer(workdir)
        if BENCH_CORPUS.exists():
            with gzip.open(BENCH_CORPUS, "rb") as f:
                data = f.read()
        else:
            data = (REPO / "data" / "sample" / "train" / "thaigov.txt").read_bytes()
        cut_at = data.index(b"\n", min(args.mib << 20, len(data) * 29 // 30)) + 1
        lines, extra = data[:cut_at].decode().splitlines(), data[cut_at:cut_at + (1 << 20)]
        corpus = workdir / "corpus"
        cut(lines, args.files, corpus)
        cache = str(workdir / "cache" / "train")

        def ensure():
            spec = DatasetSpec(list_input_files(str(corpus), "txt"), tokenizer, 128)
            start = time.perf_counter()
            report = ensure_store(spec, cache)
            return time.perf_counter() - start, report

        first, report = ensure()
        print(f"first build: {len(report.built)} shards, {report.read.bytes / 2**20:.1f} MiB, "
              f"{report.pack.tokens:,} tokens in {first:.2f} s")
        (corpus / "news-new.txt").write_bytes(extra[:extra.rindex(b"\n") + 1])
        again, report = ensure()
        print(f"one new file ({(corpus / 'news-new.txt').stat().st_size / 2**20:.2f} MiB): {len(report.built)} shard "
              f"built, {report.reused} reused, in {again:.2f} s = {again / first:.3f}x the first build "
              f"(target <= 0.1x)")
        same, report = ensure()
        assert report is None
        print(f"nothing changed: {same * 1e3:.0f} ms ({same / first:.4f}x)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
