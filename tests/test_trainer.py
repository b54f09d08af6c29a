"""The training loop: loss falls, HF's lr schedule, gradient accumulation, evaluation, fp16 on CPU, exact resume.

In-process tests run a world of one on a list-backed dataset; the resume test goes through the real deepspeed
launcher with 2 ranks (ZeRO-2 bf16), crashing one run after a checkpoint and comparing the jsonl loss sequences.
"""

import json
import logging
import math
import os
import sys

import pytest
import torch

from conftest import REPO, TIMING, cpu_mixed_precision, free_port, run
from ds_mlm.args import parse_args

SEQ = 64


class ListDataset:
    """The dataset interface the trainer reads: len() and __getitems__(indices) -> list of 1-D LongTensors."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitems__(self, indices):
        return [self.samples[i] for i in indices]


def blocks(tokenizer, folder, lines_per_file):
    """<s> ids </s> blocks of SEQ tokens from the first lines of each file (a tiny packed dataset)."""
    ids = []
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines()[:lines_per_file]:
            ids += tokenizer(line, add_special_tokens=False)["input_ids"]
    n = SEQ - 2
    return ListDataset([torch.tensor([tokenizer.bos_token_id, *ids[i:i + n], tokenizer.eos_token_id])
                        for i in range(0, len(ids) - n + 1, n)])


@pytest.fixture(scope="module")
def data(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    from conftest import SAMPLE

    tokenizer = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    return tokenizer, blocks(tokenizer, SAMPLE / "train", 400), blocks(tokenizer, SAMPLE / "eval", 40)


def make_trainer(tmp_path, data, world, *flags, eval_set=True):
    from transformers import set_seed

    from ds_mlm.ds_config import resolve_ds_config
    from ds_mlm.model import build_model
    from ds_mlm.trainer import Trainer

    tokenizer, train, evaluation = data
    model_args, data_args, args = parse_args(
        ["--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--architecture", "roberta-tiny",
         "--max_seq_length", str(SEQ), "--save_steps", "1000", *flags])
    config = resolve_ds_config(args, world_size=world.world_size)
    set_seed(args.seed)
    model = build_model(model_args, tokenizer, SEQ)
    return Trainer(model=model, tokenizer=tokenizer, train_dataset=train, eval_dataset=evaluation if eval_set else None,
                   args=args, data_args=data_args, ds_config=config, dist=world)


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_loss_falls_over_100_steps(tmp_path, data, world_of_one):
    trainer = make_trainer(tmp_path, data, world_of_one, "--max_steps", "100", "--learning_rate", "1e-3",
                           "--warmup_steps", "10", "--logging_steps", "1", eval_set=False)
    trainer.train()
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
    trainer.train()
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
    assert trainer.sampler.consumed_samples == steps * grad_acc * micro
    assert all(r["grad_norm"] > 0 for r in records)  # ZeRO-0 fp32 reports a norm too


def test_evaluation_covers_the_eval_set_deterministically(tmp_path, data, world_of_one):
    from ds_mlm.trainer import masked_lm_loss

    trainer = make_trainer(tmp_path, data, world_of_one, "--max_steps", "4", "--logging_steps", "2",
                           "--evaluation_strategy", "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "3",
                           "--deepspeed_config", "zero0.json")
    trainer.train()
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second and first["perplexity"] == pytest.approx(math.exp(first["eval_loss"]))
    # the same number by hand: every eval sample once, masked with the fixed eval seed at epoch 0
    evaluation = data[2]
    total, count = 0.0, 0
    trainer.engine.eval()
    with torch.no_grad():
        for i in range(len(evaluation)):
            batch = trainer.eval_collator(evaluation.__getitems__([i]), [i], 0)
            s, c = masked_lm_loss(trainer.engine, batch)
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
    trainer.train()
    assert trainer.engine.zero_optimization_stage() == int(config[4])
    records = read_log(tmp_path / "out")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    if config != "zero3.json":  # ZeRO-3 keeps parameters partitioned (empty placeholders) outside a forward
        after = [p.detach() for p in trainer.engine.module.parameters()][:3]
        assert any(not torch.equal(a.float(), b.float()) for a, b in zip(before, after))  # the weights moved


def test_fp16_on_cpu_trains_in_bf16_or_fp32_with_a_warning(tmp_path, data, world_of_one, caplog):
    mixed = cpu_mixed_precision()
    with caplog.at_level(logging.WARNING, logger="ds_mlm"):
        trainer = make_trainer(tmp_path, data, world_of_one, "--fp16", "--deepspeed_config", "zero1.json",
                               "--max_steps", "3", "--logging_steps", "1", eval_set=False)
    assert f"fp16 is not supported on this cpu: training in {mixed} instead" in caplog.text
    assert trainer.engine.bfloat16_enabled() is (mixed == "bf16") and not trainer.engine.fp16_enabled()
    assert trainer.engine.zero_optimization_stage() == 1
    trainer.train()
    assert len(read_log(tmp_path / "out")) == 3
    assert json.loads((tmp_path / "out" / "ds_config.json").read_text())["bf16"]["enabled"] is (mixed == "bf16")


class Crash(Exception):
    pass


def test_resume_inside_a_logging_window_in_process(tmp_path, data, world_of_one, monkeypatch):
    """Checkpoint at step 3, crash after step 4, log every 2 steps: the resumed window holds step 3's loss."""
    from ds_mlm.trainer import Trainer

    flags = ("--max_steps", "8", "--logging_steps", "2", "--save_steps", "3", "--learning_rate", "2e-3",
             "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4")
    make_trainer(tmp_path / "a", data, world_of_one, *flags, eval_set=False).train()
    logged = Trainer._log_step

    def crash(self, *args, **kwargs):
        logged(self, *args, **kwargs)
        if self.global_step == 4:
            raise Crash

    monkeypatch.setattr(Trainer, "_log_step", crash)
    with pytest.raises(Crash):
        make_trainer(tmp_path / "b", data, world_of_one, *flags, eval_set=False).train()
    monkeypatch.setattr(Trainer, "_log_step", logged)
    resumed = make_trainer(tmp_path / "b", data, world_of_one, *flags, eval_set=False)
    assert resumed.resume_path == str(tmp_path / "b" / "out" / "checkpoint-3")
    resumed.train()

    def numbers(out):
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_log(out)]

    assert [s for s, *_ in numbers(tmp_path / "a" / "out")] == [2, 4, 6, 8]
    assert numbers(tmp_path / "b" / "out") == numbers(tmp_path / "a" / "out")


