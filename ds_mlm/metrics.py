"""Training metrics: a window of step statistics averaged over all ranks, and where they are written.

Every `--logging_steps` optimizer steps one record goes to three places, all from rank 0:

  - `{output_dir}/train_log.jsonl`, one JSON object per line, flushed at each write, appended across resumes:
        {"step": 12, "loss": 6.91, "lr": 4.2e-05, "grad_norm": 1.3, "tokens_per_s": 10412.0, "samples_per_s": 81.3}
    (+ "loss_scale" under fp16); an evaluation adds {"step": 12, "eval_loss": ..., "perplexity": ...}. Every record
    has "time", the Unix time it was written (so bench/startup.py finds when the first step ended).
    On resume the file is cut back to its length at the checkpoint, so the steps redone are not logged twice.
  - TensorBoard under `--logging_dir`: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/samples_per_s,
    train/padding, train/loss_scale, data/train_fill, eval/loss, eval/perplexity (x axis: optimizer step).
  - one line on stdout.

"loss" is the cross-entropy per masked token over the window and over all ranks (sums all-reduced), the number a
run computes the same on any number of processes and micro-batch split; "lr" is the learning rate the logged step
was taken with; throughput counts all ranks' input tokens (padding excluded) and samples over the window's wall
time (evaluations and saves excluded); "tflops" is the model FLOPs of all ranks' micro-batches (flops.py, one
formula) / window seconds / world size / 1e12: achieved TFLOP/s per device, and "mfu" = tflops / the device's dense
peak (where known); "data_wait" is the share of the window the training loop waited for its next batch (rank 0's);
"padding" is the share of the positions the model computed in the window that were padding (all ranks' micro-batches,
each as wide as its longest sample: rows x width), and "train_fill", in the first record of a run only, the training
set's ids / positions at --max_seq_length (what packing achieved, padding to full length before batching);
"peak_memory_gib" is rank 0's largest CUDA allocation so far (torch.cuda.max_memory_allocated; CUDA only). With several
training sources, "samples_by_source" counts each source's samples since the start of training; with several
evaluation sources, "eval_loss/<dir>" and "perplexity/<dir>" are each one's (TensorBoard: eval/<dir>/loss).
"""

import json
import logging
import math
import os
import time

import torch

from ds_mlm import distributed

log = logging.getLogger(__name__)

TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                    "tokens_per_s": "train/tokens_per_s", "samples_per_s": "train/samples_per_s",
                    "data_wait": "train/data_wait", "tflops": "train/tflops", "mfu": "train/mfu",
                    "peak_memory_gib": "train/peak_memory_gib", "padding": "train/padding", "train_fill": "data/train_fill", "loss_scale": "train/loss_scale", "eval_loss": "eval/loss", "perplexity": "eval/perplexity"}
LOG_FILE = "train_log.jsonl"


def all_reduce_sum(values: list, device) -> list:
    """Element-wise sum of a list of floats over all ranks (float64, so sums of many losses stay exact enough)."""
    return distributed.all_reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def train_fill(dataset, seq_length: int):
    """Ids / positions at seq_length of every sample of `dataset` (one store, or a Mixture of them: `sources`);
    None for a dataset that does not count its ids (`num_tokens`)."""
    stores = getattr(dataset, "sources", None) or [dataset]
    if not all(hasattr(s, "num_tokens") for s in stores):
        return None
    return sum(int(s.num_tokens) for s in stores) / max(sum(len(s) for s in stores) * seq_length, 1)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


