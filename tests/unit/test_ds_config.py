"""The DeepSpeed config resolution: shipped configs, the flag/JSON precedence rule, and one-line errors (the
device's say on precision is tests/unit/test_precision.py; the final DeepSpeed dict is tests/unit/test_plan.py)."""

import json
import logging
import os

import pytest

from ds_mlm.args import parse_args
from ds_mlm.ds_config import find_config, requested_precision, resolve_ds_config, shipped_config_dirs
from ds_mlm.errors import UserError


def targs(tmp_path, *flags):
    """TrainingArguments as parse_args builds them (explicit_flags included)."""
    return parse_args(["--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *flags])[2]


def write_json(tmp_path, config, name="ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config) if not isinstance(config, str) else config)
    return str(path)


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
    parsed = DeepSpeedConfig(config)  # DeepSpeed's own validation (pydantic, batch assertion)
    assert parsed.zero_optimization_stage == int(name[4])


def test_default_is_zero2_bf16_with_flag_defaults(tmp_path):
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
    # the arguments are read, never written: the run plan reads the effective values from this dict
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed) == (
        2e-4, 8, 3, 42)


def test_precision_flags_choose_one_precision(tmp_path):
    bf16_json = write_json(tmp_path, {"bf16": {"enabled": True}})
    assert resolve_ds_config(targs(tmp_path, "--deepspeed_config", bf16_json, "--bf16", "false"), 1)["bf16"]["enabled"] is False
    config = resolve_ds_config(targs(tmp_path, "--deepspeed_config", "zero0.json", "--bf16"), 1)
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False


def test_fp16_flag_turns_the_jsons_bf16_off(tmp_path):
    config = resolve_ds_config(targs(tmp_path, "--fp16"), world_size=1)  # over zero2.json, whose bf16 is on
    assert (config["fp16"]["enabled"], config["bf16"]["enabled"]) == (True, False)
    assert requested_precision(config) == "fp16"  # what the device then makes of it: test_precision.py


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
    ([1, 2], "must be a JSON object"),
])
def test_bad_configs_are_user_errors(tmp_path, config, match):
    with pytest.raises(UserError, match=match):
        resolve_ds_config(targs(tmp_path, "--deepspeed_config", write_json(tmp_path, config)), 1)


def test_a_value_left_auto_is_refused_once_the_dict_is_whole(tmp_path):
    from ds_mlm.ds_config import deepspeed_config
    from ds_mlm.precision import Device

    args = targs(tmp_path, "--deepspeed_config", write_json(tmp_path, {"fp16": {"enabled": "auto", "loss_scale": "auto"}}))
    assert resolve_ds_config(args, 1)["fp16"]["loss_scale"] == "auto"  # the rule alone leaves it
    with pytest.raises(UserError, match="fp16.loss_scale is \"auto\" but no ds-mlm flag sets it"):
        deepspeed_config(args, 1, Device("cpu", fp16=False, bf16_native=True))


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


@pytest.mark.parametrize("optimizer, match", [
    ({"type": "Lamb"}, "optimizer Lamb has no CPU kernel in DeepSpeed .it needs a GPU.: use \"type\": \"AdamW\""),
    ({"type": "AdamX"}, "unknown optimizer type 'AdamX': use AdamW"),
    ({"type": "AdamW", "params": {"lr": -1e-4}}, "optimizer.params.lr is -0.0001: the learning rate must be a positive number"),
    ({"type": "AdamW", "params": {"lr": 0}}, "optimizer.params.lr is 0: the learning rate must be a positive number"),
])
def test_optimizers_deepspeed_would_reject_late_are_one_line(tmp_path, optimizer, match):
    path = write_json(tmp_path, {"optimizer": optimizer})
    with pytest.raises(UserError, match=match):
        resolve_ds_config(targs(tmp_path, "--deepspeed_config", path), world_size=1, device="cpu")


def test_a_gpu_only_optimizer_passes_on_a_gpu_and_torch_optimizers_pass_everywhere(tmp_path):
    lamb = write_json(tmp_path, {"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, name="lamb.json")
    assert resolve_ds_config(targs(tmp_path, "--deepspeed_config", lamb), 1, device="cuda")["optimizer"]["type"] == "Lamb"
    sgd = write_json(tmp_path, {"optimizer": {"type": "SGD", "params": {"lr": 1e-3}}}, name="sgd.json")
    assert resolve_ds_config(targs(tmp_path, "--deepspeed_config", sgd), 1)["optimizer"]["type"] == "SGD"


def test_unknown_scheduler_type_is_one_line(tmp_path):
    path = write_json(tmp_path, {"scheduler": {"type": "WarmupDecayLRR", "params": {}}})
    with pytest.raises(UserError, match="unknown scheduler type 'WarmupDecayLRR': use one of LRRangeTest, .*WarmupDecayLR"):
        resolve_ds_config(targs(tmp_path, "--deepspeed_config", path), world_size=1)


def test_unknown_top_level_key_is_a_warning_naming_the_closest(tmp_path, caplog):
    path = write_json(tmp_path, {"trian_batch_size": 8, "zero_optimisation": {"stage": 1}, "xyzzy": 1})
    with caplog.at_level(logging.WARNING, logger="ds_mlm.ds_config"):
        resolve_ds_config(targs(tmp_path, "--deepspeed_config", path), world_size=1)
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warnings == [f"ds_config: {path}: unknown key \"trian_batch_size\" is ignored (did you mean "
                        "\"train_batch_size\"?)",
                        f"ds_config: {path}: unknown key \"xyzzy\" is ignored",
                        f"ds_config: {path}: unknown key \"zero_optimisation\" is ignored (did you mean "
                        "\"zero_optimization\"?)"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_have_no_unknown_key(name, caplog):
    with caplog.at_level(logging.WARNING, logger="ds_mlm.ds_config"):
        resolve_ds_config(parse_args(["--train_dir", ".", "--output_dir", "o", "--deepspeed_config", name])[2], 1)
    assert not [r for r in caplog.records if "unknown key" in r.getMessage()]
