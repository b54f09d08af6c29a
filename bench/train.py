"""Benchmark of the training engine, measured side by side in one run (not a test; prints ratios).

    .venv/bin/python bench/train.py [--steps 30] [--repeats 2] [--threads 2]

1. tokens/s of the DeepSpeed engine (ZeRO-0 fp32, and zero2.json: bf16 where the CPU has it natively, else fp32;
   torch's fused AdamW, as ds-mlm runs on CPU) against a plain PyTorch loop (the same fused AdamW, param groups,
   clipping, schedule and global-batch-normalised masked-token loss), same model, same pre-collated batches, same
   threads; repeats interleaved so machine noise hits all alike. Target: ZeRO-0 fp32 >= 0.95x plain.
2. The real Trainer (run_mlm.setup_training: loader thread, per-step all-reduce, logging window) on the sample
   corpus, ZeRO-2: the share of its step time spent in its own Python (outside the engine's forward, backward and
   step), the share spent waiting for data, with the loader's prefetch on and off. Targets: data wait < 1 %.
3. Per-rank optimizer-state bytes (the tensors in the optimizer's state: Adam moments, plus fp32 master partitions
   under bf16), ZeRO-2 on 2 ranks vs ZeRO-0 on 2 ranks (torchrun, two processes). Target: about half.
4. The optimizer step alone: torch.optim.AdamW fused vs foreach (the default) on this model's parameters.
5. The loader at a GPU's pace: a consumer that takes each step's batches and then waits T ms with the GIL released
   (what a CUDA step does while its kernels run), prefetch 0 vs 2, micro batches of 32 and 16 samples of 128 ids,
   steps of 10 and 30 ms. The share of the time spent waiting for data. Target: < 1 %.

The machine is shared: the load average is printed before and after.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import load_avg  # noqa: E402 (bench/ is on sys.path: the script's own folder)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024)  # tiny-ish
SEQ, MICRO, VOCAB_TRAIN_LINES = 128, 8, 4000


# -- shared pieces ------------------------------------------------------------------------------------------------

def tokenizer_and_data(workdir: Path):
    """A BPE tokenizer trained on the sample corpus, and the train token store built by ds-mlm's own data code."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_bpe_tokenizer
    from transformers import AutoTokenizer

    from ds_mlm.args import DataArguments
    from ds_mlm.distributed import env_info
    from ds_mlm.data.prepare import prepare_datasets

    tok_dir = workdir / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
        build_bpe_tokenizer(tok_dir, vocab_size=8000)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    data_args = DataArguments(train_dir=str(REPO / "data" / "sample" / "train"), max_seq_length=SEQ)
    train_ds, _ = prepare_datasets(data_args, tokenizer, env_info(), str(workdir / "cache"))
    return tokenizer, train_ds, data_args


def make_model(tokenizer, seed=0):
    import torch
    from transformers import RobertaConfig

    from ds_mlm.model import RobertaForMLMPretraining

    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=SEQ + 2, type_vocab_size=1,
                           layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2, **MODEL)
    return RobertaForMLMPretraining(config)  # as the trainer builds it: masked positions projected only


def train_args(workdir: Path, *flags):
    from ds_mlm.args import parse_args

    return parse_args(["--train_dir", str(workdir), "--output_dir", str(workdir / "out"), "--learning_rate", "1e-4",
                       "--warmup_steps", "5", "--max_steps", "1000", "--per_device_train_batch_size", str(MICRO),
                       "--logging_steps", "1000", "--save_steps", "1000000", *flags])[2]


# -- 1. engine vs plain PyTorch -----------------------------------------------------------------------------------

def fixed_batches(tokenizer, train_ds, n):
    from ds_mlm.collator import MLMCollator

    collator = MLMCollator.from_tokenizer(tokenizer, mlm_probability=0.15, seed=0)
    out = []
    for b in range(n):
        indices = [(b * MICRO + i) % len(train_ds) for i in range(MICRO)]
        out.append(collator(train_ds.__getitems__(indices), indices, 0))
    return out


