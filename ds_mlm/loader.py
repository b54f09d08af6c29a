"""The training batches of each optimizer step, built ahead of the step that needs them.

    loader = StepLoader(sampler, dataset, collator, device)
    loader.load_state_dict(saved)   # optional: the sampler position of a checkpoint
    step = loader.next()            # a Step: this rank's micro-batches (on the device) and what they hold
    loader.state_dict()             # the position after the steps handed out (never the ones built ahead)
    loader.put_back()               # the step last handed out was not trained: the position goes back before it
    loader.close()

A background thread reads each step's samples (zero-copy views of the token store), masks them (collator.py, a
numba kernel that releases the GIL) and, on a GPU, puts them in pinned memory; the training thread copies them to
the device with `non_blocking=True`. Exactly the samples and masks a synchronous loop would produce, in the same
order (one producer, in sequence): the thread only moves the work earlier. `wait_seconds` counts the time the
training thread waited for a step that was not ready. `prefetch=0` builds each step in the training thread. A
producer that hangs (a file system that stopped answering) ends the wait after stuck_seconds with one line.
"""

import queue
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ds_mlm.collator import IGNORE_INDEX
from ds_mlm.errors import UserError

STUCK_SECONDS = 600.0  # one step's samples are read and masked in well under a second: this long is a hang


@dataclass
class Step:
    """One optimizer step's data for this rank."""

    epoch: int
    """The epoch the step's samples come from."""
    micro_batches: List[dict]
    """This rank's micro-batches: {"input_ids", "attention_mask", "labels"} tensors (on the device once taken)."""
    tokens: int
    """Input tokens of this rank's micro-batches (padding excluded)."""
    masked: int
    """Masked (labelled) tokens of this rank's micro-batches: their sum over ranks normalises the step's loss."""
    samples: int
    """Samples of this rank's micro-batches."""
    source_counts: Optional[np.ndarray]
    """Samples of the whole global batch per source (a mixture), the same on every rank; None for one source."""
    shapes: List[Tuple[int, int, int]]
    """(rows, width, masked tokens) of each micro-batch: what the model computes (flops.py)."""
    position: dict
    """The sampler state after this step: what a checkpoint taken after it must record."""


class StepLoader:
    """See the module docstring."""

    def __init__(self, sampler, dataset, collator, device, prefetch: int = 2, stuck_seconds: float = STUCK_SECONDS):
        self.sampler, self.dataset, self.collator = sampler, dataset, collator
        self.stuck_seconds = stuck_seconds
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.pin = self.device.type == "cuda"  # page-locked host memory: the copy can overlap the step
        self.sources_of = getattr(dataset, "sources_of", None)
        self.num_sources = len(getattr(dataset, "source_names", ()) or ())
        self.wait_seconds = 0.0
        self._position = self._previous = sampler.state_dict()
        self._queue = self._thread = None
        self._stop = threading.Event()

    # -- building a step (the producer) -------------------------------------------------------------------------------

    def _build(self) -> Step:
        epoch, micro_indices, step_indices = self.sampler.next_step()
        batches, tokens, masked, samples, shapes = [], 0, 0, 0, []
        for indices in micro_indices:
            batch = self.collator(self.dataset.__getitems__(indices), indices, epoch)
            tokens += int(batch["attention_mask"].sum())
            labelled = int((batch["labels"] != IGNORE_INDEX).sum())
            masked += labelled
            samples += len(indices)
            shapes.append((*batch["input_ids"].shape, labelled))
            if self.pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            batches.append(batch)
        counts = None
        if self.sources_of is not None and self.num_sources > 1:
            counts = np.bincount(self.sources_of(step_indices), minlength=self.num_sources)
        return Step(epoch, batches, tokens, masked, samples, counts, shapes, self.sampler.state_dict())

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._build()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 (handed to the training thread, which raises it)
            self._queue.put(e)

    # -- taking a step (the consumer) ---------------------------------------------------------------------------------

    def next(self) -> Step:
        started = time.perf_counter()
        if self.prefetch <= 0:
            step = self._build()
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._produce, name="ds-mlm-loader", daemon=True)
                self._thread.start()
            step = self._take()
            if isinstance(step, BaseException):
                raise step
        self.wait_seconds += time.perf_counter() - started
        step.micro_batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()}
                              for b in step.micro_batches]
        self._previous, self._position = self._position, step.position
        return step

    def _take(self):
        """The producer's next item, waiting at most stuck_seconds (a dead producer always leaves its error)."""
        deadline = time.monotonic() + self.stuck_seconds
        while True:
            try:
                return self._queue.get(timeout=min(1.0, self.stuck_seconds))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise UserError(f"no training step was read from the dataset for {self.stuck_seconds:.0f} s: "
                                    "reading the token store hangs (a file system that stopped answering?)") from None

    def state_dict(self) -> dict:
        return dict(self._position)

    def put_back(self) -> None:
        """The step last handed out was not trained (the run stops before it): the position is the one before it."""
        self._position = self._previous

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("load_state_dict after the loader started")
        self.sampler.load_state_dict(state)
        self._position = self.sampler.state_dict()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
