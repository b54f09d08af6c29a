"""The training loop with a real engine: loss falls, HF's lr schedule, gradient accumulation, evaluation, every ZeRO
stage, fp16 on CPU, exact resume. In-process tests run a world of one on a list-backed dataset, assembled by run_mlm's
own `plan_run` and `setup_training`; the resume test goes through the real deepspeed launcher with 2 ranks (ZeRO-2),
crashing one run after a checkpoint and comparing the jsonl loss sequences. The loop itself on a fake engine, fast:
tests/unit/test_trainer.py.
"""

import json
import logging
import math

import pytest
import torch

from conftest import (REPO, SEQ, crash_after_step, fp16_fallback_warning, fp16_precision, free_port, launcher_cmd,
                      make_trainer, numbers, read_log, run, train)
from integration.test_distributed_launchers import no_shm_leak

pytestmark = pytest.mark.slow  # a real engine: DeepSpeed, a model, or a launcher


def test_loss_falls_over_100_steps(tmp_path, data, world_of_one):
    trainer = make_trainer(tmp_path, data, world_of_one, "--max_steps", "100", "--learning_rate", "1e-3",
                           "--warmup_steps", "10", "--logging_steps", "1", eval_set=False)
    train(trainer)
    losses = [r["loss"] for r in read_log(tmp_path / "out")]
    assert len(losses) == 100
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > math.log(len(data[0])) - 1.0  # starts near chance
    assert last < first - 0.7, (first, last)  # measured: 7.55 -> 6.51 (unigram statistics alone give ~1 nat)


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


def test_resume_after_a_crash_repeats_the_uninterrupted_run_exactly(tmp_path, small_corpus, bpe_tokenizer_dir):
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

    straight, crashed, ports = tmp_path / "straight", tmp_path / "crashed", [free_port() for _ in range(3)]
    run(launcher_cmd(REPO / "ds_mlm" / "run_mlm.py", *args(straight), num_procs=2, port=ports[0]))
    proc = run(launcher_cmd(crash_after_step(tmp_path, 5), *args(crashed), num_procs=2, port=ports[1]), check=False)
    assert proc.returncode != 0
    assert [r["step"] for r in read_log(crashed)] == [1, 2, 3, 4, 4, 5]  # step 4 has a train and an eval record
    assert (crashed / "latest_checkpoint").read_text() == "checkpoint-3\n"
    run(launcher_cmd(REPO / "ds_mlm" / "run_mlm.py", *args(crashed), num_procs=2, port=ports[2]))  # from checkpoint-3

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
    assert all(no_shm_leak(port) for port in ports)  # no DeepSpeed all-reduce buffers of these jobs left in /dev/shm


def test_whole_word_mask_flag_reaches_both_collators(tmp_path, data, world_of_one):
    plain = make_trainer(tmp_path / "a", data, world_of_one, "--max_steps", "1", eval_set=False)
    whole = make_trainer(tmp_path / "b", data, world_of_one, "--max_steps", "1", "--whole_word_mask", eval_set=False)
    assert plain.loader.collator.word_start is None and plain.eval_collator.word_start is None
    starts = whole.loader.collator.word_start
    assert starts is not None and whole.eval_collator.word_start is not None
    assert 0 < starts.sum() < len(starts)  # byte-level BPE: the Ġ pieces start words, the others continue them


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
