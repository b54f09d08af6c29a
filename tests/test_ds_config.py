"""The DeepSpeed config resolution: shipped configs, the flag/JSON precedence rule, and one-line errors."""

import json
import logging
import os

import pytest
import torch

from ds_mlm.args import parse_args
from ds_mlm.ds_config import (find_config, param_groups, resolve_ds_config, shipped_config_dirs,
                              write_resolved_config)
from ds_mlm.errors import UserError


def targs(tmp_path, *flags):
    """TrainingArguments as parse_args builds them (explicit_flags included)."""
    return parse_args(["--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *flags])[2]


def write_json(tmp_path, config, name="ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config) if not isinstance(config, str) else config)
    return str(path)


@pytest.fixture
def cpu_bf16(monkeypatch):
    """cpu_bf16(native): make this CPU one with (True) or without (False) AVX512-BF16/AMX, whichever CI runs on."""
    import ds_mlm.ds_config

    def set_native(native: bool):
        monkeypatch.setattr(ds_mlm.ds_config, "bf16_native", lambda acc: native)

    return set_native


SHIPPED = ["zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero2_fp16.json", "zero2_offload.json",
           "zero3_offload.json"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_resolves_and_deepspeed_accepts_it(tmp_path, monkeypatch, name):
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.chdir(tmp_path)  # found from any cwd by its bare name
    args = targs(tmp_path, "--deepspeed_config", name)
    config = resolve_ds_config(args, world_size=1)  # DeepSpeedConfig sees a world of one without a process group
    assert config["train_batch_size"] == 8
    assert not (config["fp16"]["enabled"] and config["bf16"]["enabled"])
    assert config["optimizer"]["params"]["torch_adam"] is True  # CPU: no FusedAdam JIT
    parsed = DeepSpeedConfig(config)  # DeepSpeed's own validation (pydantic, batch assertion)
    assert parsed.zero_optimization_stage == int(name[4])


def test_default_is_zero2_bf16_with_flag_defaults(tmp_path, cpu_bf16):
    cpu_bf16(True)
    args = targs(tmp_path)
    config = resolve_ds_config(args, world_size=1)
    assert find_config(None).endswith("zero2.json") and config["zero_optimization"]["stage"] == 2
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    params = config["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["eps"], params["weight_decay"]) == (5e-5, [0.9, 0.999], 1e-8, 0.0)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"], config["seed"]) == (8, 1, 8, 1.0, 42)


def test_precedence_given_flag_wins_json_value_stands_auto_takes_default(tmp_path, caplog):
    path = write_json(tmp_path, {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto", "gradient_clipping": 0.5,
        "seed": 7, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.8, "auto"], "eps": "auto",
                                                              "weight_decay": 0.1}},
        "zero_optimization": {"stage": 1}})
    args = targs(tmp_path, "--deepspeed_config", path, "--learning_rate", "2e-4", "--gradient_accumulation_steps",
                 "3", "--adam_beta2", "0.98")
    with caplog.at_level(logging.INFO, logger="ds_mlm.ds_config"):
        config = resolve_ds_config(args, world_size=2)
    params = config["optimizer"]["params"]
    assert params["lr"] == 2e-4  # given flag beats a JSON number, and says so once
    assert [r.getMessage() for r in caplog.records].count(
        f"ds_config: --learning_rate 0.0002 overrides optimizer.params.lr = 0.001 from {path}") == 1
    assert config["gradient_accumulation_steps"] == 3  # given flag fills "auto"
    assert params["betas"] == [0.8, 0.98]  # JSON number stands (flag not given); given flag fills "auto"
    assert params["eps"] == 1e-8  # "auto", flag not given: the flag's default
    assert (config["train_micro_batch_size_per_gpu"], params["weight_decay"], config["gradient_clipping"],
            config["seed"]) == (4, 0.1, 0.5, 7)  # JSON numbers stand
    assert config["train_batch_size"] == 4 * 3 * 2
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False  # missing: flag defaults
    # the effective values are written back, so the rest of the run sees what DeepSpeed runs
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed,
            args.weight_decay, args.adam_beta1, args.max_grad_norm) == (2e-4, 4, 3, 7, 0.1, 0.8, 0.5)


def test_precision_flags_choose_one_precision(tmp_path, cpu_bf16):
    cpu_bf16(True)
    bf16_json = write_json(tmp_path, {"bf16": {"enabled": True}})
    assert resolve_ds_config(targs(tmp_path, "--deepspeed_config", bf16_json, "--bf16", "false"), 1)["bf16"]["enabled"] is False
    config = resolve_ds_config(targs(tmp_path, "--deepspeed_config", "zero0.json", "--bf16"), 1)
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False


@pytest.mark.parametrize("native", [True, False])
def test_fp16_on_a_cpu_runs_bf16_where_native_else_fp32_with_one_warning(tmp_path, caplog, cpu_bf16, native):
    from deepspeed.accelerator import get_accelerator

    assert not get_accelerator().is_fp16_supported()  # the premise (shared/notes/deepspeed-on-cpu.md)
    cpu_bf16(native)
    args = targs(tmp_path, "--fp16")  # over zero2.json, whose bf16 is on: the flag names the precision
    with caplog.at_level(logging.WARNING, logger="ds_mlm.ds_config"):
        config = resolve_ds_config(args, world_size=1)
    assert config["fp16"]["enabled"] is False and config["bf16"]["enabled"] is native
    assert args.bf16 is native and args.fp16 is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["fp16 is not supported on this cpu: training in bf16 instead (pass --bf16 to say so)" if native
                        else "fp16 is not supported on this cpu: training in fp32 instead (emulated without "
                             "AVX512-BF16 or AMX, 10-40x slower than fp32)"]