def run_plain(model, batches, args) -> float:
    import torch

    from ds_mlm.optim import Schedule, param_groups

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate,
                            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True)
    sched = Schedule(opt, "linear", args.learning_rate, args.warmup_steps, args.max_steps)
    model.train()
    start = None
    for i, batch in enumerate(batches):
        if i == 3:
            start = time.perf_counter()  # the first steps allocate optimizer state and warm caches
        loss_sum, count = model(**batch)  # called like the engine: the masked tokens' summed CE and their number
        (loss_sum / count.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return sum(int(b["attention_mask"].sum()) for b in batches[3:]) / (time.perf_counter() - start)


def plan_for(args, world_size=1):
    from transformers import RobertaConfig

    from ds_mlm.args import parse_args
    from ds_mlm.plan import make_plan
    from ds_mlm.precision import this_device

    model_args, data_args, _ = parse_args(["--train_dir", ".", "--output_dir", args.output_dir,
                                           "--max_seq_length", str(SEQ)])
    device = this_device()
    plan, _ = make_plan(model_args, data_args, args, device, world_size, RobertaConfig(**MODEL))
    return plan.with_data(10**6)


def run_engine(model, batches, args, config_name) -> float:
    from ds_mlm.engine import build_engine

    engine = build_engine(plan_for(args), model)
    engine.train()
    start = None
    for i, batch in enumerate(batches):
        if i == 3:
            start = time.perf_counter()
        loss_sum, count = engine(**batch)
        engine.backward(loss_sum / count.clamp(min=1))
        engine.step()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[3:]) / (time.perf_counter() - start)
    engine.destroy()
    return tokens


def bench_throughput(workdir, tokenizer, train_ds, steps, repeats):
    from ds_mlm.precision import this_device

    batches = fixed_batches(tokenizer, train_ds, steps + 3)
    # zero2.json asks for bf16, which ds-mlm runs in fp32 where the CPU would emulate it: say which one ran
    z2 = "DeepSpeed ZeRO-2 " + ("bf16" if this_device().bf16_native else "fp32 (no native bf16)")
    setups = {"plain PyTorch fp32 AdamW": lambda: run_plain(make_model(tokenizer), batches, train_args(workdir)),
              "DeepSpeed ZeRO-0 fp32": lambda: run_engine(make_model(tokenizer), batches,
                                                          train_args(workdir, "--deepspeed_config", "zero0.json"), "z0"),
              z2: lambda: run_engine(make_model(tokenizer), batches,
                                                          train_args(workdir, "--deepspeed_config", "zero2.json"), "z2")}
    results = {name: [] for name in setups}
    for _ in range(repeats):
        for name, run in setups.items():  # interleaved
            results[name].append(run())
    best = {name: max(v) for name, v in results.items()}
    plain = best["plain PyTorch fp32 AdamW"]
    print(f"\n1. throughput ({steps} steps x {repeats} repeats, micro batch {MICRO}, seq {SEQ}, "
          f"{MODEL['num_hidden_layers']} layers x {MODEL['hidden_size']}; best of repeats)")
    for name, v in results.items():
        print(f"   {name:28s} {best[name]:9,.0f} tokens/s  ({', '.join(f'{x:,.0f}' for x in v)})  "
              f"ratio {best[name] / plain:.3f}x plain")
    return best


# -- 2. the real Trainer: its own Python, and the data wait with and without prefetch ---------------------------------

def trainer_run(workdir, tokenizer, train_ds, steps, prefetch: int) -> dict:
    """One run of the real Trainer; the engine's forward/backward/step timed from outside."""
    from ds_mlm.args import parse_args
    from ds_mlm.distributed import env_info
    from ds_mlm.run_mlm import plan_run, setup_training
    from ds_mlm.signals import StopOnSignal

    out = workdir / f"trainer_{prefetch}"
    args = parse_args([
        "--train_dir", str(workdir), "--output_dir", str(out), "--max_seq_length", str(SEQ), "--config_name",
        str(workdir / "model.json"), "--deepspeed_config", "zero2.json", "--max_steps", str(steps),
        "--per_device_train_batch_size", str(MICRO), "--logging_steps", "10", "--save_steps", "1000000",
        "--overwrite_output_dir", "true"])
    trainer = setup_training(plan_run(args, tokenizer, env_info()), tokenizer, train_ds, None)
    trainer.loader.prefetch = prefetch
    engine, spent = trainer.engine, [0.0]

    def timed(fn):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return call

    engine.forward, engine.backward, engine.step = timed(engine.forward), timed(engine.backward), timed(engine.step)
    waited = [0.0]
    next_step = trainer.loader.next

    def counted_next():
        step = next_step()
        waited[0] += trainer.loader.wait_seconds  # the trainer resets it each step
        return step

    trainer.loader.next = counted_next
    start = time.perf_counter()
    with StopOnSignal(False) as stop:
        trainer.train(stop)
    total = time.perf_counter() - start
    engine.destroy()
    return {"total": total, "engine": spent[0], "wait": waited[0]}


