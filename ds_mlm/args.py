"""Command-line arguments: three dataclasses grouped by concern, parsed from every flag of the ancestor's command.

The flags are those of thai2transformers' / HuggingFace's `run_mlm.py`, so an old command runs unchanged behind
`deepspeed` or `torchrun`. Each field's `help` is its `--help` line. Each dataclass validates itself in
`__post_init__` and raises `UserError` with the fix. `parse_args` also records which flags were given on the command
line (`TrainingArguments.explicit_flags`): a given flag overrides the ds_config JSON, a default does not.
"""

import argparse
import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import List, Optional

from ds_mlm.errors import UserError

DISTRIBUTED_TIMEOUT_MINUTES = 10.0  # Megatron's --distributed-timeout-minutes default: a peer silent this long is lost

ARCHITECTURES = ("roberta-tiny", "roberta-base", "roberta-large")
DATASET_TYPES = ("MemmapConcatFullSentenceTextDataset", "MemmapLineByLineTextDataset")
LONG_SENTENCE_POLICIES = ("split", "skip", "truncate")
VERIFY_POLICIES = ("once", "always", "never")
PACKINGS = ("best_fit", "sequential")  # data/packing.py's, not imported: --help stays light
EVAL_STRATEGIES = ("no", "steps", "epoch")
LR_SCHEDULES = ("linear", "cosine", "constant_with_warmup")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


