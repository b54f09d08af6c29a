"""Benchmark of an input file's fingerprint on a 1 GB file: the whole-file sha256 ds-mlm computes whenever a file's
stat signals changed, against the 16 windows of 1 MiB it hashed before (which missed edits between them), and the
stat() that is all an unchanged file costs. Side by side in one run.

    .venv/bin/python bench/fingerprint.py [--gb 1] [--repeats 3] [--dir /tmp]

The file is written into a temporary directory under --dir and removed afterwards. Timings are the best of
--repeats; the file was just written, so it is read from the page cache (a cold read is bound by the disk instead:
drop caches to see it). Printed: seconds, GB/s and the ratio whole / windows.
"""

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ds_mlm.data.spec import file_fingerprint  # noqa: E402

WINDOWS, WINDOW_BYTES = 16, 1 << 20  # the former scheme: files over 64 MiB hashed by 16 windows of 1 MiB


def windowed_sha256(path: str) -> str:
    """The former content hash of a large file (for comparison only): 16 windows of 1 MiB, first and last included."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        step = (size - WINDOW_BYTES) // (WINDOWS - 1)
        for k in range(WINDOWS):
            f.seek(k * step)
            digest.update(f.read(WINDOW_BYTES))
    return digest.hexdigest()


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the file (10^9 bytes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the temporary file goes (default: the system's)")
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    folder = tempfile.mkdtemp(prefix="ds-mlm-fingerprint-", dir=args.dir)
    try:
        path = os.path.join(folder, "big.txt")
        block = os.urandom(1 << 20)
        start = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.write(block[:size % len(block)])
        written = time.perf_counter() - start
        whole = best(lambda: file_fingerprint(path), args.repeats)
        windows = best(lambda: windowed_sha256(path), args.repeats)
        stat = best(lambda: os.stat(path), max(args.repeats, 1000))
        print(f"file: {size / 1e9:.2f} GB in {folder} (written in {written:.2f} s)")
        print(f"whole-file sha256 (signals changed): {whole:.3f} s, {size / whole / 1e9:.2f} GB/s")
        print(f"16 windows of 1 MiB (the former):    {windows * 1e3:.1f} ms")
        print(f"stat (all signals agree):            {stat * 1e6:.1f} us")
        print(f"ratio whole / windows: {whole / windows:.0f}x; load average {open('/proc/loadavg').read().split()[:3]}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
