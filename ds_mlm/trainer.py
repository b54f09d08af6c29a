"""The training loop around a DeepSpeed engine: batches, steps, logging, evaluation, checkpoints, exact resume.

    trainer = Trainer(model=..., tokenizer=..., train_dataset=..., eval_dataset=..., args=..., data_args=...,
                      ds_config=resolve_ds_config(args, world_size), dist=dist)
    trainer.train()        # resumes from the newest complete checkpoint unless --overwrite_output_dir
    trainer.evaluate()     # {"eval_loss", "perplexity"} over the whole eval set, all ranks

One optimizer step = `gradient_accumulation_steps` micro-batches per rank; `engine.step()` is called after every
micro-batch and DeepSpeed applies the update at the boundary. The loss is the cross-entropy of the masked tokens,
computed in fp32 from the logits (the model's own loss would be computed in bf16/fp16 under mixed precision).
Resume is exact (same loss sequence as an uninterrupted run, same world size): the engine state, the sampler
position, every rank's RNG states and the partial logging window are restored.
"""

import json
import logging
import math
import os
import sys

import deepspeed
import numpy as np
import torch
from tqdm.auto import tqdm

from ds_mlm import checkpoint, distributed
from ds_mlm.collator import MLMCollator
from ds_mlm.ds_config import finalize_scheduler, param_groups, precision, write_resolved_config
from ds_mlm.metrics import MetricsWriter, Window, all_reduce_sum, format_record, perplexity
from ds_mlm.sampler import ResumableDistributedSampler

log = logging.getLogger(__name__)

EVAL_SEED = 1234  # one masking of the eval set for every evaluation of every run: numbers stay comparable


def masked_lm_loss(engine, batch: dict):
    """(sum of the masked tokens' cross-entropy in fp32, number of masked tokens): model.RobertaForMLMPretraining."""
    return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


def _float_or_none(value):
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


