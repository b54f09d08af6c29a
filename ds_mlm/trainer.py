"""The training loop around a DeepSpeed engine: steps, logging, evaluation, checkpoints, stopping on a signal.

    trainer = Trainer(plan, engine, loader, eval_sets, eval_collator, dist, checkpointer, options)
    trainer.on_log.append(fn)           # fn(trainer, record) after each record the loop writes (tests, tools)
    outcome = trainer.train(stop)       # "done", or "preempted" after a signal's checkpoint
    trainer.evaluate()                  # {"eval_loss", "perplexity"[, per --eval_dir ones]}, every rank

When to save and what to resume is the checkpointer's policy (checkpointer.py): the loop asks it after every step
and when a signal stops it; `checkpointer.restore(trainer)` puts a checkpoint's state back (`load_state_dict`).

One optimizer step = the plan's accumulation of micro-batches per rank (the step's global batch: sampler.py).
The loss of a step is the cross-entropy summed over its masked tokens on every rank, divided by their number (one
all-reduce at the start of the step, which also carries the ranks' stop requests): the same gradient for any split
of the global batch into processes, micro-batches and accumulation steps, so a run resumed on another number of
processes follows the same trajectory up to reduction order (HF's loss-per-micro-batch mean would not). DeepSpeed
divides by the accumulation steps and averages over ranks, so each micro-batch's sum is scaled by W x A / N.

`Trainer.__init__` does no file I/O and no collective; the state is `state_dict()` (step, the loader's sampler
position, log position, logging window, samples by source: one dict, the same on every rank) and `load_state_dict()`.
"""

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from ds_mlm.flops import train_flops
from ds_mlm.metrics import MetricsWriter, Window, all_reduce_sum, format_record, perplexity, train_fill

log = logging.getLogger(__name__)
EVAL_SEED = 1234  # one masking of the eval set for every evaluation of every run: numbers stay comparable
COMPILE_WIDTH_MULTIPLE = 64  # --torch_compile pads batch widths to this: a few fixed shapes, no dynamic-shape code


@dataclass(frozen=True)
class LoopOptions:
    """When the loop logs and evaluates (the flags of the same names; when it saves is the checkpointer's)."""

    logging_steps: int
    """Log every N steps (and the last step)."""
    eval_every: Optional[int]
    """Evaluate every N steps (--evaluation_strategy steps/epoch), or never (None)."""
    eval_batch_size: int
    """Eval samples per forward per process."""
    overwrite_output_dir: bool = False
    """A fresh run over an old --output_dir: its log is cut back once the first step is taken."""


def _float_or_none(value):
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


