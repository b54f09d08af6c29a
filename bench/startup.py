"""Benchmark of a run's start, finish, memory and throughput: ds-mlm and HuggingFace's run_mlm.py pipeline on the same
job, side by side and interleaved in one run, with the floor (not a test; prints ratios).

    .venv/bin/python bench/startup.py [--steps 30] [--repeats 2] [--corpus_mb 8] [--corpora /work/shared/corpora]

HF's side needs datasets and accelerate (`pip install -e .[bench]`).

The job, as a user types it on both sides: a byte-level BPE of --vocab_size trained here on the corpus (ds-mlm's
ds-mlm-train-tokenizer), roberta-tiny (ds-mlm's preset, written once as a config.json that both load: ds-mlm's
--config_name, HF's --config_name), seq 128, micro-batch 16, --steps optimizer steps on 1 process, learning rate 5e-4
with 1 warm-up step, logging every step, a checkpoint at the last step and the model saved at the end, in the precision
ds-mlm trains in here (bf16 where the CPU computes it natively: HF then gets --bf16 --use_cpu; else fp32 both).
The corpus: the Thai news sample and the English novel of --corpora, topped up with the 30 MB Thai news's first lines
to --corpus_mb (one train.txt; the repo's data/sample/train when --corpora is absent).
- ds-mlm: `python -m ds_mlm.run_mlm` (best-fit blocks of whole sentences), its token stores built first (a warm cache,
  as on every run after the first).
- HF: bench/hf_run_mlm.py, a reproduction of transformers' examples/pytorch/language-modeling/run_mlm.py training
  pipeline (that script is in neither the transformers wheel nor its sdist): datasets' "text" loader, .map
  tokenization, group_texts (blocks cut across sentences, 100 % full), DataCollatorForLanguageModeling, Trainer with
  its defaults (dataloader_num_workers 0). Its datasets cache is warmed first by a run without --do_train, which stops
  after preprocessing; the arrow files are counted around every timed run, which says if one missed the cache.
  HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 for every command (nothing is downloaded), HF_HOME in the temp dir.
Measured for each (the best of --repeats, interleaved with the other side, the order swapped each repeat):
  - command to first step: from starting the process to the end of optimizer step 1 (ds-mlm: train_log.jsonl's
    "time" of step 1; HF: the bench's on_step_end callback);
  - last step to exit: from the last step's record to the process's exit (checkpoint, save, exit);
  - peak RSS (wait4's ru_maxrss: the largest process of the tree);
  - optimizer steps/s and useful (non-padding) tokens/s after step 1: steps 2..N over the time from step 1's end to
    step N's (HF: tokens counted by the Trainer's include_num_input_tokens_seen="non_padding"; ds-mlm: each step's
    logged tokens_per_s times its interval).
Targets (issue #24): first step and finish at most HF's, RSS at most 1.1x HF's, useful tokens/s at least 2x HF's.
As before: `python -m ds_mlm.run_mlm --help` against the floor (`python -c "import torch, transformers"`, the part of
any HF MLM script's cost it cannot avoid): under 1.5 s. The machine is shared: the load average is printed before
and after.
"""

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_avg

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SAMPLE = REPO / "data" / "sample" / "train"
CORPORA = ("thaigov-sample.txt", "botchan-sample.txt")
MORE = "thaigov-bench-30MB.txt.gz"  # the top-up to --corpus_mb


def make_corpus(corpora: Path, megabytes: float, out: Path) -> str:
    """out/train.txt from the shared corpora (or the repo's sample); what it holds, in words."""
    out.mkdir(parents=True)
    if not all((corpora / name).exists() for name in CORPORA):
        files, more = sorted(SAMPLE.glob("*.txt")), None
    else:
        files, more = [corpora / name for name in CORPORA], corpora / MORE
    with open(out / "train.txt", "wb") as f:
        for path in files:
            f.write(path.read_bytes().rstrip(b"\n") + b"\n")
        if more is not None and more.exists():
            with gzip.open(more, "rb") as src:
                for line in src:
                    if f.tell() >= megabytes * 2**20:
                        break
                    f.write(line)
        size = f.tell()
    return f"{', '.join(p.name for p in files)}{f' + the start of {MORE}' if more else ''}: {size / 2**20:.1f} MiB"


def timed(cmd, log_path: Path) -> dict:
    """Run cmd to its end: wall seconds, peak RSS (MiB, wait4's ru_maxrss), start and end Unix times."""
    with open(log_path, "w") as log:
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        end = time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    if proc.returncode != 0:
        sys.exit(f"bench/startup.py: {' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}); see {log_path}")
    return {"seconds": end - start, "rss_mib": usage.ru_maxrss / 1024, "start": start, "end": end}


def measured(got: dict, steps: int, times: list, tokens: list) -> dict:
    """The run's figures from its steps' end times and non-padding tokens (step 1 first)."""
    assert len(times) == steps, f"{len(times)} steps logged, {steps} asked"
    span = max(times[-1] - times[0], 1e-9)  # steps 2..N; the first holds one-off work (allocations, first calls)
    return {**got, "first_step": times[0] - got["start"], "finish": got["end"] - times[-1],
            "steps_per_s": (steps - 1) / span, "tokens_per_s": sum(tokens[1:]) / span}


