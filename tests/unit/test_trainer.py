"""The training loop: loss falls, HF's lr schedule, gradient accumulation, evaluation, fp16 on CPU, exact resume.

Fast tests (the end of the file) run the loop on a small fake engine and loader, with the real checkpoint policy,
watching it through the Trainer's public `on_log` hook. Slow in-process tests run a world of one on a list-backed
dataset, assembled by run_mlm's own `plan_run` and `setup_training`; the resume test goes through the real deepspeed
launcher with 2 ranks (ZeRO-2), crashing one run after a checkpoint and comparing the jsonl loss sequences.
"""

import json
import logging
import math
import os
import types

import pytest
import torch

from conftest import (REPO, SEQ, crash_after_step, fp16_fallback_warning, fp16_precision, launcher_cmd, make_trainer,
                      numbers, read_log, run, train)
from ds_mlm.checkpointer import Checkpointer
from ds_mlm.distributed import DistInfo
from ds_mlm.loader import Step
from ds_mlm.trainer import LoopOptions, Trainer


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
def test_loss_falls_over_100_steps(tmp_path, data, world_of_one):
    trainer = make_trainer(tmp_path, data, world_of_one, "--max_steps", "100", "--learning_rate", "1e-3",
                           "--warmup_steps", "10", "--logging_steps", "1", eval_set=False)
    train(trainer)
    losses = [r["loss"] for r in read_log(tmp_path / "out")]
    assert len(losses) == 100
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > math.log(len(data[0])) - 1.0  # starts near chance
    assert last < first - 0.7, (first, last)  # measured: 7.55 -> 6.51 (unigram statistics alone give ~1 nat)


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_is_hfs_and_steps_count_accumulated_micro_batches(tmp_path, data, world_of_one, schedule):
    from transformers import get_scheduler

    steps, warmup, grad_acc, micro = 10, 3, 2, 4
    trainer = make_trainer(tmp_path, data, world_of_one, "--max_steps", str(steps), "--learning_rate", "1e-3",
                           "--warmup_steps", str(warmup), "--gradient_accumulation_steps", str(grad_acc),
                           "--per_device_train_batch_size", str(micro), "--logging_steps", "1",
                           "--lr_scheduler_type", schedule, "--deepspeed_config", "zero0.json", eval_set=False)
    train(trainer)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    hf = get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])  # the rate step k is taken with
        opt.step()
        hf.step()
    records = read_log(tmp_path / "out")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert trainer.engine.global_steps == steps and trainer.engine.micro_steps == steps * grad_acc
    assert trainer.loader.state_dict()["consumed_samples"] == steps * grad_acc * micro
    assert all(r["grad_norm"] > 0 for r in records)  # ZeRO-0 fp32 reports a norm too


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
def test_evaluation_covers_the_eval_set_deterministically(tmp_path, data, world_of_one):
    trainer = make_trainer(tmp_path, data, world_of_one, "--max_steps", "4", "--logging_steps", "2",
                           "--evaluation_strategy", "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "3",
                           "--deepspeed_config", "zero0.json")
    train(trainer)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second and first["perplexity"] == pytest.approx(math.exp(first["eval_loss"]))
    # the same number by hand: every eval sample once, masked with the fixed eval seed at epoch 0
    evaluation = data[2]
    assert trainer.eval_collator.seed == 1234
    total, count = 0.0, 0
    trainer.engine.eval()
    with torch.no_grad():
        for i in range(len(evaluation)):
            batch = trainer.eval_collator(evaluation.__getitems__([i]), [i], 0)
            s, c = trainer.engine(**batch)
            total, count = total + float(s), count + int(c)
    trainer.engine.train()
    assert first["eval_loss"] == pytest.approx(total / count, rel=1e-6)
    evals = [r for r in read_log(tmp_path / "out") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and evals[1]["eval_loss"] == pytest.approx(first["eval_loss"])


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
@pytest.mark.parametrize("config", ["zero0.json", "zero1.json", "zero2.json", "zero3.json"])
def test_every_zero_stage_trains(tmp_path, data, world_of_one, config):
    trainer = make_trainer(tmp_path, data, world_of_one, "--deepspeed_config", config, "--max_steps", "4",
                           "--logging_steps", "1", "--learning_rate", "2e-3", "--gradient_accumulation_steps", "2",
                           eval_set=False)
    before = [p.detach().clone() for p in trainer.engine.module.parameters()][:3]
    train(trainer)
    assert trainer.engine.zero_optimization_stage() == int(config[4])
    records = read_log(tmp_path / "out")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    if config != "zero3.json":  # ZeRO-3 keeps parameters partitioned (empty placeholders) outside a forward
        after = [p.detach() for p in trainer.engine.module.parameters()][:3]
        assert any(not torch.equal(a.float(), b.float()) for a, b in zip(before, after))  # the weights moved


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
def test_fp16_on_cpu_trains_in_fp16_or_bf16_or_fp32_with_a_warning(tmp_path, data, world_of_one, caplog):
    used = fp16_precision()
    with caplog.at_level(logging.WARNING, logger="ds_mlm"):
        trainer = make_trainer(tmp_path, data, world_of_one, "--fp16", "--deepspeed_config", "zero1.json",
                               "--max_steps", "3", "--logging_steps", "1", eval_set=False)
    assert fp16_fallback_warning(used) in caplog.text and ("fp16 is not supported" in caplog.text) is (used != "fp16")
    assert (trainer.engine.bfloat16_enabled(), trainer.engine.fp16_enabled()) == (used == "bf16", used == "fp16")
    assert trainer.engine.zero_optimization_stage() == 1
    train(trainer)
    assert len(read_log(tmp_path / "out")) == 3
    resolved = json.loads((tmp_path / "out" / "ds_config.json").read_text())
    assert (resolved["bf16"]["enabled"], resolved["fp16"]["enabled"]) == (used == "bf16", used == "fp16")


class Crash(Exception):
    pass


def crash_after(step):
    """An on_log hook that crashes the run once step `step` is logged (no save)."""
    def crash(trainer, record):
        if trainer.global_step == step and "loss" in record:
            raise Crash
    return crash


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
def test_resume_inside_a_logging_window_in_process(tmp_path, data, world_of_one):
    """Checkpoint at step 3, crash after step 4, log every 2 steps: the resumed window holds step 3's loss."""
    flags = ("--max_steps", "8", "--logging_steps", "2", "--save_steps", "3", "--learning_rate", "2e-3",
             "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4")
    train(make_trainer(tmp_path / "a", data, world_of_one, *flags, eval_set=False))
    crashing = make_trainer(tmp_path / "b", data, world_of_one, *flags, eval_set=False)
    crashing.on_log.append(crash_after(4))
    with pytest.raises(Crash):
        train(crashing)
    resumed = make_trainer(tmp_path / "b", data, world_of_one, *flags, eval_set=False)
    assert resumed.resumed and resumed.global_step == 3
    train(resumed)

    def numbers(out):
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_log(out)]

    assert [s for s, *_ in numbers(tmp_path / "a" / "out")] == [2, 4, 6, 8]
    assert numbers(tmp_path / "b" / "out") == numbers(tmp_path / "a" / "out")
    padding = [r["padding"] for r in read_log(tmp_path / "a" / "out")]
    assert all(0.0 <= p < 1.0 for p in padding)  # the window's positions (rows x width) survive the resume too:
    assert [r["padding"] for r in read_log(tmp_path / "b" / "out")] == padding


