"""Training metrics: a window of step statistics averaged over all ranks, and where they are written.

Every `--logging_steps` optimizer steps one record goes to three places, all from rank 0:

  - `{output_dir}/train_log.jsonl`, one JSON object per line, flushed at each write, appended across resumes:
        {"step": 12, "loss": 6.91, "lr": 4.2e-05, "grad_norm": 1.3, "tokens_per_s": 10412.0, "samples_per_s": 81.3,
         "tflops": 0.41, "data_wait": 0.002}
    (+ "loss_scale" under fp16, "mfu" where the device's peak is known, "peak_memory_gib" on CUDA); an evaluation
    adds {"step": 12, "eval_loss": ..., "perplexity": ...}.
    On resume the file is cut back to its length at the checkpoint, so the steps redone are not logged twice.
  - TensorBoard under `--logging_dir`: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/samples_per_s,
    train/loss_scale, train/tflops, train/mfu, train/peak_memory_gib, train/data_wait, eval/loss, eval/perplexity
    (x axis: optimizer step).
  - one line on stdout.

"loss" is the mean micro-batch loss over the window and over all ranks (an all-reduce), so every rank computes the
same number; "lr" is the learning rate the logged step was taken with; throughput counts all ranks' input tokens
(padding excluded) and samples over the window's wall time. "tflops" is the model FLOPs of all ranks' micro-batches
(ds_mlm/flops.py, one formula) / window seconds / world size / 1e12: achieved TFLOP/s per device; "mfu" = tflops /
the device's dense peak; "data_wait" the ranks' mean share of the window spent building batches (sampler, reads,
masking: on a GPU the device may still be busy with queued kernels meanwhile, so this bounds its wait from above);
"peak_memory_gib" rank 0's largest CUDA allocation so far (torch.cuda.max_memory_allocated).
"""

import json
import logging
import math
import os
import time

import torch

log = logging.getLogger(__name__)

TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                    "tokens_per_s": "train/tokens_per_s", "samples_per_s": "train/samples_per_s",
                    "loss_scale": "train/loss_scale", "tflops": "train/tflops", "mfu": "train/mfu",
                    "peak_memory_gib": "train/peak_memory_gib", "data_wait": "train/data_wait",
                    "eval_loss": "eval/loss", "perplexity": "eval/perplexity"}
LOG_FILE = "train_log.jsonl"


def all_reduce_sum(values: list, device) -> list:
    """Element-wise sum of a list of floats over all ranks (float64, so sums of many losses stay exact enough)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


class Window:
    """Sums over this rank's micro-batches since the last log; `summary()` reduces them over ranks (a collective)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: no sync per step
        self.micro_batches = 0
        self.tokens = 0
        self.samples = 0
        self.flops = 0.0  # model FLOPs of the micro-batches (ds_mlm.flops.train_flops)
        self.wait = 0.0  # seconds spent building batches
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int, samples: int, flops: float = 0.0, wait: float = 0.0) -> None:
        self.loss_sum += loss.detach().double()
        self.micro_batches += 1
        self.tokens += tokens
        self.samples += samples
        self.flops += flops
        self.wait += wait

    def state_dict(self) -> dict:
        """This rank's unlogged sums (saved in checkpoints so a resume mid-window logs the same numbers)."""
        return {"loss_sum": self.loss_sum.item(), "micro_batches": self.micro_batches, "tokens": self.tokens,
                "samples": self.samples, "flops": self.flops, "wait": self.wait,
                "seconds": time.perf_counter() - self.started}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum.fill_(state["loss_sum"])
        self.micro_batches, self.tokens, self.samples = state["micro_batches"], state["tokens"], state["samples"]
        self.flops, self.wait = state.get("flops", 0.0), state.get("wait", 0.0)  # older checkpoints: none
        self.started = time.perf_counter() - state.get("seconds", 0.0)  # its tokens took that long before the stop

    def summary(self) -> dict:
        loss_sum, count, tokens, samples, flops, wait, ranks = all_reduce_sum(
            [self.loss_sum.item(), self.micro_batches, self.tokens, self.samples, self.flops, self.wait, 1.0],
            self.device)
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.reset()
        return {"loss": loss_sum / max(count, 1), "tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds,
                "tflops": flops / seconds / ranks / 1e12, "data_wait": wait / ranks / seconds}


class MetricsWriter:
    """The jsonl file, TensorBoard and stdout; a no-op on ranks other than 0."""

    def __init__(self, output_dir: str, logging_dir: str, rank: int, truncate_at=None, purge_from=None):
        """truncate_at: cut train_log.jsonl back to this many bytes (a resume: 0 starts afresh); purge_from: hide
        TensorBoard events of this step and later written before (the steps a resume redoes)."""
        self.enabled = rank == 0
        self.path = os.path.join(output_dir, LOG_FILE)
        self.file = self.tb = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if truncate_at is not None and os.path.exists(self.path) and os.path.getsize(self.path) > truncate_at:
            with open(self.path, "r+b") as f:  # the records after the checkpoint are about to be redone
                f.truncate(truncate_at)
        self.file = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=logging_dir, purge_step=purge_from)

    def position(self) -> int:
        """Bytes written so far (recorded in checkpoints so a resume can cut the file back)."""
        return self.file.tell() if self.enabled else 0

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in record.items():
            if key in TENSORBOARD_TAGS and value is not None:
                self.tb.add_scalar(TENSORBOARD_TAGS[key], value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def format_record(record: dict) -> str:
    """One stdout line: `step 12 | loss 6.9100 | lr 4.20e-05 | ...`."""
    parts = [f"step {record['step']}"]
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        if key == "lr":
            parts.append(f"lr {value:.3e}")
        elif key in ("tokens_per_s", "samples_per_s"):
            parts.append(f"{key} {value:,.0f}")
        else:
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts)
