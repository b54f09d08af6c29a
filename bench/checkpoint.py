"""Benchmark of checkpoints: how long saving, loading and converting a roberta-base checkpoint takes here (not a test).

    .venv/bin/python bench/checkpoint.py [--vocab 50265] [--workdir DIR]

For zero0.json, zero2.json and zero3.json (each in the precision it runs in on this CPU), one process: one optimizer
step of roberta-base (the ancestor's shapes), then `Checkpointer.write` (DeepSpeed's files, the RNG states, the
trainer state, fsync of every file, the COMPLETE marker), then a fresh engine and `Checkpointer.load`. Then the
elastic case: a ZeRO-2 checkpoint saved by 2 processes, converted to DeepSpeed's universal form (what a resume on
another number of processes does once) and loaded by 1 process. The save time is what a preempted run needs
inside its grace period (after finishing the step it is in): README, "What happens when... a job is preempted".
"""

import argparse
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
from common import load_avg  # noqa: E402 (bench/ is on sys.path: the script's own folder)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def engine_for(config_name: str, out: str, vocab: int):
    """A roberta-base engine built the way run_mlm builds it (flags -> ds_config -> plan -> engine)."""
    import torch
    from transformers import RobertaConfig

    from ds_mlm import distributed
    from ds_mlm.args import parse_args
    from ds_mlm.engine import build_engine
    from ds_mlm.model import _COMMON, PRESETS, RobertaForMLMPretraining
    from ds_mlm.plan import make_plan
    from ds_mlm.precision import this_device

    dist = distributed.env_info()
    model_args, data_args, args = parse_args(["--train_dir", ".", "--output_dir", out, "--max_seq_length", "128",
                                              "--deepspeed_config", config_name, "--per_device_train_batch_size",
                                              "2", "--max_steps", "100"])
    config = RobertaConfig(**_COMMON, **PRESETS["roberta-base"], vocab_size=vocab)
    device = this_device()
    plan, _ = make_plan(model_args, data_args, args, device, dist.world_size, config)
    plan = plan.with_data(10**6)
    torch.manual_seed(0)
    return plan, build_engine(plan, RobertaForMLMPretraining(config)), dist


def worker(config_name: str, out: str, vocab: int, mode: str) -> None:
    import torch

    from ds_mlm import distributed
    from ds_mlm.checkpointer import Checkpointer

    distributed.init()
    timings = {}
    if mode in ("save", "save-only"):
        plan, engine, dist = engine_for(config_name, out, vocab)
        ids = torch.randint(5, vocab, (2, 128))
        loss_sum, count = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        engine.backward(loss_sum / count)
        engine.step()  # optimizer state exists after the first step
        checkpointer = Checkpointer(out, dist)
        dist.barrier()
        t = time.perf_counter()
        checkpointer.write(engine, 1, {"global_step": 1, "plan": plan.to_dict()})
        timings["save"] = time.perf_counter() - t
        timings["precision"] = plan.precision
        del engine
    if mode in ("save", "load-universal"):
        plan, engine, dist = engine_for(config_name, out, vocab)
        checkpointer = Checkpointer(out, dist)
        t = time.perf_counter()
        checkpointer.accept(plan)  # as a resume does: on another world size, the conversion to the universal form
        timings["convert"] = time.perf_counter() - t
        dist.barrier()
        t = time.perf_counter()
        checkpointer.load(engine, same_world=not checkpointer.universal)
        timings["load"] = time.perf_counter() - t
    if distributed.env_info().rank == 0:
        Path(out, f"timings-{mode}.json").write_text(json.dumps(timings))


def launch(nproc: int, config_name: str, out: Path, vocab: int, mode: str) -> dict:
    from ds_mlm.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), __file__, "--worker", config_name, str(out), str(vocab), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(2 // nproc)})
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"worker failed: {config_name} {mode} on {nproc}")
    return json.loads((out / f"timings-{mode}.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50265, help="vocabulary rows (roberta-base's: 50265)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", nargs=4, metavar=("CONFIG", "OUT", "VOCAB", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config_name, out, vocab, mode = args.worker
        return worker(config_name, out, int(vocab), mode)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ds-mlm-bench-ckpt-"))
    print(f"load average before: {load_avg()}; roberta-base with {args.vocab:,} vocabulary rows; files in {workdir}")
    print(f"{'config':12s} {'precision':9s} {'checkpoint':>11s} {'save':>8s} {'load':>8s}")
    for config_name in ("zero0.json", "zero2.json", "zero3.json"):
        out = workdir / config_name[:-5]
        shutil.rmtree(out, ignore_errors=True)
        timings = launch(1, config_name, out, args.vocab, "save")
        size = size_of(out / "checkpoint-1")
        print(f"{config_name:12s} {timings['precision']:9s} {size / 2**30:9.2f} GiB {timings['save']:7.1f}s "
              f"{timings['load']:7.1f}s")
        shutil.rmtree(out)

    out = workdir / "elastic"
    shutil.rmtree(out, ignore_errors=True)
    saved = launch(2, "zero2.json", out, args.vocab, "save-only")
    size = size_of(out / "checkpoint-1")
    loaded = launch(1, "zero2.json", out, args.vocab, "load-universal")
    convert = loaded["convert"]
    print(f"zero2.json saved by 2 processes ({size / 2**30:.2f} GiB, save {saved['save']:.1f} "
          f"s), converted to the universal form in {convert:.1f} s, loaded by 1 process in {loaded['load']:.1f} s")
    shutil.rmtree(out)
    print(f"load average after: {load_avg()}")


if __name__ == "__main__":
    main()