def arg(default, help: str, **kw):
    """A dataclass field whose `help` becomes its `--help` line."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArguments:
    tokenizer_name_or_path: Optional[str] = arg(None, "Directory of the tokenizer (an HF tokenizer dir, or one written by ds-mlm-train-tokenizer).")
    tokenizer_type: str = arg("auto", "Tokenizer class: auto, spm/ThaiRobertaTokenizer, newmm/ThaiWordsNewmmTokenizer, syllable/ThaiWordsSyllableTokenizer, sefr_cut/FakeSefrCutTokenizer.")
    use_fast_tokenizer: bool = arg(True, "Prefer a fast (Rust) tokenizer when the directory has one.")
    add_space_token: bool = arg(False, "Map spaces to the space token <_> so decoding restores them (ancestor flag).")
    architecture: str = arg("roberta-base", f"Model size preset: {', '.join(ARCHITECTURES)}.")
    config_name: Optional[str] = arg(None, "A RobertaConfig JSON file to use instead of --architecture.")
    model_name_or_path: Optional[str] = arg(None, "Warm start: an HF RoBERTa directory (e.g. an earlier export) to continue pretraining from.")
    model_dir: Optional[str] = arg(None, "Warm start, ancestor style: a directory holding pytorch_model.bin or model.safetensors.")
    pad_vocab_multiple: int = arg(64, "Pad the embedding and LM-head rows to a multiple of this while training (tensor-core shapes); exports keep exactly len(tokenizer) rows. 1 or 0: no padding.")
    attn_implementation: str = arg("sdpa", f"Attention kernel: {', '.join(ATTENTION)} (flash_attention_2 needs the flash_attn package and a CUDA GPU).")

    def __post_init__(self):
        if isinstance(self.pad_vocab_multiple, bool) or self.pad_vocab_multiple < 0:
            raise UserError(f"--pad_vocab_multiple {self.pad_vocab_multiple} must be 0 or more (64 suits tensor cores; 1 or 0: no padding)")
        if self.attn_implementation not in ATTENTION:
            raise UserError(f"unknown --attn_implementation {self.attn_implementation!r}: use one of {', '.join(ATTENTION)}")
        if self.config_name is None and self.architecture not in ARCHITECTURES:
            raise UserError(f"unknown --architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}, "
                            "or give a RobertaConfig JSON with --config_name")
        if self.config_name is not None and not os.path.isfile(self.config_name):
            raise UserError(f"--config_name {self.config_name}: no such file; give a RobertaConfig JSON file")
        if self.model_name_or_path and self.model_dir:
            raise UserError("--model_name_or_path and --model_dir both given: warm start from one of them")


def _as_list(value) -> Optional[list]:
    """A list-valued flag given one value in code (DataArguments(train_dir="D")) is a list of one."""
    return [value] if isinstance(value, (str, os.PathLike, int, float)) else (None if value is None else list(value))


@dataclass
class DataArguments:
    train_dir: Optional[List[str]] = arg(None, "Directories of training data, one or more (sources mixed by --train_weights); every file with an --ext extension in each is used (sorted).")
    eval_dir: Optional[List[str]] = arg(None, "Directories of evaluation data, one or more: eval_loss and perplexity are reported per directory and overall.")
    ext: List[str] = arg(("txt",), "Extensions of the input files, one or more, with or without the dot: txt, jsonl, json, parquet, and txt/jsonl/json + .gz or .zst (e.g. --ext jsonl.gz parquet).")
    text_field: str = arg("text", "The field of JSONL records and the column of Parquet files that holds the text.")
    train_weights: Optional[List[float]] = arg(None, "One weight per --train_dir source: the share of training samples drawn from it (need not sum to 1). Default: shares follow the sources' sizes.")
    data_seed: int = arg(42, "Seed of the mixture's choice of samples when --train_weights sub- or oversamples a source.")
    max_seq_length: int = arg(512, "Tokens per training sample, <s> and </s> included (the block size).")
    mlm_probability: float = arg(0.15, "Share of tokens to mask.")
    datasets_cache_dir: Optional[str] = arg(None, "Where the tokenized datasets live (train/ and validation/, one shard per input file). Default: {output_dir}/datasets_cache.")
    datasets_type: str = arg("MemmapConcatFullSentenceTextDataset", f"How lines become samples: {' or '.join(DATASET_TYPES)}.")
    whole_word_mask: bool = arg(False, "Mask whole words (a word-start token and the pieces after it) instead of single tokens.")
    long_sentence: str = arg("split", "A line longer than one block: split (keep every token), skip (the ancestor: close the open block, drop the line), or truncate.")
    packing: str = arg("best_fit", "How whole sentences fill the blocks of MemmapConcatFullSentenceTextDataset: best_fit (each block filled by best fit within a window of consecutive sentences, kept in corpus order; fuller blocks) or sequential (the ancestor's greedy packer).")
    overwrite_cache: bool = arg(False, "Rebuild the token datasets even if they match the inputs.")
    verify_data: str = arg("once", f"Check the token data against their checksums: {', '.join(VERIFY_POLICIES)} (once: the first time each node opens a shard).")
    tokenize_chunksize: int = arg(2500, "Lines per tokenization chunk (memory use of the build scales with this).")
    preprocessing_num_workers: Optional[int] = arg(None, "Worker processes for tokenization, per building process (default: the node's cores shared among its processes).")
    cache_scope: str = arg("auto", "Is --datasets_cache_dir shared by all nodes (shared: the whole job builds one cache) or not (local: each node builds its own); auto detects.")
    build_dataset_only: bool = arg(False, "Build the train and eval datasets, print the report, and exit.")

    def __post_init__(self):
        self.train_dir, self.eval_dir = _as_list(self.train_dir), _as_list(self.eval_dir) or None
        self.train_weights = _as_list(self.train_weights)
        self.ext = [e.lstrip(".") for e in _as_list(self.ext)]  # the ancestor's default ".txt" made "*..txt"
        if not self.ext or not all(self.ext):
            raise UserError("--ext is empty: give the input files' extension, e.g. --ext txt")
        if self.max_seq_length < 3:
            raise UserError(f"--max_seq_length {self.max_seq_length} cannot hold <s>, one token and </s>: use at least 3 (typically 128 or 512)")
        if self.datasets_type not in DATASET_TYPES:
            raise UserError(f"unknown --datasets_type {self.datasets_type!r}: use {' or '.join(DATASET_TYPES)}")
        if self.long_sentence not in LONG_SENTENCE_POLICIES:
            raise UserError(f"unknown --long_sentence {self.long_sentence!r}: use one of {', '.join(LONG_SENTENCE_POLICIES)}")
        if self.packing not in PACKINGS:
            raise UserError(f"unknown --packing {self.packing!r}: use one of {', '.join(PACKINGS)}")
        if self.verify_data not in VERIFY_POLICIES:
            raise UserError(f"unknown --verify_data {self.verify_data!r}: use one of {', '.join(VERIFY_POLICIES)}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise UserError(f"--mlm_probability {self.mlm_probability} must be between 0 and 1 (0.15 is usual)")
        if self.tokenize_chunksize < 1:
            raise UserError("--tokenize_chunksize must be at least 1")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise UserError("--preprocessing_num_workers must be at least 1")
        if self.cache_scope not in ("auto", "shared", "local"):
            raise UserError(f"unknown --cache_scope {self.cache_scope!r}: use auto, shared or local")
        if not self.train_dir:
            raise UserError("--train_dir is required: the directory (or directories) of training text files")
        if len(set(self.train_dir)) < len(self.train_dir) or (self.eval_dir and len(set(self.eval_dir)) < len(self.eval_dir)):
            raise UserError("a directory is given twice to --train_dir or --eval_dir: give each source once (use --train_weights to upweight it)")
        if self.train_weights is not None and len(self.train_weights) != len(self.train_dir):
            raise UserError(f"--train_weights has {len(self.train_weights)} value(s) for {len(self.train_dir)} --train_dir source(s): give one weight per source, in the same order")
        if self.train_weights is not None and not all(math.isfinite(w) and w > 0 for w in self.train_weights):
            raise UserError(f"--train_weights {' '.join(map(str, self.train_weights))}: every weight must be a positive number")
        if not self.text_field:
            raise UserError("--text_field is empty: give the field of your JSONL/Parquet records that holds the text")


@dataclass
class TrainingArguments:
    output_dir: Optional[str] = arg(None, "Where checkpoints, logs, the resolved ds_config and the final model go.")
    deepspeed_config: Optional[str] = arg(None, "DeepSpeed config JSON (default: ds_configs/zero2.json, bf16 on CPU). Flags given on the command line override it.")
    local_rank: int = arg(-1, "Set by the launcher; ranks are read from the environment.")
    learning_rate: float = arg(5e-5, "Peak learning rate of AdamW.")
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and LayerNorm weights).")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm (0 disables).")
    max_steps: int = arg(-1, "Optimizer steps to train for; overrides --num_train_epochs when > 0.")
    num_train_epochs: float = arg(3.0, "Epochs to train for when --max_steps is not given.")
    per_device_train_batch_size: int = arg(8, "Micro-batch size per process.")
    per_device_eval_batch_size: int = arg(8, "Evaluation batch size per process.")
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    warmup_steps: int = arg(0, "Linear warm-up steps of the learning rate.")
    lr_scheduler_type: str = arg("linear", f"Schedule after warm-up: {', '.join(LR_SCHEDULES)}.")
    seed: int = arg(42, "Seed of the model init, the sample order and the masking.")
    fp16: bool = arg(False, "Mixed precision fp16 (dynamic loss scale). Where the device cannot do fp16 (most CPUs) bf16 is used, with a warning.")
    bf16: bool = arg(False, "Mixed precision bf16.")
    save_steps: int = arg(500, "Save a checkpoint every N optimizer steps.")
    save_total_limit: Optional[int] = arg(None, "Keep at most N checkpoints (the newest complete one is never deleted).")
    resume_from_checkpoint: Optional[str] = arg(None, "Checkpoint directory to resume from (default: the newest complete one in --output_dir).")
    save_on_signal: bool = arg(True, "On SIGTERM, SIGINT or SIGUSR1 finish the step, save a checkpoint and exit with status 75 (false: exit at once).")
    logging_steps: int = arg(500, "Log loss, learning rate, grad norm and throughput every N optimizer steps.")
    logging_dir: Optional[str] = arg(None, "TensorBoard directory (default: {output_dir}/runs).")
    evaluation_strategy: str = arg("no", f"When to evaluate: {', '.join(EVAL_STRATEGIES)}.")
    eval_steps: Optional[int] = arg(None, "Evaluate every N optimizer steps (default: --logging_steps).")
    prediction_loss_only: bool = arg(False, "Evaluation reports the loss only (always true here; accepted for compatibility).")
    do_train: bool = arg(True, "Accepted for compatibility with HF commands; training always runs.")
    do_eval: bool = arg(False, "Accepted for compatibility with HF commands; evaluation follows --evaluation_strategy.")
    overwrite_output_dir: bool = arg(False, "Start afresh even if --output_dir holds checkpoints (default: resume from them).")
    dataloader_num_workers: int = arg(0, "Accepted for compatibility; samples are read zero-copy in the training process.")
    explicit_flags: frozenset = field(default=frozenset(), metadata={"help": None})  # set by parse_args, not a flag
    torch_compile: bool = arg(False, "Compile the encoder with torch.compile (inductor, GPU or CPU; batch widths padded to a multiple of 64 for fixed shapes); checkpoints, resume and exports are unchanged. The first steps are slow while it compiles.")
    distributed_timeout_minutes: float = arg(DISTRIBUTED_TIMEOUT_MINUTES, "A collective or a wait on another process that gets no answer for this long ends the job with one line naming the peer that stopped answering (a hung host, a cut link); like Megatron's --distributed-timeout-minutes. Work done by one rank (hashing, checksums, an export) is waited for without this bound while that rank answers.")
    peak_tflops: Optional[float] = arg(None, "Peak dense TFLOP/s of one device, for the logged mfu (default: a table of GPUs' bf16/fp16 datasheet peaks; on CPU mfu is logged only with this flag).")

    def __post_init__(self):
        if not self.output_dir:
            raise UserError("--output_dir is required: where checkpoints and the final model go")
        if self.fp16 and self.bf16:
            raise UserError("--fp16 and --bf16 both given: choose one precision")
        if self.evaluation_strategy not in EVAL_STRATEGIES:
            raise UserError(f"unknown --evaluation_strategy {self.evaluation_strategy!r}: use one of {', '.join(EVAL_STRATEGIES)}")
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise UserError(f"unknown --lr_scheduler_type {self.lr_scheduler_type!r}: use one of {', '.join(LR_SCHEDULES)}")
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps  # as HF does
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "save_steps", "logging_steps", "eval_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)} must be at least 1")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise UserError(f"--save_total_limit {self.save_total_limit} would keep no checkpoint: use at least 1, or omit it to keep all")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise UserError("nothing to train: give --max_steps N (or --num_train_epochs > 0)")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate {self.learning_rate} must be positive")
        if self.warmup_steps < 0:
            raise UserError("--warmup_steps must be 0 or more")
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "runs")
        if not self.distributed_timeout_minutes > 0:  # `not >` also refuses nan
            raise UserError(f"--distributed_timeout_minutes {self.distributed_timeout_minutes} must be a positive "
                            f"number of minutes (default {DISTRIBUTED_TIMEOUT_MINUTES:g}; e.g. 0.5 to notice a lost peer within 30 s)")
        if self.peak_tflops is not None and not self.peak_tflops > 0:  # `not >` also refuses nan
            raise UserError(f"--peak_tflops {self.peak_tflops} must be a positive number of TFLOP/s (e.g. 989.5 for an H100 SXM in bf16)")


GROUPS = (ModelArguments, DataArguments, TrainingArguments)
ALIASES = {  # other spellings seen in users' commands
    "local_rank": ["--local-rank"],  # torch.distributed.launch passes --local-rank=N
    "evaluation_strategy": ["--eval_strategy"],  # the name in transformers >= 4.41
    "deepspeed_config": ["--deepspeed"],  # the HF Trainer's name
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _base_type(tp):
    """int for Optional[int], and so on."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse would print the whole usage (dozens of flags) first: one line says what is wrong, and where to look
        raise UserError(f"{message} (run with --help for every flag)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="run_mlm.py", description="Pretrain a RoBERTa masked language model with DeepSpeed.",
        allow_abbrev=False)  # abbreviations would make a typo silently mean another flag
    for group_cls in GROUPS:
        group = parser.add_argument_group(group_cls.__name__)
        hints = typing.get_type_hints(group_cls)
        for f in dataclasses.fields(group_cls):
            if f.metadata.get("help") is None:
                continue
            names = [f"--{f.name}", *ALIASES.get(f.name, [])]
            tp = _base_type(hints[f.name])
            if tp is bool:  # `--fp16` alone means true; `--fp16 false` also parses, as in HF
                group.add_argument(*names, dest=f.name, type=_bool, nargs="?", const=True,
                                   default=argparse.SUPPRESS, help=f.metadata["help"])
            elif typing.get_origin(tp) is list:  # `--train_dir A B`; the ancestor's `--train_dir A` is a list of one
                group.add_argument(*names, dest=f.name, type=typing.get_args(tp)[0], nargs="+",
                                   default=argparse.SUPPRESS, metavar=f.name.upper(), help=f.metadata["help"])
            else:
                group.add_argument(*names, dest=f.name, type=tp, default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), help=f.metadata["help"])
    return parser


def parse_args(argv=None):
    """Parse argv into (ModelArguments, DataArguments, TrainingArguments); errors are one line and exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = vars(build_parser().parse_args(argv))  # only the flags on the command line (defaults are SUPPRESSed)
    out = []
    for group_cls in GROUPS:
        names = {f.name for f in dataclasses.fields(group_cls)}
        kwargs = {k: v for k, v in given.items() if k in names}
        if group_cls is TrainingArguments:
            kwargs["explicit_flags"] = frozenset(given)
        out.append(group_cls(**kwargs))
    return tuple(out)
