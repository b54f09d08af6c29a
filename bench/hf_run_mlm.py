"""HuggingFace's run_mlm.py pipeline, reproduced for bench/startup.py (a benchmark's other side, not ds-mlm code).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python bench/hf_run_mlm.py --config_name CONFIG.json \
        --tokenizer_name TOKENIZER_DIR --train_file corpus.txt --cache_dir CACHE --max_seq_length 128 \
        --output_dir OUT --do_train --per_device_train_batch_size 16 --max_steps 30 --learning_rate 5e-4 \
        --warmup_steps 1 --logging_steps 1 --save_steps 30 [--bf16] --step_log OUT/steps.jsonl

transformers' examples/pytorch/language-modeling/run_mlm.py is in neither the transformers wheel nor its PyPI sdist,
so this file does what that script does on a training job from a text file and a config, in its order, with the
transformers 5 / datasets 5 names (written for this bench, not copied):
  HfArgumentParser over (model, data, TrainingArguments) dataclasses; set_seed; `load_dataset("text")` three times
  (the whole file, then train[:5%] as the validation split and train[5%:] as the train split, as the script does
  when no validation file is given); AutoConfig / AutoTokenizer from local paths; AutoModelForMaskedLM.from_config;
  tokenization by `.map(batched=True)` of every text with special-tokens masks (its default path, not
  --line_by_line); group_texts: each map batch of 1,000 lines concatenated and cut into blocks of max_seq_length
  (sentences cut, 100 % of the positions tokens, the remainder dropped); DataCollatorForLanguageModeling(0.15);
  Trainer.train; save_model, the train metrics and state; the model card. Evaluation is off (no --do_eval), as in
  the ds-mlm run it is compared with. Without --do_train it stops after preprocessing: the bench warms the datasets
  cache that way, as ds-mlm's --build_dataset_only warms its own.
What the bench adds, and the script has not: --step_log, a callback writing {"step", "time", "tokens"} (Unix time at
each optimizer step's end; non-padding input tokens seen so far, counted by the Trainer's own
include_num_input_tokens_seen="non_padding", set with --step_log) as one JSON line a step.
"""

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import datasets
import transformers
from datasets import load_dataset
from transformers import (AutoConfig, AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling,
                          HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed)
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    config_name: str = field(metadata={"help": "Config name, directory or JSON file of the model (from scratch)."})
    tokenizer_name: str = field(metadata={"help": "Tokenizer name or directory."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where datasets and hub files are cached."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "The training text file (one text a line)."})
    validation_split_percentage: int = field(default=5, metadata={"help": "Share of train_file held out."})
    max_seq_length: Optional[int] = field(default=None, metadata={"help": "Block length after grouping."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes of .map."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenized datasets."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of the tokens masked."})


@dataclass
class BenchArguments:
    step_log: Optional[str] = field(default=None, metadata={"help": "JSON lines of each step's end (the bench's)."})


class StepLog(TrainerCallback):
    """One JSON line a step: its end time and the non-padding input tokens seen so far."""

    def __init__(self, path: str):
        self.file = open(path, "w")

    def on_step_end(self, args, state, control, **kwargs):
        self.file.write(json.dumps({"step": state.global_step, "time": time.time(),
                                    "tokens": state.num_input_tokens_seen}) + "\n")
        self.file.flush()


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, BenchArguments))
    model_args, data_args, training_args, bench_args = parser.parse_args_into_dataclasses()
    if bench_args.step_log:  # set here: HfArgumentParser reads this str-or-bool field as a bool only
        training_args.include_num_input_tokens_seen = "non_padding"

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(f"Process rank: {training_args.local_rank}, device: {training_args.device}, "
                   f"n_gpu: {training_args.n_gpu}, bf16: {training_args.bf16}")
    logger.info(f"Training/evaluation parameters {training_args}")

    last_checkpoint = None  # the script resumes from a checkpoint in output_dir, refuses a non-empty one otherwise
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is None and os.listdir(training_args.output_dir):
            raise ValueError(f"Output directory ({training_args.output_dir}) already exists and is not empty.")
    set_seed(training_args.seed)

    files, pct = {"train": data_args.train_file}, data_args.validation_split_percentage
    raw_datasets = load_dataset("text", data_files=files, cache_dir=model_args.cache_dir)
    raw_datasets["validation"] = load_dataset("text", data_files=files, split=f"train[:{pct}%]",
                                              cache_dir=model_args.cache_dir)
    raw_datasets["train"] = load_dataset("text", data_files=files, split=f"train[{pct}%:]",
                                         cache_dir=model_args.cache_dir)

    config = AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, cache_dir=model_args.cache_dir)
    logger.info("Training new model from scratch")
    model = AutoModelForMaskedLM.from_config(config)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # resized only when the tokenizer is larger
        model.resize_token_embeddings(len(tokenizer))

    column_names = raw_datasets["train"].column_names
    text_column_name = "text" if "text" in column_names else column_names[0]
    max_seq_length = min(data_args.max_seq_length or 1024, tokenizer.model_max_length)

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name], return_special_tokens_mask=True)

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized_datasets = raw_datasets.map(tokenize_function, batched=True,
                                              num_proc=data_args.preprocessing_num_workers,
                                              remove_columns=column_names,
                                              load_from_cache_file=not data_args.overwrite_cache,
                                              desc="Running tokenizer on every text in dataset")

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[next(iter(examples.keys()))])
        total_length = (total_length // max_seq_length) * max_seq_length  # the remainder of each batch is dropped
        return {k: [t[i:i + max_seq_length] for i in range(0, total_length, max_seq_length)]
                for k, t in concatenated.items()}

    with training_args.main_process_first(desc="grouping texts together"):
        tokenized_datasets = tokenized_datasets.map(group_texts, batched=True,
                                                    num_proc=data_args.preprocessing_num_workers,
                                                    load_from_cache_file=not data_args.overwrite_cache,
                                                    desc=f"Grouping texts in chunks of {max_seq_length}")
    if not training_args.do_train:
        return  # preprocessing only (the bench's warm-up of the datasets cache)
    train_dataset = tokenized_datasets["train"]

    data_collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=data_args.mlm_probability)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer,
                      data_collator=data_collator,
                      callbacks=[StepLog(bench_args.step_log)] if bench_args.step_log else None)

    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    trainer.save_model()  # the tokenizer too
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    trainer.create_model_card(tasks="fill-mask")


if __name__ == "__main__":
    main()