# -- through the real launcher: 2 ranks, ZeRO-2, a crash, a resume ------------------------------------------------


def shm_files():
    return {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed")} if os.path.isdir("/dev/shm") else set()


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
def test_resume_after_a_crash_repeats_the_uninterrupted_run_exactly(tmp_path, small_corpus, bpe_tokenizer_dir):
    shm_before = shm_files()
    ds_json = tmp_path / "zero2_lr.json"  # the shipped zero2.json with a learning rate written in
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["optimizer"]["params"]["lr"] = 1e-3
    ds_json.write_text(json.dumps(config))

    def args(out):
        return ["--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir", small_corpus[0], "--eval_dir",
                small_corpus[1], "--output_dir", out, "--datasets_cache_dir", tmp_path / "cache",
                "--architecture", "roberta-tiny", "--max_seq_length", str(SEQ), "--per_device_train_batch_size", "4",
                "--per_device_eval_batch_size", "8", "--max_steps", "8", "--warmup_steps", "2", "--logging_steps", "1",
                "--save_steps", "3", "--save_total_limit", "2", "--evaluation_strategy", "steps", "--eval_steps", "4",
                "--deepspeed_config", ds_json, "--learning_rate", "2e-3"]

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run(launcher_cmd(REPO / "ds_mlm" / "run_mlm.py", *args(straight), num_procs=2))
    proc = run(launcher_cmd(crash_after_step(tmp_path, 5), *args(crashed), num_procs=2), check=False)
    assert proc.returncode != 0
    assert [r["step"] for r in read_log(crashed)] == [1, 2, 3, 4, 4, 5]  # step 4 has a train and an eval record
    assert (crashed / "latest_checkpoint").read_text() == "checkpoint-3\n"
    run(launcher_cmd(REPO / "ds_mlm" / "run_mlm.py", *args(crashed), num_procs=2))  # resumes from checkpoint-3

    assert [r["step"] for r in read_log(straight)] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert numbers(crashed) == numbers(straight)  # losses, lrs, grad norms and eval losses: equal, not close
    losses = [r["loss"] for r in read_log(straight) if "loss" in r]
    assert len(set(losses)) == len(losses)  # the numbers compared are real, distinct losses

    # the flag beat the JSON's learning rate, and the written config says so
    resolved = json.loads((straight / "ds_config.json").read_text())
    assert resolved["optimizer"]["params"]["lr"] == 2e-3 and resolved["train_batch_size"] == 4 * 1 * 2
    assert read_log(straight)[2]["lr"] == pytest.approx(2e-3)  # step 3: warm-up over, full rate

    # rotation: exactly the 2 newest complete checkpoints, and the pointer names one of them
    for out in (straight, crashed):
        kept = sorted(p.name for p in out.glob("checkpoint-*"))
        assert kept == ["checkpoint-6", "checkpoint-8"], kept
        assert (out / "latest_checkpoint").read_text() == "checkpoint-8\n"
        assert (out / "checkpoint-8" / "COMPLETE").is_file()
        assert {f.name for f in (out / "checkpoint-8").glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}

    # TensorBoard: every scalar, and the resumed run's curve has each step once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(crashed / "runs"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s", "train/tflops",
            "train/data_wait", "eval/loss", "eval/perplexity"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [4, 8]
    assert shm_files() == shm_before  # no DeepSpeed all-reduce buffers left in /dev/shm


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
def test_whole_word_mask_flag_reaches_both_collators(tmp_path, data, world_of_one):
    plain = make_trainer(tmp_path / "a", data, world_of_one, "--max_steps", "1", eval_set=False)
    whole = make_trainer(tmp_path / "b", data, world_of_one, "--max_steps", "1", "--whole_word_mask", eval_set=False)
    assert plain.loader.collator.word_start is None and plain.eval_collator.word_start is None
    starts = whole.loader.collator.word_start
    assert starts is not None and whole.eval_collator.word_start is not None
    assert 0 < starts.sum() < len(starts)  # byte-level BPE: the Ġ pieces start words, the others continue them


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
def test_resume_with_another_micro_batch_at_the_same_global_batch_follows_the_same_trajectory(
        tmp_path, data, world_of_one, no_dropout_config):
    """8 steps of 4 x 2 straight; 4 x 2 up to a checkpoint at step 4, then 8 x 1 and 2 x 4: the same losses up to
    reduction order (the loss is normalised over the whole global batch, not per micro-batch)."""
    def flags(micro, acc):
        return ("--config_name", str(no_dropout_config), "--max_steps", "8", "--logging_steps", "1", "--save_steps",
                "4", "--learning_rate", "2e-3", "--deepspeed_config", "zero0.json", "--per_device_train_batch_size",
                str(micro), "--gradient_accumulation_steps", str(acc))

    train(make_trainer(tmp_path / "straight", data, world_of_one, *flags(4, 2), eval_set=False))
    reference = [r["loss"] for r in read_log(tmp_path / "straight" / "out")]
    for micro, acc in ((8, 1), (2, 4)):
        out = tmp_path / f"split_{micro}x{acc}"
        crashing = make_trainer(out, data, world_of_one, *flags(4, 2), eval_set=False)
        crashing.on_log.append(crash_after(5))
        with pytest.raises(Crash):
            train(crashing)
        train(make_trainer(out, data, world_of_one, *flags(micro, acc), eval_set=False))
        losses = [r["loss"] for r in read_log(out / "out")]
        assert losses[:4] == reference[:4]  # before the checkpoint: the same run, bit for bit
        assert losses[4:] == pytest.approx(reference[4:], rel=1e-5)  # after it: another split, same samples


@pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher
def test_a_resume_follows_a_new_learning_rate_and_a_longer_run(tmp_path, data, world_of_one, caplog):
    """6 steps at lr 1e-3 (linear decay to 0 at step 6), then the same command with --max_steps 12 --learning_rate
    2e-3: step 7 runs on the new schedule (2e-3 x 6/12), not at the finished run's lr 0, and every record says so."""
    def flags(steps, lr):
        return ("--max_steps", str(steps), "--learning_rate", lr, "--logging_steps", "1", "--save_steps", "6",
                "--deepspeed_config", "zero2.json", "--bf16", "false")

    train(make_trainer(tmp_path, data, world_of_one, *flags(6, "1e-3"), eval_set=False))
    with caplog.at_level(logging.INFO, logger="ds_mlm"):
        resumed = make_trainer(tmp_path, data, world_of_one, *flags(12, "2e-3"), eval_set=False)
    said = caplog.text
    assert "resume: --learning_rate changed from 0.001 to 0.002: the run follows the new value" in said
    assert "resume: --max_steps changed from 6 to 12: the run follows the new value" in said
    assert "at step 6 (48 samples consumed); the next step runs at lr 0.001" in said
    train(resumed)
    lrs = [r["lr"] for r in read_log(tmp_path / "out")]
    assert lrs[:6] == pytest.approx([1e-3 * (6 - s) / 6 for s in range(6)])
    assert lrs[6:] == pytest.approx([2e-3 * (12 - s) / 12 for s in range(6, 12)])  # the rate each step was taken with
    written = json.loads((tmp_path / "out" / "ds_config.json").read_text())
    assert written["optimizer"]["params"]["lr"] == 2e-3
    assert all(g["lr"] == pytest.approx(0.0) for g in resumed.engine.optimizer.param_groups)  # the end of the new one


# -- fast: the loop itself, with a small fake engine and loader (no DeepSpeed, no model) -----------------------------

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
