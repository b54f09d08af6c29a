"""Benchmark of jobs on the test cluster (tests/cluster.py: real hosts in network namespaces, real sshd and pdsh).

    .venv/bin/python bench/cluster.py [--repeats 1] [--only first_step]      (as root: it makes namespaces)

Measures, each a function in MEASURES (name -> function(bench) -> {label: seconds}), run in order, one cluster:

- first_step: the seconds from `bash launch.sh` on the head to the job's first optimizer step (the "step 1 |" log
  line, stamped as it arrives), with HOSTFILE listing 1 and then 3 hosts; the ratio 3 hosts / 1 host. The dataset
  cache is built beforehand (a warm-up job on 1 host, not counted), so the figure is the launch itself: the host
  preflight, pdsh over ssh, the per-node launcher, Python start-up, the rendezvous and the model's set-up.

- lost_node: one of 3 hosts lost after the job's first checkpoint: kill -9 of its processes, and its link cut (no
  reset reaches its peers) at --distributed_timeout_minutes 0.5; then the cut with MAX_RESTARTS=1. For each, the
  seconds from the loss to the survivors' "lost contact with" line, to launch.sh's end, and with restarts to
  launch.sh's restart, the resumed job's "resumed from" line and its first step; the ratio cut / kill of the
  detection. The cut at the default timeout (10 minutes) runs only with --cut_default.

Further measures add a function and a MEASURES entry; `Bench.launch` starts a job and stamps its lines. The load average is printed before and
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
from common import load_avg  # noqa: E402 (bench/ is on sys.path: the script's own folder)

STEPS = 3


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


def _watch(bench: Bench, hosts, stamps: dict, **variables):
    """launch.sh from the head on `hosts`, training long enough to lose a node in; each watched phrase's first
    arrival is stamped in `stamps` (monotonic seconds). Returns (process, reader thread, output directory)."""
    bench.runs += 1
    out = bench.root / f"run{bench.runs}"
    timeout = variables.pop("TIMEOUT_MINUTES", None)
    env = {"HOSTFILE": bench.cluster.hostfile(hosts), "PROJECT_TRAIN_DIR": bench.corpus,
           "PROJECT_TOKENIZER": bench.tokenizer, "PROJECT_OUTPUT_DIR": out, "PROJECT_CACHE_DIR": bench.cache,
           "PROJECT_MAX_SEQ_LENGTH": 64, "PROJECT_BATCH_SIZE": 2, "PROJECT_MAX_STEPS": 40,
           "PROJECT_LOGGING_STEPS": 1, "PROJECT_SAVE_STEPS": 3, **variables}
    command = " ".join(f"{k}={v}" for k, v in env.items())
    flags = f"--distributed_timeout_minutes {timeout}" if timeout else ""
    proc = bench.cluster.popen(bench.cluster.head, f"{command} bash {REPO}/launch.sh {flags}",
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=bench.root)
    phrases = ("lost contact with", "restart 1 of", "resumed from")

    def read():
        for line in proc.stdout:
            for phrase in phrases:
                if phrase in line and phrase not in stamps:
                    stamps[phrase] = time.monotonic()
            if "resumed from" in stamps and "step " in line and " | loss " in line and "step after" not in stamps:
                stamps["step after"] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, reader, out


def _lose(bench: Bench, how: str, timeout_minutes, restarts: int = 0) -> dict:
    """Seconds from losing the third host (`how`: kill or cut, once the first checkpoint is complete) to the
    survivors' lost-peer line, to launch.sh's end (or its restart), and with restarts to the resumed job's first step."""
    stamps, victim = {}, bench.cluster.hosts[2]
    variables = {"SSH_ALIVE_SECONDS": 3, "SSH_CHECK_SECONDS": 3, "MAX_RESTARTS": restarts}
    if timeout_minutes is not None:
        variables["TIMEOUT_MINUTES"] = timeout_minutes
    proc, reader, out = _watch(bench, bench.cluster.hosts, stamps, **variables)
    try:
        deadline = time.monotonic() + 900
        while not any((c / "COMPLETE").exists() for c in out.glob("checkpoint-*")):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"no checkpoint before the loss ({how})")
            time.sleep(0.2)
        lost = time.monotonic()
        bench.cluster.kill(victim) if how == "kill" else bench.cluster.cut(victim)
        proc.wait(timeout=1800)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
        if how == "cut":
            bench.cluster.restore(victim)
        bench.cluster.kill(victim)
    reader.join(timeout=10)
    seconds = {k: round(v - lost, 1) for k, v in stamps.items()}
    seconds["launch.sh ended"] = round(ended - lost, 1)
    return seconds


def lost_node(bench: Bench, repeats: int) -> dict:
    """A host lost mid-run, after the first checkpoint: kill -9, and a link cut at --distributed_timeout_minutes 0.5;
    then the cut with MAX_RESTARTS=1 (back to training without the host). The cut at the default (10 minutes) runs
    only with --cut_default: it takes that long by design."""
    results = {"kill": _lose(bench, "kill", None), "cut, timeout 0.5 min": _lose(bench, "cut", 0.5),
               "cut, timeout 0.5 min, MAX_RESTARTS=1": _lose(bench, "cut", 0.5, restarts=1)}
    if bench.cut_default:
        results["cut, default timeout (10 min)"] = _lose(bench, "cut", None)
    for name, seconds in results.items():
        print(f"lost node, {name}: seconds after the loss: {seconds}")
    kill, cut = results["kill"], results["cut, timeout 0.5 min"]
    print(f"detection, cut at 0.5 min / kill: {cut['lost contact with'] / max(kill['lost contact with'], 0.1):.1f}x")
    return results


MEASURES = {"first_step": first_step, "lost_node": lost_node}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=sorted(MEASURES), action="append", help="run only these measures")
    parser.add_argument("--cut_default", action="store_true",
                        help="lost_node: also cut a link at the default --distributed_timeout_minutes (10 minutes)")
    args = parser.parse_args()
    why = unavailable()
    if why:
        sys.exit(f"bench/cluster.py: {why}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"load average before: {load_avg()} ({os.cpu_count()} cores, shared)")
    root = Path(tempfile.mkdtemp(prefix="ds-mlm-bench-cluster-"))
    bench = Bench(root)
    bench.cut_default = args.cut_default
    try:
        for name in args.only or MEASURES:
            MEASURES[name](bench, args.repeats)
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