def bench_trainer(workdir, tokenizer, train_ds, steps, repeats):
    from transformers import RobertaConfig

    from ds_mlm.model import _COMMON

    RobertaConfig(**{**_COMMON, **MODEL}).to_json_file(str(workdir / "model.json"))
    runs = {prefetch: [] for prefetch in (2, 0)}
    for _ in range(repeats):
        for prefetch in runs:  # interleaved
            runs[prefetch].append(trainer_run(workdir, tokenizer, train_ds, steps, prefetch))
    print(f"\n2. the real Trainer, zero2.json, {steps} steps x {repeats} repeats (a save and the first steps included)")
    for prefetch, results in runs.items():
        best = min(results, key=lambda r: r["total"])
        own = best["total"] - best["engine"] - best["wait"]
        print(f"   prefetch {prefetch}: {best['total']:.2f} s, engine {best['engine']:.2f} s; the Trainer's own Python "
              f"{own * 1e3:.1f} ms = {100 * own / best['total']:.2f} % of the step time, {1e3 * own / steps:.2f} ms "
              f"per step; waiting for data {best['wait'] * 1e3:.1f} ms = {100 * best['wait'] / best['total']:.2f} %"
              f" (target < 1 %)")
    return runs


def bench_optimizer_step(tokenizer, repeats):
    import torch

    model = make_model(tokenizer)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for name, kw in (("foreach (torch default)", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-4, **kw)
        opt.step()
        t = time.perf_counter()
        for _ in range(repeats * 10):
            opt.step()
        out[name] = (time.perf_counter() - t) / (repeats * 10)
    print(f"\n4. AdamW step on {sum(p.numel() for p in params):,} parameters: " +
          ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in out.items()) +
          f" ({out['foreach (torch default)'] / out['fused']:.1f}x)")
    return out


# -- 3. optimizer-state memory, 2 ranks ----------------------------------------------------------------------------

def optimizer_state_bytes(engine) -> dict:
    import torch

    basic = engine.basic_optimizer if hasattr(engine, "basic_optimizer") else engine.optimizer
    moments = sum(t.numel() * t.element_size() for s in basic.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    masters = 0
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_groups"):
        groups = getattr(engine.optimizer, attr, None)
        if groups:
            flat = [t for g in groups for t in (g if isinstance(g, list) else [g])]
            masters = sum(t.numel() * t.element_size() for t in flat)
            break
    return {"moments": moments, "fp32_masters": masters}


def memory_worker(workdir: Path, config_name: str, flags: list) -> None:
    from ds_mlm import distributed
    from ds_mlm.engine import build_engine

    dist = distributed.init()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "tokenizer"))
    model = make_model(tokenizer)
    args = train_args(workdir, "--deepspeed_config", config_name, *flags)
    engine = build_engine(plan_for(args, dist.world_size), model)
    import torch

    ids = torch.randint(5, len(tokenizer), (2, 16))
    loss_sum, count = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    engine.backward(loss_sum / count)
    engine.step()  # Adam state exists after the first step
    sizes = optimizer_state_bytes(engine)
    params = sum(p.numel() for p in model.parameters())
    result = {"rank": dist.rank, "config": config_name, "flags": flags, "params": params, **sizes}
    (workdir / f"memory_{config_name}_{'_'.join(flags)}_{dist.rank}.json").write_text(json.dumps(result))


