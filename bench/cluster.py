"""Benchmark of jobs on the test cluster (tests/cluster.py: real hosts in network namespaces, real sshd and pdsh).

    .venv/bin/python bench/cluster.py [--repeats 1] [--only first_step]      (as root: it makes namespaces)

Measures, each a function in MEASURES (name -> function(bench) -> {label: seconds}), run in order, one cluster:

- first_step: the seconds from `bash launch.sh` on the head to the job's first optimizer step (the "step 1 |" log
  line, stamped as it arrives), with HOSTFILE listing 1 and then 3 hosts; the ratio 3 hosts / 1 host. The dataset
  cache is built beforehand (a warm-up job on 1 host, not counted), so the figure is the launch itself: the host
  preflight, pdsh over ssh, the per-node launcher, Python start-up, the rendezvous and the model's set-up.

Later measures (a lost node's detection time, the time from a loss back to training with restarts) add a function
and a MEASURES entry; `Bench.launch` starts a job and stamps its lines. The load average is printed before and
after: the machine is shared, and a ratio is only meaningful within its own run.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from cluster import Cluster, unavailable  # noqa: E402
from conftest import SAMPLE, build_bpe_tokenizer  # noqa: E402

STEPS = 3


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Bench:
    """One test cluster, a corpus, a tokenizer and a shared dataset cache in a temporary folder."""

    def __init__(self, root: Path, n_hosts: int = 3):
        self.root = root
        self.cluster = Cluster(root / "cluster", n_hosts=n_hosts)
        self.corpus = SAMPLE / "train"
        self.tokenizer = build_bpe_tokenizer(root / "tokenizer")
        self.cache = root / "cache"
        self.runs = 0

    def launch(self, hosts, *flags, until="step 1 |", timeout=900, **variables) -> dict:
        """launch.sh from the head on `hosts`; {"seconds": to the first line containing `until` (None if never),
        "returncode", "output"}. The job runs to its end (STEPS steps)."""
        self.runs += 1
        out = self.root / f"run{self.runs}"
        env = {"HOSTFILE": self.cluster.hostfile(hosts), "PROJECT_TRAIN_DIR": self.corpus,
               "PROJECT_TOKENIZER": self.tokenizer, "PROJECT_OUTPUT_DIR": out, "PROJECT_CACHE_DIR": self.cache,
               "PROJECT_MAX_SEQ_LENGTH": 64, "PROJECT_BATCH_SIZE": 2, "PROJECT_MAX_STEPS": STEPS,
               "PROJECT_LOGGING_STEPS": 1, "PROJECT_SAVE_STEPS": 1000, **variables}
        command = " ".join(f"{k}={v}" for k, v in env.items())
        start = time.monotonic()
        proc = self.cluster.popen(self.cluster.head, f"{command} bash {REPO}/launch.sh " + " ".join(flags),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.root)
        seen, lines = [], []

        def read():
            for line in proc.stdout:
                lines.append(line)
                if not seen and until in line:
                    seen.append(time.monotonic() - start)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        reader.join(timeout=10)
        return {"seconds": seen[0] if seen else None, "returncode": proc.returncode, "output": "".join(lines)}

    def close(self):
        self.cluster.close()


def first_step(bench: Bench, repeats: int) -> dict:
    warm = bench.launch(bench.cluster.hosts[:1])  # builds the cache; imports and page cache warm
    if warm["returncode"] != 0:
        raise RuntimeError(f"the warm-up job failed:\n{warm['output'][-3000:]}")
    times = {1: [], 3: []}
    for _ in range(repeats):  # interleaved
        for n in times:
            run = bench.launch(bench.cluster.hosts[:n])
            if run["returncode"] != 0 or run["seconds"] is None:
                raise RuntimeError(f"the {n}-host job failed:\n{run['output'][-3000:]}")
            times[n].append(run["seconds"])
    one, three = statistics.median(times[1]), statistics.median(times[3])
    print(f"launch.sh to the first optimizer step: 1 host {one:.1f} s, 3 hosts {three:.1f} s: {three / one:.2f}x "
          f"(median of {repeats}; all: {times})")
    return {"first_step_1_host": one, "first_step_3_hosts": three}


MEASURES = {"first_step": first_step}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=sorted(MEASURES), action="append", help="run only these measures")
    args = parser.parse_args()
    why = unavailable()
    if why:
        sys.exit(f"bench/cluster.py: {why}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"load average before: {load_avg()} ({os.cpu_count()} cores, shared)")
    root = Path(tempfile.mkdtemp(prefix="ds-mlm-bench-cluster-"))
    bench = Bench(root)
    try:
        for name in args.only or MEASURES:
            MEASURES[name](bench, args.repeats)
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
