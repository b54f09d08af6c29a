"""The training loop itself, fast: a small fake engine and loader (no DeepSpeed, no model) under the real checkpoint
policy, watched through the Trainer's public `on_log` hook. With a real engine (loss falls, HF's lr schedule, every
ZeRO stage, fp16 on CPU, exact resume through the launcher): tests/integration/test_trainer.py.
"""

import types

import pytest
import torch

from conftest import read_log
from ds_mlm.checkpointer import Checkpointer
from ds_mlm.distributed import DistInfo
from ds_mlm.loader import Step
from ds_mlm.trainer import LoopOptions, Trainer


class FakeEngine:
    """What the loop calls on a DeepSpeed engine: a forward returning (loss sum, masked), backward, step, lr."""

    def __init__(self, grad_accumulation):
        self.grad_accumulation, self.micro_steps, self.global_steps = grad_accumulation, 0, 0
        self.device = torch.device("cpu")
        self.module = types.SimpleNamespace(config=types.SimpleNamespace(
            num_hidden_layers=1, hidden_size=8, intermediate_size=16, vocab_size=32))
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.scaled = []  # what backward() got for each micro-batch

    def train(self):
        pass

    def __call__(self, x):
        return (self.weight * x).sum(), torch.tensor(x.numel())

    def backward(self, loss):
        self.scaled.append(float(loss.detach()))

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.grad_accumulation == 0

    def step(self):
        self.micro_steps += 1
        self.global_steps = self.micro_steps // self.grad_accumulation

    def get_lr(self):
        return [0.1 / (1 + self.global_steps)]

    def get_global_grad_norm(self):
        return 1.0


class FakeLoader:
    """Steps of `acc` micro-batches of 2 samples x 3 masked tokens; positions count samples as the sampler's do."""

    def __init__(self, acc):
        self.acc, self.wait_seconds, self.consumed, self.before = acc, 0.0, 0, 0
        self.closed = False
        self.dataset = []  # counts no ids: the first record's train_fill is None (metrics.train_fill)

    def next(self):
        self.before, self.consumed = self.consumed, self.consumed + 2 * self.acc
        return Step(epoch=0, micro_batches=[{"x": torch.ones(2, 3)} for _ in range(self.acc)], tokens=6 * self.acc,
                    masked=6 * self.acc, samples=2 * self.acc, source_counts=None, shapes=[(2, 3, 6)] * self.acc,
                    position={"consumed_samples": self.consumed})

    def state_dict(self):
        return {"consumed_samples": self.consumed}

    def put_back(self):
        self.consumed = self.before

    def close(self):
        self.closed = True


class Recorded(Checkpointer):
    """The real checkpoint policy; the files are not written, only what would be saved is recorded."""

    def __init__(self, out, **kw):
        super().__init__(str(out), DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1), **kw)
        self.saved = []

    def write(self, engine, step, state, write_extras=None):
        self.saved.append((step, state["sampler"]["consumed_samples"]))
        return f"checkpoint-{step}"


class Stop:
    def __init__(self, after_steps=None):
        self.after_steps, self.requested = after_steps, None


def fast_trainer(tmp_path, max_steps, save_steps, acc=2):
    plan = types.SimpleNamespace(max_steps=max_steps, seq_length=3, zero_stage=2, precision="fp32", world_size=1,
                                 grad_accumulation=acc, global_batch=2 * acc, output_dir=str(tmp_path),
                                 logging_dir=str(tmp_path / "tb"), peak_tflops=None, to_dict=dict)
    engine, loader = FakeEngine(acc), FakeLoader(acc)
    checkpointer = Recorded(tmp_path, save_steps=save_steps)
    options = LoopOptions(logging_steps=2, eval_every=None, eval_batch_size=1)
    trainer = Trainer(plan, engine, loader, None, None, checkpointer.dist, checkpointer, options)
    trainer.write_extras = None
    return trainer


@pytest.mark.parametrize("max_steps", [5, 6])
def test_the_loop_logs_saves_and_normalises_as_its_options_and_checkpointer_say(tmp_path, max_steps):
    trainer = fast_trainer(tmp_path, max_steps, save_steps=4)
    seen = []
    trainer.on_log.append(lambda t, record: seen.append((t.global_step, record["step"], record["lr"])))
    assert trainer.train(Stop()) == "done"
    logged = sorted({2, 4, max_steps})  # every logging_steps, and the last step
    assert seen == [(s, s, pytest.approx(0.1 / s)) for s in logged]  # lr: the rate the step was taken with
    assert [r["step"] for r in read_log(tmp_path)] == logged
    # saved every 4 steps and at the last, each with the samples of the steps trained (4 per step)
    assert trainer.checkpointer.saved == [(s, 4 * s) for s in sorted({4, max_steps})]
    # each micro-batch's loss sum x world x accumulation / the step's masked tokens: the mean over the global batch
    assert trainer.engine.scaled == pytest.approx([6.0 * 1 * 2 / 12] * 2 * max_steps)
    assert trainer.loader.closed and trainer.engine.micro_steps == 2 * max_steps


def test_a_signal_saves_the_step_reached_with_the_position_before_the_untrained_step(tmp_path):
    trainer = fast_trainer(tmp_path, max_steps=10, save_steps=100)
    stop = Stop()
    trainer.on_log.append(lambda t, record: setattr(stop, "requested", "SIGTERM") if t.global_step == 4 else None)
    assert trainer.train(stop) == "preempted"
    assert trainer.global_step == 4 and trainer.engine.micro_steps == 8  # the step taken after the signal: not trained
    assert trainer.checkpointer.saved == [(4, 16)]  # its samples are not counted as consumed
    assert trainer.state_dict()["sampler"] == {"consumed_samples": 16}


def test_a_signal_after_the_last_save_saves_nothing_twice(tmp_path):
    trainer = fast_trainer(tmp_path, max_steps=10, save_steps=2)
    stop = Stop()
    trainer.on_log.append(lambda t, record: setattr(stop, "requested", "SIGTERM") if t.global_step == 2 else None)
    assert trainer.train(stop) == "preempted"
    assert trainer.checkpointer.saved == [(2, 8)]  # saved by the interval; the signal finds it saved
