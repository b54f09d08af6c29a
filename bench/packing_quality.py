"""Does best fit train better than sequential packing? roberta-tiny on the shared Thai news, the same eval blocks.

    .venv/bin/python bench/packing_quality.py [--steps 300] [--eval-every 50] [--batch 16] [--seq 128]

The Thai sample (thaigov-sample.txt) is tokenized by the 16k byte-level BPE bench/packing.py trains; its last 10 %
of lines are held out. The training lines are packed twice (best fit, sequential), the held-out lines once
(sequential: the same eval blocks, the same masks for both runs). Two roberta-tiny models from the same initial
weights train side by side, a step of one then a step of the other (so machine noise hits both alike), each on
random batches of its own blocks (same seed), fwd + bwd + AdamW (lr 5e-4, 5 % warm-up, linear decay); each micro-batch
as wide as its longest block, as the loader makes them. Every --eval-every steps both are evaluated (not timed).
Printed: eval loss at equal steps, and at equal wall time (the shorter run's total training time; the longer run's
eval loss interpolated linearly between its two evaluations around it), with the tokens each run saw. The load
average is printed.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from packing import CORPORA, blocks_of, load, read_ids, train_tokenizer  # noqa: E402  (bench/packing.py)

PACKINGS = ("best_fit", "sequential")


def evaluate(model, batches) -> float:
    model.eval()
    loss_sum = count = 0.0
    with torch.no_grad():
        for b in batches:
            loss, n = model(**b)
            loss_sum, count = loss_sum + float(loss), count + int(n)
    model.train()
    return loss_sum / max(count, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=Path, default=Path("/work/shared/corpora"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    from transformers import RobertaConfig

    from ds_mlm.collator import MLMCollator
    from ds_mlm.data.spec import separator_id
    from ds_mlm.model import _COMMON, PRESETS, RobertaForMLMPretraining

    print(f"load average before: {load()} (2 shared cores); {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(args.corpora, Path(tmp) / "tokenizer")
    sep = separator_id(tokenizer)
    tokens, offsets = read_ids(args.corpora / CORPORA["thai-sample"], tokenizer)
    cut = int((offsets.size - 1) * 0.9)
    train = (tokens, offsets[:cut + 1])
    held = (tokens[offsets[cut]:], offsets[cut:] - offsets[cut])
    collator = MLMCollator.from_tokenizer(tokenizer, mlm_probability=0.15, seed=0)
    eval_blocks = blocks_of(*held, args.seq, sep, "sequential")
    eval_batches = [collator(eval_blocks[a:a + 32], list(range(a, min(a + 32, len(eval_blocks)))), 0)
                    for a in range(0, len(eval_blocks), 32)]
    runs = {p: blocks_of(*train, args.seq, sep, p) for p in PACKINGS}
    config = RobertaConfig(vocab_size=len(tokenizer), **{**_COMMON, **PRESETS["roberta-tiny"]})
    torch.manual_seed(0)
    first = RobertaForMLMPretraining(config)
    models = {p: RobertaForMLMPretraining(config) for p in PACKINGS}
    for m in models.values():
        m.load_state_dict(first.state_dict())
        m.train()
    optims = {p: torch.optim.AdamW(models[p].parameters(), lr=args.lr, weight_decay=0.01) for p in PACKINGS}
    warmup = max(1, args.steps // 20)
    scheds = {p: torch.optim.lr_scheduler.LambdaLR(optims[p], lambda s: min((s + 1) / warmup, max(
        0.0, (args.steps - s) / max(args.steps - warmup, 1)))) for p in PACKINGS}
    rngs = {p: np.random.default_rng(1) for p in PACKINGS}
    for p, blocks in runs.items():
        fill = sum(map(len, blocks)) / (len(blocks) * args.seq)
        print(f"{p:10s}: {len(blocks):,} training blocks, fill {fill:.1%}")
    print(f"eval: {len(eval_blocks):,} blocks of the held-out 10 % (sequential, the same for both)")
    seconds = {p: 0.0 for p in PACKINGS}
    seen = {p: 0 for p in PACKINGS}
    history = {p: [(0, 0.0, 0, evaluate(models[p], eval_batches))] for p in PACKINGS}  # (step, s, tokens, loss)
    for step in range(1, args.steps + 1):
        for p in PACKINGS:
            idx = rngs[p].choice(len(runs[p]), args.batch, replace=False)
            batch = collator([runs[p][i] for i in idx], idx.tolist(), step)
            t = time.perf_counter()
            loss, n = models[p](**batch)
            (loss / n.clamp(min=1)).backward()
            torch.nn.utils.clip_grad_norm_(models[p].parameters(), 1.0)
            optims[p].step()
            scheds[p].step()
            optims[p].zero_grad(set_to_none=True)
            seconds[p] += time.perf_counter() - t
            seen[p] += int(batch["attention_mask"].sum())
            if step % args.eval_every == 0 or step == args.steps:
                history[p].append((step, seconds[p], seen[p], evaluate(models[p], eval_batches)))
                print(f"  {p:10s} step {step}: eval loss {history[p][-1][3]:.4f} after {seconds[p]:.1f} s",
                      flush=True)
    print("\neval loss at equal steps (step: best fit | sequential; tokens seen)")
    for (step, _, tb, lb), (_, _, ts, ls) in zip(history["best_fit"], history["sequential"]):
        print(f"  {step:5d}: {lb:.4f} | {ls:.4f}   ({tb:,} | {ts:,} tokens)")
    budget = min(seconds.values())
    at = {p: float(np.interp(budget, [h[1] for h in history[p]], [h[3] for h in history[p]])) for p in PACKINGS}
    print(f"eval loss at equal wall time ({budget:.1f} s of training, the shorter run's; the longer run's loss "
          f"interpolated between its evaluations): best fit {at['best_fit']:.4f} | sequential {at['sequential']:.4f}")
    print(f"training seconds: best fit {seconds['best_fit']:.1f}, sequential {seconds['sequential']:.1f}; "
          f"final eval loss best fit - sequential: {history['best_fit'][-1][3] - history['sequential'][-1][3]:+.4f}")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