def ds_args(job: dict, steps: int) -> list:
    return [PYTHON, "-m", "ds_mlm.run_mlm", "--tokenizer_name_or_path", job["tokenizer"], "--train_dir", job["corpus"],
            "--datasets_cache_dir", job["ds_cache"], "--config_name", job["config"], "--max_seq_length", "128",
            "--per_device_train_batch_size", "16", "--max_steps", str(steps), "--logging_steps", "1",
            "--save_steps", str(steps), "--learning_rate", "5e-4", "--warmup_steps", "1"]


def hf_args(job: dict) -> list:
    return [PYTHON, str(REPO / "bench" / "hf_run_mlm.py"), "--config_name", job["config"], "--tokenizer_name",
            job["tokenizer"], "--train_file", str(Path(job["corpus"]) / "train.txt"), "--cache_dir", job["hf_cache"],
            "--max_seq_length", "128", "--per_device_train_batch_size", "16", "--learning_rate", "5e-4",
            "--warmup_steps", "1", "--logging_steps", "1", *(["--bf16", "--use_cpu"] if job["bf16"] else [])]


def run_ds(work: Path, job: dict, steps: int, index: int) -> dict:
    out = work / f"ds{index}"
    got = timed([*ds_args(job, steps), "--output_dir", str(out)], work / f"ds{index}.log")
    records = [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1)), f"steps logged: {[r['step'] for r in records]}"
    times = [r["time"] for r in records]
    tokens = [0.0] + [r["tokens_per_s"] * (b - a) for r, a, b in zip(records[1:], times, times[1:])]
    padding = [r["padding"] for r in records if r.get("padding") is not None]
    return {**measured(got, steps, times, tokens), "padding": sum(padding) / max(len(padding), 1)}


def arrow_files(cache: str) -> int:
    return sum(1 for _ in Path(cache).rglob("*.arrow"))


def run_hf(work: Path, job: dict, steps: int, index: int) -> dict:
    out, log = work / f"hf{index}", work / f"hf{index}.steps.jsonl"
    cached = arrow_files(job["hf_cache"])
    got = timed([*hf_args(job), "--output_dir", str(out), "--do_train", "--max_steps", str(steps), "--save_steps",
                 str(steps), "--step_log", str(log)], work / f"hf{index}.log")
    records = list(map(json.loads, log.read_text().splitlines()))
    assert [r["step"] for r in records] == list(range(1, steps + 1)), f"steps logged: {[r['step'] for r in records]}"
    seen = [r["tokens"] for r in records]
    return {**measured(got, steps, [r["time"] for r in records], [b - a for a, b in zip([0, *seen], seen)]),
            "cache_missed": arrow_files(job["hf_cache"]) != cached}


# run in a child: the bench's own process stays light, for a forked child's ru_maxrss starts at its parent's RSS
SETUP = """import sys
from transformers import AutoTokenizer
from ds_mlm.model import make_config
from ds_mlm.precision import choose, this_device
make_config("roberta-tiny", None, AutoTokenizer.from_pretrained(sys.argv[1])).to_json_file(sys.argv[2])
print(choose("bf16", this_device())[0])  # what ds-mlm trains in here with its default zero2.json (bf16 asked)
"""


def prepare(work: Path, args) -> dict:
    """The corpus, the tokenizer, the shared config.json; both caches warmed."""
    corpus = work / "corpus"
    print(f"corpus: {make_corpus(args.corpora, args.corpus_mb, corpus)}", flush=True)
    job = {"corpus": str(corpus), "tokenizer": str(work / "tokenizer"), "config": str(work / "config.json"),
           "ds_cache": str(work / "ds_cache"), "hf_cache": str(work / "hf_cache")}
    timed([PYTHON, "-m", "ds_mlm.train_tokenizer", "--type", "bpe", "--input_dir", job["corpus"], "--vocab_size",
           str(args.vocab_size), "--output_dir", job["tokenizer"]], work / "tokenizer.log")
    timed([PYTHON, "-c", SETUP, job["tokenizer"], job["config"]], work / "setup.log")
    job["bf16"] = (work / "setup.log").read_text().split()[-1] == "bf16"
    start = time.time()
    timed([*ds_args(job, args.steps), "--output_dir", str(work / "build"), "--build_dataset_only"], work / "build.log")
    warm_ds = time.time() - start
    timed([*hf_args(job), "--output_dir", str(work / "hf_warm")], work / "hf_warm.log")  # no --do_train: maps only
    warm_hf = time.time() - start - warm_ds
    print(f"warm-up: ds-mlm --build_dataset_only {warm_ds:.1f} s, HF preprocessing {warm_hf:.1f} s "
          f"({arrow_files(job['hf_cache'])} arrow files cached); precision {'bf16' if job['bf16'] else 'fp32'} both",
          flush=True)
    return job