class Window:
    """Sums over this rank's micro-batches since the last log; `summary()` reduces them over ranks (a collective)."""

    FIELDS = ("loss_sum", "masked", "tokens", "samples", "flops", "positions")

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: no sync per step
        self.masked = self.tokens = self.samples = self.positions = 0
        self.waited = self.flops = 0.0
        self.started = time.perf_counter()

    def add_loss(self, loss_sum: torch.Tensor) -> None:
        """A micro-batch's summed cross-entropy (a device tensor: adding it costs no synchronisation)."""
        self.loss_sum += loss_sum.detach().double()

    def add_step(self, masked: int, tokens: int, samples: int, waited: float, flops: float = 0.0,
                 positions: int = 0) -> None:
        """A step's masked tokens, input tokens, samples and model FLOPs on this rank, the seconds the loop waited
        for them, and the positions its micro-batches computed (rows x width each: tokens + padding)."""
        self.masked += masked
        self.tokens += tokens
        self.samples += samples
        self.waited += waited
        self.flops += flops
        self.positions += positions

    def _reduced(self) -> list:
        return all_reduce_sum([self.loss_sum.item(), self.masked, self.tokens, self.samples, self.flops,
                               self.positions], self.device)

    def state_dict(self) -> dict:
        """The window's sums over every rank (a collective), saved once in a checkpoint: a resume mid-window, on any
        number of processes, logs the same numbers."""
        sums = dict(zip(self.FIELDS, self._reduced()))
        return {**sums, "seconds": time.perf_counter() - self.started, "waited": self.waited}

    def load_state_dict(self, state: dict, holder: bool) -> None:
        """`holder`: this rank carries the saved sums (rank 0); the others start from zero."""
        self.reset()
        if holder:
            self.loss_sum.fill_(state["loss_sum"])
            self.masked, self.tokens, self.samples = (int(state[k]) for k in ("masked", "tokens", "samples"))
            self.waited, self.flops = state.get("waited", 0.0), state.get("flops", 0.0)
            self.positions = int(state.get("positions", 0))  # absent from checkpoints written before it was kept
        self.started = time.perf_counter() - state.get("seconds", 0.0)  # its tokens took that long before the stop

    def summary(self, world_size: int = 1) -> dict:
        loss_sum, masked, tokens, samples, flops, positions = self._reduced()
        seconds = max(time.perf_counter() - self.started, 1e-9)
        waited = self.waited
        self.reset()
        return {"loss": loss_sum / max(masked, 1), "tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds,
                "tflops": flops / seconds / world_size / 1e12, "data_wait": min(waited / seconds, 1.0),
                "padding": 1.0 - tokens / positions if positions else None}


class MetricsWriter:
    """The jsonl file, TensorBoard and stdout; a no-op on ranks other than 0. Opened at the first write, so a run that
    fails before its first logged step leaves an earlier run's log as it was."""

    def __init__(self, output_dir: str, logging_dir: str, rank: int, truncate_at=None, purge_from=None):
        """truncate_at: cut train_log.jsonl back to this many bytes (a resume: 0 starts afresh); purge_from: hide
        TensorBoard events of this step and later written before (the steps a resume redoes)."""
        self.enabled = rank == 0
        self.output_dir, self.logging_dir = output_dir, logging_dir
        self.truncate_at, self.purge_from = truncate_at, purge_from
        self.path = os.path.join(output_dir, LOG_FILE)
        self.file = self.tb = None

    def _open(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        cut = self.truncate_at
        if cut is not None and os.path.exists(self.path) and os.path.getsize(self.path) > cut:
            with open(self.path, "r+b") as f:  # the records after the checkpoint are about to be redone
                f.truncate(cut)
        self.file = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=self.logging_dir, purge_step=self.purge_from)

    def position(self) -> int:
        """Bytes written so far (recorded in checkpoints so a resume can cut the file back)."""
        if not self.enabled:
            return 0
        if self.file is None:
            self._open()
        return self.file.tell()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}  # before the first write's TensorBoard start-up
        if self.file is None:
            self._open()
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in record.items():
            if key in TENSORBOARD_TAGS and value is not None:
                self.tb.add_scalar(TENSORBOARD_TAGS[key], value, step)
        for source, count in record.get("samples_by_source", {}).items():
            self.tb.add_scalar(f"data/samples/{source}", count, step)
        for key, value in record.items():  # one --eval_dir of several: eval_loss/<dir>, perplexity/<dir>
            if key.startswith(("eval_loss/", "perplexity/")):
                kind, source = key.split("/", 1)
                self.tb.add_scalar(f"eval/{source}/{'loss' if kind == 'eval_loss' else kind}", value, step)
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
        if key in ("step", "time") or value is None or isinstance(value, dict):
            continue
        if key == "lr":
            parts.append(f"lr {value:.3e}")
        elif key in ("tokens_per_s", "samples_per_s"):
            parts.append(f"{key} {value:,.0f}")
        elif key in ("data_wait", "padding", "train_fill"):
            parts.append(f"{key} {value:.1%}")
        else:
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts)