class Trainer:
    def __init__(self, plan, engine, loader, eval_sets, eval_collator, dist, checkpointer, options: LoopOptions,
                 source_names=(), write_extras=None):
        self.plan, self.engine, self.loader, self.dist = plan, engine, loader, dist
        self.eval_sets = {name: ds for name, ds in (eval_sets or {}).items() if len(ds) > 0}
        self.eval_collator, self.checkpointer, self.options = eval_collator, checkpointer, options
        self.source_names, self.write_extras = list(source_names), write_extras
        self.global_step = 0
        self.samples_by_source = [0] * len(self.source_names)
        self.window = Window(engine.device)
        self.log_position = 0 if options.overwrite_output_dir else None  # train_log.jsonl length to cut back to
        self.resumed = False
        self.writer = None
        self.on_log = []  # fn(trainer, record) after each record written: a public hook, nothing patched
        self._last_eval = None  # (step, metrics) of the loop's latest evaluation

    # -- state ----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The trainer's state, the same dict on every rank (the window's sums are reduced: a collective)."""
        return {"global_step": self.global_step, "sampler": self.loader.state_dict(), "window": self.window.state_dict(),
                "log_position": self.writer.position() if self.writer else 0,
                "samples_by_source": dict(zip(self.source_names, self.samples_by_source))}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        self.loader.load_state_dict(state["sampler"])
        self.window.load_state_dict(state["window"], holder=self.dist.is_main)
        self.log_position = state["log_position"]
        saved = state.get("samples_by_source", {})
        self.samples_by_source = [int(saved.get(name, 0)) for name in self.source_names]
        self.resumed = True
        if self.engine.global_steps != self.global_step:
            raise RuntimeError(f"DeepSpeed restored step {self.engine.global_steps}, the trainer state says "
                               f"{self.global_step}")

    # -- the loop -------------------------------------------------------------------------------------------------------

    def train(self, stop) -> str:
        """Train up to plan.max_steps; "preempted" when a signal stopped it (a checkpoint of the step reached was
        saved), else "done". `stop`: a signals.StopOnSignal, entered."""
        purge_from = self.global_step + 1 if self.resumed else (0 if self.options.overwrite_output_dir else None)
        self.writer = MetricsWriter(self.plan.output_dir, self.plan.logging_dir, self.dist.rank,
                                    truncate_at=self.log_position, purge_from=purge_from)
        bar = tqdm(total=self.plan.max_steps, initial=self.global_step, disable=not self.dist.is_main,
                   file=sys.stderr, desc="train", unit="step", dynamic_ncols=True)
        try:
            return self._loop(bar, stop)
        finally:  # also on an error: its one line must not land on the progress bar's line
            bar.close()
            self.loader.close()
            self.writer.close()

    def _agree(self, masked: int, stop) -> tuple:
        """(masked tokens of the step on every rank, as a device tensor; does any rank want to stop?): one
        all-reduce. Reading the stop flag is the loop's one host synchronisation per step."""
        t = torch.tensor([float(masked), 1.0 if stop.requested else 0.0], dtype=torch.float32,
                         device=self.engine.device)
        self.dist.all_reduce(t)
        return t[0].clamp(min=1.0), bool(t[1].item() > 0)

    def _loop(self, bar, stop) -> str:
        engine, plan, opts = self.engine, self.plan, self.options
        engine.train()
        measure_norm = plan.zero_stage == 0 and plan.precision == "fp32"  # DeepSpeed clips there but reports nothing
        scale_by = plan.world_size * plan.grad_accumulation
        while self.global_step < plan.max_steps:
            step = self.loader.next()
            total_masked, stopping = self._agree(step.masked, stop)
            if stopping:
                self.loader.put_back()  # taken, not trained: the checkpoint's position is before it
                return self._stop_for_signal(stop)
            number = self.global_step + 1
            logging_step = number % opts.logging_steps == 0 or number == plan.max_steps
            lr = engine.get_lr()[0]  # the rate this step is taken with
            norm = None
            for batch in step.micro_batches:
                loss_sum, _ = engine(**batch)  # model.RobertaForMLMPretraining: (sum of the masked tokens' CE, n)
                engine.backward(loss_sum * scale_by / total_masked)
                if measure_norm and logging_step and engine.is_gradient_accumulation_boundary():
                    norm = self._grad_norm()
                engine.step()
                self.window.add_loss(loss_sum)
            flops = sum(train_flops(engine.module.config, *shape) for shape in step.shapes)
            self.window.add_step(step.masked, step.tokens, step.samples, self.loader.wait_seconds, flops,
                                 sum(rows * width for rows, width, _ in step.shapes))
            self.loader.wait_seconds = 0.0
            self.global_step = engine.global_steps
            if step.source_counts is not None:
                self.samples_by_source = [a + int(b) for a, b in zip(self.samples_by_source, step.source_counts)]
            elif self.source_names:
                self.samples_by_source[0] += plan.global_batch
            bar.update(1)
            if logging_step:
                self._log_step(lr, norm if measure_norm else _float_or_none(engine.get_global_grad_norm()))
            paused = time.perf_counter()
            if opts.eval_every and self.global_step % opts.eval_every == 0:
                self._evaluate_and_log()
            self.checkpointer.after_step(self)  # saves when its policy says (interval, last step)
            self.window.started += time.perf_counter() - paused  # throughput counts training time only
        return "done"

    def _stop_for_signal(self, stop) -> str:
        self.checkpointer.on_stop(self)
        log.info("stopped by %s at step %d%s: run the same command again to resume", stop.requested,
                 self.global_step, f", saved in checkpoint-{self.global_step}" if self.global_step else "")
        return "preempted"

    def _grad_norm(self):
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _log_step(self, lr: float, grad_norm) -> None:
        summary = self.window.summary(self.dist.world_size)  # a collective: every rank logs the same numbers
        record = {"step": self.global_step, "loss": summary["loss"], "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": summary["tokens_per_s"], "samples_per_s": summary["samples_per_s"],
                  "tflops": summary["tflops"]}
        if self.plan.peak_tflops:
            record["mfu"] = summary["tflops"] / self.plan.peak_tflops
        if self.engine.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.engine.device) / 2**30
        record["data_wait"], record["padding"] = summary["data_wait"], summary["padding"]
        # what packing achieved on the training set, in the run's first record only (a resumed run's log has it, so
        # a resumed log equals an uninterrupted one)
        if self.writer.file is None and self.global_step <= self.options.logging_steps:
            record["train_fill"] = train_fill(self.loader.dataset, self.plan.seq_length)
        if self.plan.precision == "fp16":
            opt = self.engine.optimizer
            record["loss_scale"] = _float_or_none(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None))
        if self.source_names:
            record["samples_by_source"] = dict(zip(self.source_names, self.samples_by_source))
        self._emit(record)

    def _emit(self, record: dict) -> None:
        self.writer.write(record)
        if self.dist.is_main:
            tqdm.write(format_record(record), file=sys.stdout)
        for hook in self.on_log:
            hook(self, record)

    def _evaluate_and_log(self) -> None:
        metrics = self.evaluate()
        self._last_eval = (self.global_step, metrics)
        if metrics:
            self._emit({"step": self.global_step, **metrics})

    # -- evaluation -----------------------------------------------------------------------------------------------------

    def final_evaluation(self) -> dict:
        """The metrics at the last step: the loop's own evaluation of that step, or a new one."""
        if self._last_eval is not None and self._last_eval[0] == self.global_step:
            return self._last_eval[1]
        return self.evaluate()

    @torch.no_grad()
    def _eval_sums(self, dataset):
        """(loss sum, masked tokens) of one eval set over every rank (sharded, fixed masking)."""
        engine, world, rank = self.engine, self.dist.world_size, self.dist.rank
        n, bs = len(dataset), self.options.eval_batch_size
        mine = list(range(rank, n, world))
        num_batches = math.ceil(math.ceil(n / world) / bs)  # the same on every rank: ZeRO-3 forwards are collective
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
        for b in range(num_batches):
            indices = mine[b * bs:(b + 1) * bs]
            batch = self.eval_collator(dataset.__getitems__(indices or [0]), indices or [0], 0)
            s, c = engine(**{k: v.to(engine.device) for k, v in batch.items()})
            if indices:
                loss_sum += s.double()
                tokens += c.double()
        return all_reduce_sum([loss_sum.item(), tokens.item()], engine.device)

    def evaluate(self) -> dict:
        """Loss over every masked token of the eval set(s), and its perplexity; per source too when several."""
        if not self.eval_sets:
            return {}
        self.engine.eval()
        sums = {name: self._eval_sums(ds) for name, ds in self.eval_sets.items()}
        self.engine.train()
        total_loss, total_tokens = (sum(v[i] for v in sums.values()) for i in (0, 1))
        eval_loss = total_loss / max(total_tokens, 1.0)
        out = {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}
        if len(sums) > 1:  # each --eval_dir on its own too, keyed by the directory as given
            for name, (s, c) in sums.items():
                out[f"eval_loss/{name}"] = s / max(c, 1.0)
                out[f"perplexity/{name}"] = perplexity(out[f"eval_loss/{name}"])
        return out


