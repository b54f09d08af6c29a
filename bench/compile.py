"""CPU benchmark of the GPU-throughput options, measured side by side in one run (not a test; prints ratios).

    .venv/bin/python bench/compile.py [--steps 20] [--repeats 2] [--threads 2] [--models tiny,4x256]

For roberta-tiny (2 x 128) and a 4 x 256 model, micro batch 8 x 128 tokens, a byte-level BPE vocabulary of an odd
size (7,993 ids: padded to 8,000 by --pad_vocab_multiple 64), the DeepSpeed engine as ds-mlm builds it (zero2.json:
bf16 where the CPU has it natively, else fp32; torch_adam), the same pre-collated batches for every variant:

    eager, vocab 7,993               --pad_vocab_multiple 1, batches as wide as their longest sample
    eager, padded                    the default: 8,000 rows
    encoder compiled, static widths  --torch_compile as the trainer does it: the encoder compiled with
                                     dynamic=False, batch widths padded to a multiple of 64
                                     (trainer.COMPILE_WIDTH_MULTIPLE); embeddings and the masked-position head eager
    engine.compile(), static widths  DeepSpeed's engine.compile(): the whole model (its head stays eager:
                                     model._masked_loss), dynamic=False, the same padded widths
    engine.compile(), dynamic        engine.compile() with torch's defaults on the batches as they come: the second
                                     width seen recompiles with symbolic shapes

tokens/s count real tokens (padding excluded) after `--warmup` steps (compilation happens there; its time is printed
separately), best of `--repeats` interleaved repeats, as ratios to eager unpadded. On a GPU the question is another
one (kernel launches, tensor-core alignment): bench/gpu.sh measures it there.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from common import load_avg  # noqa: E402 (bench/ is on sys.path: the script's own folder)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {"tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
          "4x256": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024)}
SEQ, MICRO, VOCAB = 128, 8, 7993
VARIANTS = {"eager, vocab 7,993": (1, None), "eager, padded": (64, None), "encoder compiled, static": (64, "encoder"),
            "engine.compile(), static": (64, "engine"), "engine.compile(), dynamic": (64, "dynamic")}
STATIC_WIDTHS = ("encoder", "engine")  # the variants fed batches padded as --torch_compile pads them


def tokenizer_and_batches(workdir: Path, n: int):
    from conftest import build_bpe_tokenizer
    from transformers import AutoTokenizer

    from ds_mlm.args import DataArguments
    from ds_mlm.collator import MLMCollator
    from ds_mlm.distributed import env_info
    from ds_mlm.data.prepare import prepare_datasets

    tok_dir = workdir / "tokenizer"
    if not (tok_dir / "vocab.json").exists():
        build_bpe_tokenizer(tok_dir, vocab_size=VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    data_args = DataArguments(train_dir=str(REPO / "data" / "sample" / "train"), max_seq_length=SEQ)
    train_ds, _ = prepare_datasets(data_args, tokenizer, env_info(), str(workdir / "cache"))
    from ds_mlm.trainer import COMPILE_WIDTH_MULTIPLE

    batches = {}
    for multiple in (None, COMPILE_WIDTH_MULTIPLE):  # as wide as the longest sample / padded as --torch_compile does
        collator = MLMCollator.from_tokenizer(tokenizer, mlm_probability=0.15, seed=0, pad_to_multiple_of=multiple)
        batches[multiple is not None] = [collator(train_ds.__getitems__(ix), ix, 0) for ix in (
            [(b * MICRO + i) % len(train_ds) for i in range(MICRO)] for b in range(n))]
    widths = sorted({b["input_ids"].shape[1] for b in batches[False]})
    print(f"train samples: {len(train_ds):,}; batch widths {widths}, padded to "
          f"{sorted({b['input_ids'].shape[1] for b in batches[True]})} under --torch_compile")
    return tokenizer, batches


def run(tokenizer, batches, shape: dict, pad: int, compile_what, warmup: int):
    """(tokens/s after the warm-up, seconds of the warm-up steps) for one variant."""
    import deepspeed
    import torch
    from transformers import RobertaConfig

    from ds_mlm.args import parse_args
    from ds_mlm.ds_config import deepspeed_config
    from ds_mlm.model import RobertaForMLMPretraining, pad_vocab
    from ds_mlm.optim import param_groups
    from ds_mlm.precision import this_device

    torch._dynamo.reset()  # a fresh model per variant: no guards or cache entries of the previous one
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=SEQ + 2, type_vocab_size=1,
                           layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2, **shape)
    model = RobertaForMLMPretraining(config)
    pad_vocab(model, pad)
    args = parse_args(["--train_dir", "/nonexistent", "--output_dir", tempfile.gettempdir(), "--learning_rate",
                       "1e-4", "--per_device_train_batch_size", str(MICRO)])[2]
    ds = deepspeed_config(args, 1, this_device(), max_steps=1000)[0]  # as run_mlm's plan makes it
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=ds)
    if compile_what == "encoder":  # trainer.py's --torch_compile
        engine.module.roberta.encoder.compile(dynamic=False)
    elif compile_what == "engine":
        engine.compile(compile_kwargs={"dynamic": False})
    elif compile_what == "dynamic":
        engine.compile()
    engine.train()
    started = time.perf_counter()
    for i, batch in enumerate(batches):
        if i == warmup:
            warm, started = time.perf_counter() - started, time.perf_counter()
        loss_sum, count = engine(**batch)
        engine.backward(loss_sum / count.clamp(min=1))
        engine.step()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[warmup:]) / (time.perf_counter() - started)
    engine.destroy()
    return tokens, warm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first (compilation happens there)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="tiny,4x256", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--workdir", default=None, help="reuse a work directory (tokenizer, token store)")
    args = parser.parse_args()

    import torch

    from ds_mlm import distributed
    from ds_mlm.precision import this_device

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ds-mlm-bench-compile-"))
    print(f"load average before: {load_avg()} (2 cores shared; numbers are only comparable within this run)")
    distributed.init()
    tokenizer, batches = tokenizer_and_batches(workdir, args.warmup + args.steps)
    precision = "bf16" if this_device().bf16_native else "fp32 (no native bf16 on this CPU)"
    print(f"vocabulary {len(tokenizer):,} ids, micro batch {MICRO} x {SEQ}, zero2.json in {precision}, "
          f"threads {torch.get_num_threads()}, {args.warmup} warm-up + {args.steps} timed steps, torch "
          f"{torch.__version__}")
    for name in args.models.split(","):
        results = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for variant, (pad, what) in VARIANTS.items():  # interleaved: machine noise hits all alike
                chosen = batches[what in STATIC_WIDTHS]
                results[variant].append(run(tokenizer, chosen, MODELS[name], pad, what, args.warmup))
        base = max(t for t, _ in results["eager, vocab 7,993"])
        shape = MODELS[name]
        print(f"\n{name} ({shape['num_hidden_layers']} layers x {shape['hidden_size']}), best of {args.repeats}:")
        for variant, runs in results.items():
            best = max(t for t, _ in runs)
            print(f"   {variant:26s} {best:9,.0f} tokens/s  ({', '.join(f'{t:,.0f}' for t, _ in runs)})  "
                  f"ratio {best / base:.3f}x   warm-up {min(w for _, w in runs):5.1f} s")
    print(f"\nload average after: {load_avg()}")


if __name__ == "__main__":
    main()