class Trainer:
    def __init__(self, model, tokenizer, train_dataset, eval_dataset, args, data_args, ds_config: dict, dist):
        self.args, self.data_args, self.dist = args, data_args, dist
        if eval_dataset is not None and len(eval_dataset) == 0:
            log.warning("the evaluation set is empty: no evaluation (put text files in --eval_dir)")
            eval_dataset = None
        self.tokenizer, self.train_dataset, self.eval_dataset = tokenizer, train_dataset, eval_dataset
        # [data] samples drawn per training source (ds_mlm.data.Mixture), this rank's; logged summed over ranks
        self.source_names = getattr(train_dataset, "source_names", None)
        self.samples_by_source = np.zeros(len(self.source_names), dtype=np.int64) if self.source_names else None
        self.ds_config = ds_config
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.grad_acc = ds_config["gradient_accumulation_steps"]
        self.global_batch = ds_config["train_batch_size"]
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        self.sampler = ResumableDistributedSampler(len(train_dataset), self.micro, dist.rank, dist.world_size,
                                                   args.seed)
        masking = dict(mlm_probability=data_args.mlm_probability, whole_word_mask=data_args.whole_word_mask)
        self.collator = MLMCollator.from_tokenizer(tokenizer, seed=args.seed, **masking)
        self.eval_collator = MLMCollator.from_tokenizer(tokenizer, seed=EVAL_SEED, **masking)
        self.steps_per_epoch = max(self.sampler.micro_batches_per_epoch // self.grad_acc, 1)
        if args.max_steps > 0:
            self.max_steps = args.max_steps
        else:
            self.max_steps = max(math.ceil(args.num_train_epochs * self.sampler.micro_batches_per_epoch / self.grad_acc), 1)

        # rank 0 decides and tells the others: nodes may see a shared directory's pointer at different moments
        mine = (checkpoint.resolve_resume(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
                if dist.rank == 0 else None)
        self.resume_path = distributed.all_gather_object(mine)[0]
        if args.overwrite_output_dir and not args.resume_from_checkpoint and dist.rank == 0:
            checkpoint.clear_for_overwrite(args.output_dir)

        lr_scheduler = None
        if "scheduler" in ds_config:  # the JSON chose DeepSpeed's own schedule
            finalize_scheduler(ds_config, self.max_steps, args.deepspeed_config or "the DeepSpeed config")
            log.info("lr schedule: DeepSpeed %s from the JSON (--lr_scheduler_type ignored)",
                     ds_config["scheduler"].get("type"))
        else:
            lr_scheduler = self._hf_schedule
        if dist.rank == 0:
            written = write_resolved_config(ds_config, args.output_dir)
            log.info("DeepSpeed config (written to %s): %s", written, ds_config)
        distributed.barrier()

        weight_decay = ds_config["optimizer"]["params"].get("weight_decay", 0.0)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                               config=ds_config, lr_scheduler=lr_scheduler)
        self.global_step = 0
        self.writer = None
        self._last_eval = None  # (step, metrics) of the loop's latest evaluation

    # -- set-up helpers ------------------------------------------------------------------------------------------

    def _hf_schedule(self, optimizer):
        # HF's own schedule functions: the ancestor trained with them, and DeepSpeed's WarmupDecayLR differs
        # (its warm-up is at least 2 steps and starts at warmup_min_lr)
        from transformers import get_scheduler

        return get_scheduler(self.args.lr_scheduler_type, optimizer, num_warmup_steps=self.args.warmup_steps,
                             num_training_steps=self.max_steps)

    def _announce(self) -> None:
        seq = self.data_args.max_seq_length
        tokens_per_step = self.global_batch * seq
        log.info("global batch %d = micro %d x grad accumulation %d x %d processes (%s tokens/step at %d per sample)",
                 self.global_batch, self.micro, self.grad_acc, self.dist.world_size, f"{tokens_per_step:,}", seq)
        log.info("training %d steps (%.2f epochs of %d samples): token budget %s; ZeRO-%d, %s, lr %.3g, %s schedule, "
                 "warm-up %d", self.max_steps, self.max_steps / self.steps_per_epoch, len(self.train_dataset),
                 f"{self.max_steps * tokens_per_step:,}", self.zero_stage, precision(self.ds_config),
                 self.args.learning_rate, self.args.lr_scheduler_type, self.args.warmup_steps)
        if hasattr(self.train_dataset, "describe"):  # [data] files, tokens, weight, epochs per source
            log.info("%s", self.train_dataset.describe(self.max_steps * self.global_batch))

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _trainer_state(self) -> dict:
        return {"global_step": self.global_step, "sampler": self.sampler.state_dict(),
                "consumed_samples": self.sampler.consumed_samples, "log_position": self.writer.position(),
                "world_size": self.dist.world_size, "train_batch_size": self.global_batch, "micro_batch": self.micro,
                "gradient_accumulation_steps": self.grad_acc, "max_steps": self.max_steps, "seed": self.args.seed,
                "zero_stage": self.zero_stage, "precision": precision(self.ds_config)}

    def _write_extras(self, path: str) -> None:
        self.engine.module.config.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _save(self, window: Window) -> None:
        rank_state = {"window": window.state_dict()}
        if self.samples_by_source is not None:  # [data]
            rank_state["samples_by_source"] = self.samples_by_source.tolist()
        path = checkpoint.save(self.engine, self.args.output_dir, self.global_step, self._trainer_state(), self.dist,
                               self.args.save_total_limit, self._write_extras, rank_state=rank_state)
        log.info("saved %s", path)

    def _resume(self, window: Window):
        """Load the checkpoint chosen at start-up, if any; returns the train_log.jsonl position to cut back to."""
        if self.resume_path is None:
            return None
        path = self.resume_path
        with open(os.path.join(path, checkpoint.STATE_FILE), encoding="utf-8") as f:
            saved = json.load(f)
        checkpoint.check_compatible(saved, path, self.dist.world_size, self.zero_stage, self.global_batch,
                                    precision(self.ds_config))
        state, rank_state = checkpoint.load(self.engine, path, self.dist)
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = state["global_step"]
        if self.engine.global_steps != self.global_step:
            raise RuntimeError(f"{path}: DeepSpeed restored step {self.engine.global_steps}, trainer state says "
                               f"{self.global_step}")
        if rank_state is not None:  # a checkpoint between two logged steps: the window goes on where it was
            window.load_state_dict(rank_state["window"])
            if self.samples_by_source is not None and "samples_by_source" in rank_state:  # [data]
                self.samples_by_source[:] = rank_state["samples_by_source"]
        log.info("resumed from %s at step %d (%d samples consumed)", path, self.global_step,
                 state["consumed_samples"])
        return state["log_position"]

    # -- training ------------------------------------------------------------------------------------------------

    def _batches(self):
        """(epoch, batch on the device), forever; data are read in this process (memmap reads take microseconds)."""
        device = self.engine.device
        for epoch, indices in self.sampler:
            if self.samples_by_source is not None:  # [data]
                self.samples_by_source += np.bincount(self.train_dataset.sources_of(indices),
                                                      minlength=len(self.source_names))
            batch = self.collator(self.train_dataset.__getitems__(indices), indices, epoch)
            tokens = int(batch["attention_mask"].sum())
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}, tokens

    def _grad_norm_before_step(self):
        """ZeRO-0 without mixed precision: DeepSpeed clips but does not report the norm, so measure it."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _loss_scale(self):
        if not self.ds_config["fp16"]["enabled"]:
            return None
        opt = self.engine.optimizer
        return _float_or_none(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None))

    def _log_step(self, window: Window, lr: float, grad_norm) -> None:
        summary = window.summary()  # a collective: every rank logs the same mean
        record = {"step": self.global_step, "loss": summary["loss"], "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": summary["tokens_per_s"], "samples_per_s": summary["samples_per_s"]}
        scale = self._loss_scale()
        if scale is not None:
            record["loss_scale"] = scale
        logged = record
        if self.samples_by_source is not None:  # [data] a collective too: every rank counted its own micro-batches
            counts = all_reduce_sum(self.samples_by_source.tolist(), self.engine.device)
            logged = {**record, "samples_by_source": {n: int(c) for n, c in zip(self.source_names, counts)}}
        self.writer.write(logged)
        if self.dist.rank == 0:
            tqdm.write(format_record(record), file=sys.stdout)

    def _evaluate_and_log(self) -> None:
        metrics = self.evaluate()
        self._last_eval = (self.global_step, metrics)
        if metrics:
            record = {"step": self.global_step, **metrics}
            self.writer.write(record)
            if self.dist.rank == 0:
                tqdm.write(format_record(record), file=sys.stdout)

    def train(self) -> None:
        args, engine = self.args, self.engine
        window = Window(engine.device)
        cut_log_at = self._resume(window)
        purge_from = self.global_step + 1 if self.resume_path else None  # TensorBoard: hide the redone steps' events
        if self.resume_path is None and args.overwrite_output_dir:
            cut_log_at, purge_from = 0, 0  # a fresh run: the previous run's log and curves go
        self.writer = MetricsWriter(args.output_dir, args.logging_dir, self.dist.rank, truncate_at=cut_log_at,
                                    purge_from=purge_from)
        self._announce()
        measure_norm = self.zero_stage == 0 and precision(self.ds_config) == "fp32"
        bar = tqdm(total=self.max_steps, initial=self.global_step, disable=self.dist.rank != 0, file=sys.stderr,
                   desc="train", unit="step", dynamic_ncols=True)
        try:
            self._loop(window, bar, measure_norm)
        finally:  # also on an error: its one line must not land on the progress bar's line
            bar.close()
            self.writer.close()

    def _loop(self, window: Window, bar, measure_norm: bool) -> None:
        args, engine = self.args, self.engine
        engine.train()
        batches = self._batches()
        while self.global_step < self.max_steps:
            batch, tokens = next(batches)
            boundary = engine.is_gradient_accumulation_boundary()
            step = self.global_step + 1
            logging_step = boundary and (step % args.logging_steps == 0 or step == self.max_steps)
            lr = engine.get_lr()[0]  # the rate this step is taken with
            loss_sum, count = masked_lm_loss(engine, batch)
            loss = loss_sum / count.clamp(min=1)
            engine.backward(loss)
            norm = self._grad_norm_before_step() if (measure_norm and logging_step) else None
            engine.step()
            window.add(loss.detach(), tokens, batch["input_ids"].shape[0])
            if not boundary:
                continue
            self.global_step = engine.global_steps
            bar.update(1)
            if logging_step:
                self._log_step(window, lr, norm if measure_norm else _float_or_none(engine.get_global_grad_norm()))
            if args.evaluation_strategy == "steps" and self.global_step % args.eval_steps == 0:
                self._evaluate_and_log()
            elif args.evaluation_strategy == "epoch" and self.global_step % self.steps_per_epoch == 0:
                self._evaluate_and_log()
            if self.global_step % args.save_steps == 0 or self.global_step == self.max_steps:
                self._save(window)  # the last step is always saved: a rerun finds the training done

    # -- evaluation ----------------------------------------------------------------------------------------------

    def final_evaluation(self) -> dict:
        """The metrics at the last step: the loop's own evaluation of that step, or a new one."""
        if self._last_eval is not None and self._last_eval[0] == self.global_step:
            return self._last_eval[1]
        return self.evaluate()

    def evaluate(self) -> dict:
        """Loss over every masked token of the eval set(s), and its perplexity; with several --eval_dir sources also
        eval_loss/<source> and perplexity/<source> for each ([data])."""
        if self.eval_dataset is None:
            return {}
        sets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {None: self.eval_dataset}
        per_source, loss_sum, tokens = {}, 0.0, 0.0
        for name, dataset in sets.items():
            s, c = self._evaluate_one(dataset)
            loss_sum, tokens = loss_sum + s, tokens + c
            if len(sets) > 1:
                per_source[f"eval_loss/{name}"] = s / max(c, 1.0)
                per_source[f"perplexity/{name}"] = perplexity(per_source[f"eval_loss/{name}"])
        eval_loss = loss_sum / max(tokens, 1.0)
        return {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss), **per_source}

    @torch.no_grad()
    def _evaluate_one(self, dataset):
        """(sum of the masked tokens' loss, their number) over one eval set, sharded over ranks, fixed masking."""
        engine, world, rank = self.engine, self.dist.world_size, self.dist.rank
        n, bs = len(dataset), self.args.per_device_eval_batch_size
        mine = list(range(rank, n, world))
        num_batches = math.ceil(math.ceil(n / world) / bs)  # the same on every rank: ZeRO-3 forwards are collective
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
        engine.eval()
        for b in range(num_batches):
            indices = mine[b * bs:(b + 1) * bs]
            real = bool(indices)
            batch = self.eval_collator(dataset.__getitems__(indices or [0]), indices or [0], 0)
            s, c = masked_lm_loss(engine, {k: v.to(engine.device) for k, v in batch.items()})
            if real:
                loss_sum += s.double()
                tokens += c.double()
        engine.train()
        total_loss, total_tokens = all_reduce_sum([loss_sum.item(), tokens.item()], engine.device)
        return total_loss, total_tokens
