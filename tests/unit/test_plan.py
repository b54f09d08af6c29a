"""The run plan: one place that derives every effective setting, and what a resume does with each change."""

import dataclasses
import json

import pytest
from transformers import RobertaConfig

from ds_mlm.args import parse_args
from ds_mlm.errors import UserError
from ds_mlm.plan import compare, make_plan
from ds_mlm.precision import Device

CPU = Device("cpu", fp16=False, bf16_native=True)
EMULATING_CPU = Device("cpu", fp16=False, bf16_native=False)
CONFIG = RobertaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)


def plan_of(tmp_path, *flags, world=1, samples=1000, device=CPU, config=CONFIG, tokenizer="tok-a"):
    model_args, data_args, train_args = parse_args(["--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                                                    "--max_seq_length", "64", *flags])
    plan, warning = make_plan(model_args, data_args, train_args, device, world, config, tokenizer)
    return (plan if samples is None else plan.with_data(samples)), warning


def test_the_plan_holds_the_effective_settings_and_the_args_stay_as_given(tmp_path):
    plan, warning = plan_of(tmp_path, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                            "--learning_rate", "3e-4", "--warmup_steps", "5", "--num_train_epochs", "2", world=2)
    assert warning is None
    assert (plan.micro_batch, plan.grad_accumulation, plan.world_size, plan.global_batch) == (4, 2, 2, 16)
    assert (plan.steps_per_epoch, plan.max_steps, plan.epochs) == (62, 124, 2.0)  # 1000 // 16 steps per epoch
    assert (plan.precision, plan.zero_stage, plan.learning_rate, plan.warmup_steps) == ("bf16", 2, 3e-4, 5)
    assert plan.model["vocab_size"] == 1024 and plan.seq_length == 64  # the rows it trains with (padded to 64)
    ds = plan.ds_config
    assert (ds["train_batch_size"], ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (16, True, False)
    params = ds["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True  # nothing to JIT-compile
    json.dumps(plan.to_dict())  # it goes into every checkpoint
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.max_steps = 1


def test_the_device_decides_the_precision_once(tmp_path):
    plan, warning = plan_of(tmp_path, "--fp16", device=EMULATING_CPU)
    assert plan.precision == "fp32" and not plan.ds_config["fp16"]["enabled"] and not plan.ds_config["bf16"]["enabled"]
    assert warning.startswith("fp16 is not supported on this cpu: training in fp32")


def test_offload_keeps_deepspeeds_cpu_adam_and_a_json_scheduler_gets_the_step_count(tmp_path):
    plan, _ = plan_of(tmp_path, "--deepspeed_config", "zero2_offload.json", "--max_steps", "30")
    assert "torch_adam" not in plan.ds_config["optimizer"]["params"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto"}}}))
    plan, _ = plan_of(tmp_path, "--deepspeed_config", str(path), "--num_train_epochs", "1", samples=800)
    assert plan.schedule == "deepspeed:WarmupDecayLR" and plan.ds_config["scheduler"]["params"]["total_num_steps"] == 100


def test_resume_follows_lr_and_schedule_changes_in_one_line_each(tmp_path):
    saved = plan_of(tmp_path, "--max_steps", "100", "--learning_rate", "1e-4")[0].to_dict()
    now = plan_of(tmp_path, "--max_steps", "200", "--learning_rate", "2e-4", "--warmup_steps", "10")[0]
    refusals, notes = compare(saved, now)
    assert refusals == []
    assert notes == ["--learning_rate changed from 0.0001 to 0.0002: the run follows the new value",
                     "--warmup_steps changed from 0 to 10: the run follows the new value",
                     "--max_steps changed from 100 to 200: the run follows the new value"]


def test_resume_on_another_split_of_the_same_global_batch_is_a_note(tmp_path):
    saved = plan_of(tmp_path, "--per_device_train_batch_size", "4", "--max_steps", "50", world=2)[0].to_dict()
    now = plan_of(tmp_path, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                  "--max_steps", "50")[0]
    assert compare(saved, now) == ([], ["micro batch x accumulation x processes changed from 4x1x2 to 4x2x1 at the "
                                        "same global batch of 8: every step trains on the same samples as before"])
    bigger = plan_of(tmp_path, "--per_device_train_batch_size", "8", "--max_steps", "50", world=2)[0]
    assert compare(saved, bigger)[1] == ["the global batch changed from 8 to 16 samples: training goes on from the "
                                         "samples consumed, and steps now count batches of 16"]


def test_resume_refuses_what_the_checkpoint_cannot_fit(tmp_path):
    saved = plan_of(tmp_path)[0].to_dict()
    other_model = RobertaConfig(**{**CONFIG.to_dict(), "vocab_size": 1200})
    cases = {
        ("--deepspeed_config", "zero1.json", "--bf16"): "the ds_config's ZeRO stage: 2 in the checkpoint, 1 now",
        ("--seed", "7"): "--seed: 42 in the checkpoint, 7 now",
        ("--bf16", "false"): "--fp16/--bf16 or the ds_config: bf16 in the checkpoint, fp32 now",
    }
    for flags, line in cases.items():
        assert compare(saved, plan_of(tmp_path, *flags)[0])[0] == [line]
    assert compare(saved, plan_of(tmp_path, config=other_model)[0])[0] == [  # the rows padded to a multiple of 64
        "the model: vocab_size 1024 in the checkpoint, vocab_size 1216 now"]
    assert compare(saved, plan_of(tmp_path, "--pad_vocab_multiple", "1")[0])[0] == [
        "the model: vocab_size 1024 in the checkpoint, vocab_size 1000 now"]
    assert compare(saved, plan_of(tmp_path, samples=999)[0])[0] == [
        "the training data: 1000 in the checkpoint, 999 now"]
    assert compare(saved, plan_of(tmp_path, tokenizer="tok-b")[0])[0] == [
        "the tokenizer: fingerprint tok-a in the checkpoint, fingerprint tok-b now"]


def test_before_the_data_are_known_only_the_rest_is_compared(tmp_path):
    saved = plan_of(tmp_path, "--num_train_epochs", "2")[0].to_dict()
    early, _ = plan_of(tmp_path, "--num_train_epochs", "2", samples=None)
    assert early.max_steps is None and early.train_samples is None
    assert compare(saved, early) == ([], [])  # the step count and the data size wait for the data
    assert compare(saved, plan_of(tmp_path, "--num_train_epochs", "2", "--seed", "1", samples=None)[0])[0] == [
        "--seed: 42 in the checkpoint, 1 now"]
    assert early.with_data(1000).to_dict() == saved


def test_inconsistent_json_is_still_refused_before_planning(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train_batch_size": 3}))
    with pytest.raises(UserError, match="train_batch_size 3"):
        plan_of(tmp_path, "--deepspeed_config", str(path))


def test_a_changed_mixture_on_resume_is_one_line(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    weighted = ["--train_dir", str(a), str(b), "--max_steps", "50"]
    saved = plan_of(tmp_path, *weighted, "--train_weights", "0.6", "0.4")[0].to_dict()
    assert compare(saved, plan_of(tmp_path, *weighted, "--train_weights", "3", "2")[0]) == ([], [])  # same shares
    assert compare(saved, plan_of(tmp_path, *weighted, "--train_weights", "0.3", "0.7")[0]) == ([], [
        f"the training mixture changed from {a}:0.6 {b}:0.4 to {a}:0.3 {b}:0.7: training goes on from the samples "
        "consumed, drawn from the new mixture"])
    assert compare(saved, plan_of(tmp_path, *weighted)[0])[1] == [
        f"the training mixture changed from {a}:0.6 {b}:0.4 to {a}:by size {b}:by size: training goes on from the "
        "samples consumed, drawn from the new mixture"]
    older = {k: v for k, v in saved.items() if k != "mixture"}  # a checkpoint from before the field: nothing to say
    assert compare(older, plan_of(tmp_path, *weighted)[0]) == ([], [])