# -- through the real launcher: 2 ranks, ZeRO-2 bf16, a crash, a resume ---------------------------------------------

CRASH_AFTER_STEP = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
from ds_mlm.trainer import Trainer
logged = Trainer._log_step
def crash(self, *args, **kwargs):
    logged(self, *args, **kwargs)
    if self.global_step == {stop}:
        os._exit(3)  # a hard crash after a logged step: no cleanup, no save
Trainer._log_step = crash
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def launcher(script, *args, num_procs=2):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs), "--master_port",
            str(free_port()), str(script), *args]


def shm_files():
    return {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed")} if os.path.isdir("/dev/shm") else set()


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
    run(launcher(REPO / "ds_mlm" / "run_mlm.py", *args(straight)))
    wrapper = tmp_path / "crash_after_step.py"
    wrapper.write_text(CRASH_AFTER_STEP.format(repo=str(REPO), stop=5, script=str(REPO / "ds_mlm" / "run_mlm.py")))
    proc = run(launcher(wrapper, *args(crashed)), check=False)
    assert proc.returncode != 0
    assert [r["step"] for r in read_log(crashed)] == [1, 2, 3, 4, 4, 5]  # step 4 has a train and an eval record
    assert (crashed / "latest_checkpoint").read_text() == "checkpoint-3\n"
    run(launcher(REPO / "ds_mlm" / "run_mlm.py", *args(crashed)))  # resumes from checkpoint-3 by itself

    def numbers(out):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_log(out)]

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


def test_whole_word_mask_flag_reaches_both_collators(tmp_path, data, world_of_one):
    plain = make_trainer(tmp_path / "a", data, world_of_one, "--max_steps", "1", eval_set=False)
    whole = make_trainer(tmp_path / "b", data, world_of_one, "--max_steps", "1", "--whole_word_mask", eval_set=False)
    assert plain.collator.word_start is None and plain.eval_collator.word_start is None
    starts = whole.collator.word_start
    assert starts is not None and whole.eval_collator.word_start is not None
    assert 0 < starts.sum() < len(starts)  # byte-level BPE: the Ġ pieces start words, the others continue them
