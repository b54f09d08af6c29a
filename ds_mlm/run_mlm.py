"""Pretrain a RoBERTa masked language model with DeepSpeed: the story of one run.

    deepspeed ds_mlm/run_mlm.py --tokenizer_name_or_path T --train_dir D --eval_dir E --output_dir O ...
    torchrun --nproc_per_node 2 ds_mlm/run_mlm.py ...      python -m ds_mlm.run_mlm ...   (a world of one)

Flags are those of thai2transformers' / HuggingFace's run_mlm.py (`--help` lists them). The run: parse, join the
process group, load the tokenizer, build or open the token stores (one builder per job), create the model, wrap it
in a DeepSpeed engine, train (resuming from the newest complete checkpoint), export, evaluate.
"""

import os
import sys

if __package__ in (None, ""):  # run as a file (deepspeed ds_mlm/run_mlm.py): import the package, not its siblings
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import logging  # noqa: E402

from ds_mlm import distributed, preflight  # noqa: E402
from ds_mlm.args import parse_args  # noqa: E402
from ds_mlm.ds_config import resolve_ds_config  # noqa: E402
from ds_mlm.errors import cli  # noqa: E402
from ds_mlm.model import build_model, count_parameters, resolve_config  # noqa: E402
from ds_mlm.prepare import prepare_datasets  # noqa: E402
from ds_mlm.tokenization import load_tokenizer  # noqa: E402

log = logging.getLogger("ds_mlm")


def setup_logging(rank: int) -> None:
    # Rank 0 tells the story; the other ranks speak only of trouble.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s [ds_mlm] %(message)s", datefmt="%H:%M:%S", force=True)


def main(argv=None) -> int:
    model_args, data_args, train_args = parse_args(argv)

    # A build-only run in a world of one never pays for DeepSpeed; every other run joins the process group first.
    single = distributed.env_info().world_size == 1  # mpirun/srun name their world with their own variables
    dist = distributed.env_info() if (data_args.build_dataset_only and single) else distributed.init()
    setup_logging(dist.rank)

    # Everything that can be checked is checked before anything is written: a bad flag never touches a cache or a
    # checkpoint of an earlier run.
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path, model_args.tokenizer_type,
                               add_space_token=model_args.add_space_token, use_fast=model_args.use_fast_tokenizer)
    config = resolve_config(model_args, tokenizer, data_args.max_seq_length)
    cache_dir = data_args.datasets_cache_dir or os.path.join(train_args.output_dir, "datasets_cache")
    if not data_args.build_dataset_only:
        ds_config = resolve_ds_config(train_args, world_size=dist.world_size)
        if dist.local_rank == 0:
            preflight.writable_dir(train_args.output_dir, "--output_dir")
            mixed = ds_config["bf16"]["enabled"] or ds_config["fp16"]["enabled"]
            preflight.free_space(train_args.output_dir, preflight.checkpoint_bytes(count_parameters(config), mixed),
                                 "--output_dir", "one checkpoint and the final model")

    train_ds, eval_ds = prepare_datasets(data_args, tokenizer, dist, cache_dir)
    if data_args.build_dataset_only:
        log.info("--build_dataset_only: token stores are ready in %s", cache_dir)
        return 0

    from transformers import set_seed  # noqa: E402 (heavy imports only on the training path)

    from ds_mlm.export import export_model
    from ds_mlm.trainer import Trainer

    set_seed(train_args.seed)  # same initial weights on every rank and every run with this seed
    model = build_model(model_args, tokenizer, data_args.max_seq_length)
    trainer = Trainer(model=model, tokenizer=tokenizer, train_dataset=train_ds, eval_dataset=eval_ds,
                      args=train_args, data_args=data_args, ds_config=ds_config, dist=dist)
    trainer.train()
    export_model(trainer.engine, tokenizer, train_args.output_dir)
    if eval_ds is not None:
        metrics = trainer.final_evaluation()
        log.info("final evaluation: %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def build_dataset(argv=None) -> int:
    """`ds-mlm-build-dataset ...`: the same flags, builds the token stores and stops."""
    return main([*(sys.argv[1:] if argv is None else argv), "--build_dataset_only"])


cli_main = cli(main)
build_dataset_main = cli(build_dataset)

if __name__ == "__main__":
    cli_main()