def make_trainer(plan, engine, tokenizer, train_dataset, eval_sets, dist, checkpointer, train_args) -> Trainer:
    """The trainer of a run: its sampler, loader and collators from the plan, its loop options from the flags."""
    from ds_mlm.collator import MLMCollator
    from ds_mlm.loader import StepLoader
    from ds_mlm.sampler import GlobalBatchSampler

    masking = dict(mlm_probability=plan.mlm_probability, whole_word_mask=plan.whole_word_mask,
                   pad_to_multiple_of=COMPILE_WIDTH_MULTIPLE if plan.torch_compile else None)
    sampler = GlobalBatchSampler(len(train_dataset), plan.global_batch, plan.micro_batch, dist.rank, dist.world_size,
                                 plan.seed)
    loader = StepLoader(sampler, train_dataset, MLMCollator.from_tokenizer(tokenizer, seed=plan.seed, **masking),
                        engine.device)
    every = {"steps": train_args.eval_steps, "epoch": plan.steps_per_epoch}.get(train_args.evaluation_strategy)
    options = LoopOptions(logging_steps=train_args.logging_steps, eval_every=every,
                          eval_batch_size=train_args.per_device_eval_batch_size,
                          overwrite_output_dir=checkpointer.fresh_over_old)

    def write_extras(path):  # so a checkpoint exports with nothing else (python -m ds_mlm.export)
        engine.module.config.save_pretrained(path)
        tokenizer.save_pretrained(path)

    eval_collator = MLMCollator.from_tokenizer(tokenizer, seed=EVAL_SEED, **masking)
    return Trainer(plan, engine, loader, eval_sets, eval_collator, dist, checkpointer, options,
                   source_names=getattr(train_dataset, "source_names", ()), write_extras=write_extras)