def test_bf16_on_a_cpu_that_emulates_it_runs_fp32_with_one_warning(tmp_path, caplog, cpu_bf16):
    cpu_bf16(False)
    with caplog.at_level(logging.WARNING, logger="ds_mlm.ds_config"):
        config = resolve_ds_config(targs(tmp_path), world_size=1)  # zero2.json: bf16 on
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "bf16 is emulated without AVX512-BF16 or AMX, 10-40x slower than fp32 on this cpu: training in fp32"]


def test_bf16_native_asks_onednn_on_a_cpu(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from ds_mlm.ds_config import bf16_native

    for answer in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda answer=answer: answer)
        assert bf16_native(get_accelerator()) is answer  # not DeepSpeed's CPU answer, which is always yes


def test_fp16_kept_where_the_device_supports_it(tmp_path, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)  # as on a GPU
    config = resolve_ds_config(targs(tmp_path, "--deepspeed_config", "zero2_fp16.json"), world_size=1)
    assert config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False
    assert config["fp16"]["loss_scale"] == 0  # dynamic loss scale


def test_inconsistent_batch_is_one_line_naming_the_numbers_and_the_flag(tmp_path):
    path = write_json(tmp_path, {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8})
    with pytest.raises(UserError) as e:
        resolve_ds_config(targs(tmp_path, "--deepspeed_config", path, "--gradient_accumulation_steps", "2"), 2)
    message = str(e.value)
    assert "\n" not in message
    assert f"train_batch_size 64 in {path} != micro batch 8 x gradient accumulation 2 x world size 2 = 32" in message
    assert "--gradient_accumulation_steps" in message


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = write_json(tmp_path, '{\n  "train_batch_size": "auto",\n  "bf16": {"enabled": true,}\n}\n')
    with pytest.raises(UserError, match=rf"^{path}:3:28: malformed JSON \(") as e:  # 3:28 is the "}" after ","
        resolve_ds_config(targs(tmp_path, "--deepspeed_config", path), 1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config, match", [
    ({"zero_optimization": {"stage": 4}}, "unknown ZeRO stage 4: zero_optimization.stage must be 0, 1, 2 or 3"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enables both fp16 and bf16"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu is 0: it must be a positive integer"),
    ({"fp16": {"enabled": "auto", "loss_scale": "auto"}}, "fp16.loss_scale is \"auto\" but no ds-mlm flag sets it"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_configs_are_user_errors(tmp_path, config, match):
    with pytest.raises(UserError, match=match):
        resolve_ds_config(targs(tmp_path, "--deepspeed_config", write_json(tmp_path, config)), 1)


def test_missing_config_lists_the_shipped_ones(tmp_path):
    with pytest.raises(UserError, match="no such file.*zero2.json"):
        resolve_ds_config(targs(tmp_path, "--deepspeed_config", "zero9.json"), 1)
    assert os.path.isfile(os.path.join(shipped_config_dirs()[0], "zero2.json"))  # the repo's ds_configs/


def test_json_scheduler_block_gets_its_auto_values(tmp_path):
    path = write_json(tmp_path, {"scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto"}}})
    args = targs(tmp_path, "--deepspeed_config", path, "--warmup_steps", "5", "--max_steps", "50",
                 "--learning_rate", "1e-3")
    params = resolve_ds_config(args, 1)["scheduler"]["params"]
    assert params == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 5, "total_num_steps": 50}


def test_written_config_is_the_resolved_one(tmp_path):
    config = resolve_ds_config(targs(tmp_path), 1)
    path = write_resolved_config(config, str(tmp_path / "out"))
    assert json.loads(open(path).read()) == config
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ds_config.json"]  # no temp file left


def test_param_groups_spare_biases_and_layernorm_from_weight_decay():
    from transformers import RobertaConfig, RobertaForMaskedLM

    model = RobertaForMaskedLM(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32))
    decay, plain = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] or "layer_norm" in names[id(p)]
               for p in plain["params"])
    assert all(p.dim() == 2 for p in decay["params"])  # the matrices and embeddings, nothing else
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())


def test_a_json_scheduler_without_warmup_keys_follows_the_flags(tmp_path):
    path = write_json(tmp_path, {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3}}})
    config = resolve_ds_config(targs(tmp_path, "--deepspeed_config", path, "--warmup_steps", "7", "--max_steps", "50",
                                     "--learning_rate", "3e-4"), world_size=1)
    assert config["scheduler"]["params"] == {"warmup_max_lr": 3e-4, "warmup_num_steps": 7, "total_num_steps": 50}
    warmup_only = write_json(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {}}}, name="w.json")
    params = resolve_ds_config(targs(tmp_path, "--deepspeed_config", warmup_only, "--warmup_steps", "3"), 1)[
        "scheduler"]["params"]
    assert params == {"warmup_num_steps": 3}  # WarmupLR takes no total_num_steps


def test_malformed_betas_are_one_line(tmp_path):
    path = write_json(tmp_path, {"optimizer": {"type": "AdamW", "params": {"betas": 0.9}}})
    with pytest.raises(UserError, match="optimizer.params.betas must be a list of two numbers"):
        resolve_ds_config(targs(tmp_path, "--deepspeed_config", path), world_size=1)