def bench_memory(workdir):
    results = {}
    from ds_mlm.distributed import free_port
    from ds_mlm.precision import this_device

    setups = [("ZeRO-0 fp32", "zero0.json", ""), ("ZeRO-2 fp32", "zero2.json", "--bf16 false")]
    if this_device().bf16_native:  # elsewhere zero2.json runs in fp32: the row above
        setups.append(("ZeRO-2 bf16", "zero2.json", ""))
    for label, config_name, flag in setups:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), __file__, "--memory-worker", str(workdir), config_name, flag]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        files = [workdir / f"memory_{config_name}_{'_'.join(flag.split())}_{rank}.json" for rank in (0, 1)]
        lines = [json.loads(f.read_text()) for f in files if f.exists()]
        for f in files:
            f.unlink(missing_ok=True)
        if proc.returncode != 0 or len(lines) != 2:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"memory worker failed for {label}")
        results[label] = sorted(lines, key=lambda r: r["rank"])
    base = results["ZeRO-0 fp32"][0]["moments"]
    print(f"\n3. optimizer state per rank, 2 ranks ({results['ZeRO-0 fp32'][0]['params']:,} parameters)")
    for label, ranks in results.items():
        per = ", ".join(f"rank {r['rank']}: {r['moments'] / 2**20:.2f} MiB moments + "
                        f"{r['fp32_masters'] / 2**20:.2f} MiB fp32 masters" for r in ranks)
        total = (ranks[0]["moments"] + ranks[0]["fp32_masters"]) / base
        print(f"   {label:12s} {per}\n                -> Adam moments {ranks[0]['moments'] / base:.3f}x ZeRO-0, "
              f"moments + fp32 masters {total:.3f}x")
    return results


def bench_loader_at_gpu_pace(tokenizer, train_ds, steps):
    from ds_mlm.collator import MLMCollator
    from ds_mlm.loader import StepLoader
    from ds_mlm.sampler import GlobalBatchSampler

    print(f"\n5. the loader at a GPU's pace ({steps} steps; the consumer sleeps T ms per step, GIL released)")
    for micro, step_ms in ((32, 30), (32, 10), (16, 30)):
        for prefetch in (0, 2):
            sampler = GlobalBatchSampler(len(train_ds), micro, micro, seed=1)
            collator = MLMCollator.from_tokenizer(tokenizer, seed=1)
            loader = StepLoader(sampler, train_ds, collator, "cpu", prefetch=prefetch)
            loader.next()  # the thread's start-up and numba's first call are not a step
            loader.wait_seconds = 0.0
            start = time.perf_counter()
            for _ in range(steps):
                loader.next()
                time.sleep(step_ms / 1e3)
            total = time.perf_counter() - start
            waited = loader.wait_seconds
            loader.close()
            print(f"   micro {micro} x {SEQ}, step {step_ms} ms, prefetch {prefetch}: waited {waited * 1e3:.1f} ms of "
                  f"{total:.2f} s = {100 * waited / total:.2f} %")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="reuse a work directory (tokenizer, token store)")
    parser.add_argument("--memory-worker", nargs=3, metavar=("WORKDIR", "CONFIG", "FLAG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        workdir, config_name, flags = args.memory_worker
        return memory_worker(Path(workdir), config_name, flags.split())

    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ds-mlm-bench-"))
    print(f"load average before: {load_avg()} (2 cores shared; numbers are only comparable within this run)")
    from ds_mlm import distributed

    distributed.init()
    tokenizer, train_ds, data_args = tokenizer_and_data(workdir)
    print(f"train samples: {len(train_ds):,} x {SEQ} tokens; threads {torch.get_num_threads()}")
    bench_throughput(workdir, tokenizer, train_ds, args.steps, args.repeats)
    bench_trainer(workdir, tokenizer, train_ds, args.steps * 2, args.repeats)
    bench_memory(workdir)
    bench_optimizer_step(tokenizer, args.repeats)
    bench_loader_at_gpu_pace(tokenizer, train_ds, args.steps * 3)
    print(f"\nload average after: {load_avg()}")


if __name__ == "__main__":
    main()