def row(name: str, ds: float, hf: float, unit: str, target: str, met: bool, spec: str = ".2f") -> None:
    print(f"  {name:<26} ds-mlm {ds:{spec}} {unit}, HF {hf:{spec}} {unit}: {ds / hf:.2f}x "
          f"(target {target}: {'met' if met else 'NOT met'})")


def report(args, floor, helps, ds, hf) -> None:
    best = lambda rows, key: min(r[key] for r in rows)  # noqa: E731 (noise only ever adds)
    most = lambda rows, key: max(r[key] for r in rows)  # noqa: E731
    listed = lambda rows, key, spec: ", ".join(format(r[key], spec) for r in rows)  # noqa: E731
    f_s, f_rss = best(floor, "seconds"), best(floor, "rss_mib")
    h_s, h_rss = best(helps, "seconds"), best(helps, "rss_mib")
    print(f"floor `python -c 'import torch, transformers'`: {f_s:.2f} s, peak RSS {f_rss:,.0f} MiB "
          f"(best of {args.repeats}; all: {listed(floor, 'seconds', '.2f')} s)")
    print(f"--help: {h_s:.2f} s = {h_s / f_s:.2f}x the floor (target < 1.5 s: "
          f"{'met' if h_s < 1.5 else 'NOT met'}), peak RSS {h_rss:,.0f} MiB = {h_rss / f_rss:.2f}x")
    print(f"the job (roberta-tiny, BPE {args.vocab_size}, seq 128, batch 16, {args.steps} steps, 1 process, warm "
          f"caches), best of {args.repeats}:")
    first, finish = (best(ds, "first_step"), best(hf, "first_step")), (best(ds, "finish"), best(hf, "finish"))
    rss = best(ds, "rss_mib"), best(hf, "rss_mib")
    steps = most(ds, "steps_per_s"), most(hf, "steps_per_s")
    tokens = most(ds, "tokens_per_s"), most(hf, "tokens_per_s")
    row("command to first step", *first, "s", "<= 1x", first[0] <= first[1])
    row("last step to exit", *finish, "s", "<= 1x", finish[0] <= finish[1])
    row("peak RSS", *rss, "MiB", "<= 1.1x", rss[0] <= 1.1 * rss[1], ",.0f")
    print(f"  {'optimizer steps/s':<26} ds-mlm {steps[0]:.2f}, HF {steps[1]:.2f}: {steps[0] / steps[1]:.2f}x")
    row("useful tokens/s", *tokens, "/s", ">= 2x", tokens[0] >= 2 * tokens[1], ",.0f")
    print(f"  padding of ds-mlm's computed positions: {100 * min(r['padding'] for r in ds):.1f} % (HF: 0, group_texts)")
    for name, rows in (("ds-mlm", ds), ("HF", hf)):
        print(f"  all {name}: first step {listed(rows, 'first_step', '.2f')} s; finish {listed(rows, 'finish', '.2f')}"
              f" s; RSS {listed(rows, 'rss_mib', ',.0f')} MiB; tokens/s {listed(rows, 'tokens_per_s', ',.0f')}")
    if any(r["cache_missed"] for r in hf):
        print("  WARNING: an HF run wrote new arrow files: its datasets cache was not warm")
    print(f"  floor: first step ds-mlm {first[0] / f_s:.2f}x, HF {first[1] / f_s:.2f}x; "
          f"RSS ds-mlm {rss[0] / f_rss:.2f}x, HF {rss[1] / f_rss:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of each run")
    ap.add_argument("--repeats", type=int, default=2, help="measure each side this many times (best kept)")
    ap.add_argument("--vocab_size", type=int, default=16000, help="byte-level BPE vocabulary of the job")
    ap.add_argument("--corpus_mb", type=float, default=8, help="corpus size: the samples topped up with Thai news")
    ap.add_argument("--corpora", type=Path, default=Path("/work/shared/corpora"), help="the shared corpora")
    args = ap.parse_args()
    if args.steps < 2:
        sys.exit("bench/startup.py: --steps must be 2 or more (throughput is measured after step 1)")
    missing = [m for m in ("datasets", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"bench/startup.py: HF's side needs {' and '.join(missing)}: pip install -e .[bench]")
    print(f"load average before: {load_avg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ds-mlm-startup-") as tmp:
        work = Path(tmp)
        ENV["HF_HOME"] = str(work / "hf_home")  # nothing read from or written to the user's HF cache
        job = prepare(work, args)
        floor, helps, ds, hf = [], [], [], []
        for i in range(args.repeats):  # interleaved: a burst of load from other sessions hits every side alike
            floor.append(timed([PYTHON, "-c", "import torch, transformers"], work / "floor.log"))
            helps.append(timed([PYTHON, "-m", "ds_mlm.run_mlm", "--help"], work / "help.log"))
            sides = [lambda: ds.append(run_ds(work, job, args.steps, i)),
                     lambda: hf.append(run_hf(work, job, args.steps, i))]
            for side in sides[::-1] if i % 2 else sides:
                side()
            print(f"repeat {i + 1}: ds-mlm first step {ds[-1]['first_step']:.2f} s, HF {hf[-1]['first_step']:.2f} s; "
                  f"load {load_avg()}", flush=True)
        report(args, floor, helps, ds, hf)
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
