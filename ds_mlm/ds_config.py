"""The DeepSpeed config of a run: a JSON file from `ds_configs/`, with the command-line flags folded in by one rule.

The precedence rule (also in ds_configs/README.md), for every setting that is both a flag and a JSON key:

    1. a flag given on the command line wins;
    2. otherwise a JSON value of "auto" (or a missing key) takes the flag's default;
    3. otherwise the JSON value stands.

Each time a given flag replaces a different value written in the JSON, one log line says so. The effective values
are written back into `TrainingArguments`, so the rest of the run (model seed, step count, schedule) sees one truth.
Flag -> JSON key:

    --per_device_train_batch_size  train_micro_batch_size_per_gpu     --max_grad_norm  gradient_clipping
    --gradient_accumulation_steps  gradient_accumulation_steps        --fp16           fp16.enabled
    --learning_rate                optimizer.params.lr                --bf16           bf16.enabled
    --weight_decay                 optimizer.params.weight_decay      --seed           seed (a ds-mlm key; DeepSpeed ignores it)
    --adam_beta1, --adam_beta2     optimizer.params.betas[0], [1]     --warmup_steps   scheduler.params.warmup_num_steps
    --adam_epsilon                 optimizer.params.eps               --max_steps      scheduler.params.total_num_steps

`train_batch_size` has no flag: "auto" (or missing) means micro x grad_acc x world; any other value must equal that
product. The scheduler keys only matter when the JSON has a `scheduler` block; without one (the shipped configs)
ds-mlm builds HF's schedule from `--lr_scheduler_type`, `--warmup_steps` and the step count (see trainer.py).

Precision: where the accelerator cannot do fp16 (most CPUs), fp16 becomes bf16, and where it cannot do bf16 at speed
either (a CPU without AVX512-BF16 or AMX emulates it), fp32, each with a one-line warning; bf16 asked for on such a
device also runs in fp32. On a CPU accelerator the AdamW is `torch.optim.AdamW` (`"torch_adam": true`)
unless the JSON says otherwise: DeepSpeed's FusedAdam JIT-compiles for ~50 s there and its resume is not bit-exact.
"""

import copy
import json
import logging
import os
import sys

from ds_mlm.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "zero2.json"
AUTO = "auto"
_MISSING = object()


def shipped_config_dirs() -> list:
    """Where the shipped configs live: beside the package in a checkout, or under the prefix of an installed one."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(os.path.dirname(here), "ds_configs"),  # repo checkout / editable install
            os.path.join(sys.prefix, "share", "ds-mlm", "ds_configs")]  # setup.py data_files


def find_config(path) -> str:
    """The config file to read: the given path, else a shipped config of that name, else the default (zero2.json)."""
    if path and os.path.isfile(path):
        return path
    name = path or DEFAULT_CONFIG
    if os.sep not in name:  # `--deepspeed_config zero3.json` also finds the shipped one from any cwd
        for folder in shipped_config_dirs():
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate):
                return candidate
    shipped = sorted({f for d in shipped_config_dirs() if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".json")})
    raise UserError(f"--deepspeed_config {name}: no such file; give a DeepSpeed JSON file"
                    + (f" or one of the shipped configs: {', '.join(shipped)}" if shipped else ""))


def load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read --deepspeed_config {path}: {e.strerror}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}): fix the file "
                        "(JSON has no comments and no trailing commas)") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a DeepSpeed config must be a JSON object {{...}}, not {type(config).__name__}")
    return config


class _Resolver:
    """Applies the precedence rule key by key and remembers what it did."""

    def __init__(self, config: dict, args, path: str):
        self.config, self.args, self.path = config, args, path
        self.given = set(args.explicit_flags)

    def resolve(self, flag: str, parent: dict, key, label: str, value=_MISSING):
        """Set parent[key] by the rule; `value` is the flag's value (default: getattr(args, flag)). Returns it."""
        flag_value = getattr(self.args, flag) if value is _MISSING else value
        current = parent[key] if _has(parent, key) else _MISSING
        if flag in self.given:
            if current not in (_MISSING, AUTO) and current != flag_value:
                log.info("ds_config: --%s %s overrides %s = %s from %s", flag, flag_value, label, current, self.path)
            parent[key] = flag_value
        elif current in (_MISSING, AUTO):
            parent[key] = flag_value
        return parent[key]


def _has(parent, key) -> bool:
    return key < len(parent) if isinstance(parent, list) else key in parent


def _positive_int(value, label: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: {label} is {value!r}: it must be a positive integer (or \"auto\")")
    return value


def _enabled(block) -> bool:
    return isinstance(block, dict) and block.get("enabled") is True


_EMULATED = "emulated without AVX512-BF16 or AMX, 10-40x slower than fp32"


def _resolve_precision(config: dict, r: _Resolver) -> None:
    """fp16/bf16 as one choice: a given --fp16 turns bf16 off and vice versa; then fall back to what the device can do."""
    for name, other in (("fp16", "bf16"), ("bf16", "fp16")):
        block = config.setdefault(name, {})
        if not isinstance(block, dict):
            raise UserError(f"{r.path}: \"{name}\" must be an object like {{\"enabled\": true}}")
        r.resolve(name, block, "enabled", f"{name}.enabled")
        if name in r.given and getattr(r.args, name):
            config.setdefault(other, {})["enabled"] = False  # the flag names the precision of the run
    for name in ("fp16", "bf16"):
        if config[name]["enabled"] not in (True, False):
            raise UserError(f"{r.path}: {name}.enabled is {config[name]['enabled']!r}: use true, false or \"auto\"")
    if config["fp16"]["enabled"] and config["bf16"]["enabled"]:
        raise UserError(f"{r.path} enables both fp16 and bf16: enable one of them (or pass --fp16 or --bf16)")

    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    device, native_bf16 = acc.device_name(), bf16_native(acc)
    speak = int(os.environ.get("RANK", "0")) == 0  # one warning per job, not one per rank
    if config["fp16"]["enabled"] and not acc.is_fp16_supported():
        config["fp16"]["enabled"] = False
        config["bf16"]["enabled"] = native_bf16
        if speak:
            log.warning("fp16 is not supported on this %s: training in %s instead%s", device,
                        "bf16" if native_bf16 else "fp32", " (pass --bf16 to say so)" if native_bf16 else
                        f" ({_EMULATED})" if device == "cpu" else " (nor is bf16)")
    if config["bf16"]["enabled"] and not native_bf16:
        config["bf16"]["enabled"] = False
        if speak:
            log.warning("bf16 is %s on this %s: training in fp32", _EMULATED if device == "cpu" else "not supported",
                        device)


def bf16_native(acc) -> bool:
    """Does the device compute bf16 at speed? DeepSpeed's CPU accelerator says yes on any CPU, but without
    AVX512-BF16 or AMX PyTorch emulates it (a 2048x128 by 128x8000 matmul with its backward: 0.16 s in fp32, 6.0 s in
    bf16 on an AVX2-only EPYC); oneDNN's own check tells the two apart."""
    if acc.device_name() == "cpu":
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(acc.is_bf16_supported())


def _resolve_zero(config: dict, path: str) -> int:
    zero = config.get("zero_optimization", {})
    if isinstance(zero, bool):  # the old spelling `"zero_optimization": true` meant stage 1
        zero = config["zero_optimization"] = {"stage": int(zero)}
    if not isinstance(zero, dict):
        raise UserError(f"{path}: \"zero_optimization\" must be an object like {{\"stage\": 2}}")
    stage = zero.setdefault("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"{path}: unknown ZeRO stage {stage!r}: zero_optimization.stage must be 0, 1, 2 or 3")
    config["zero_optimization"] = zero
    return stage


def _resolve_optimizer(config: dict, r: _Resolver) -> None:
    opt = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if not isinstance(opt, dict) or not isinstance(opt.get("params", {}), dict):
        raise UserError(f"{r.path}: \"optimizer\" must be an object like {{\"type\": \"AdamW\", \"params\": {{...}}}}")
    opt.setdefault("type", "AdamW")
    params = opt.setdefault("params", {})
    r.resolve("learning_rate", params, "lr", "optimizer.params.lr")
    if str(opt["type"]).lower() not in ("adam", "adamw"):
        log.info("ds_config: optimizer %s: --weight_decay/--adam_* apply to Adam/AdamW only", opt["type"])
        return
    r.resolve("weight_decay", params, "weight_decay", "optimizer.params.weight_decay")
    r.resolve("adam_epsilon", params, "eps", "optimizer.params.eps")
    betas = params.get("betas", AUTO)
    if betas != AUTO and not isinstance(betas, list):
        raise UserError(f"{r.path}: optimizer.params.betas must be a list of two numbers (or \"auto\"), got {betas!r}")
    betas = [AUTO, AUTO] if betas == AUTO else list(betas)
    if len(betas) != 2:
        raise UserError(f"{r.path}: optimizer.params.betas must be two numbers, got {params['betas']!r}")
    r.resolve("adam_beta1", betas, 0, "optimizer.params.betas[0]")
    r.resolve("adam_beta2", betas, 1, "optimizer.params.betas[1]")
    params["betas"] = betas

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":  # FusedAdam: 50 s JIT compile, resume not bit-exact (notes)
        params.setdefault("torch_adam", True)


def _resolve_batch(config: dict, r: _Resolver, world_size: int) -> None:
    micro = _positive_int(r.resolve("per_device_train_batch_size", config, "train_micro_batch_size_per_gpu",
                                    "train_micro_batch_size_per_gpu"), "train_micro_batch_size_per_gpu", r.path)
    grad_acc = _positive_int(r.resolve("gradient_accumulation_steps", config, "gradient_accumulation_steps",
                                       "gradient_accumulation_steps"), "gradient_accumulation_steps", r.path)
    product = micro * grad_acc * world_size
    total = config.get("train_batch_size", AUTO)
    if total == AUTO:
        config["train_batch_size"] = product
    elif total != product:  # DeepSpeed would assert deep inside initialize; say which number to change
        raise UserError(f"train_batch_size {total} in {r.path} != micro batch {micro} x gradient accumulation "
                        f"{grad_acc} x world size {world_size} = {product}: set \"train_batch_size\": \"auto\", "
                        f"or change --gradient_accumulation_steps (or --per_device_train_batch_size)")


def _resolve_scheduler(config: dict, r: _Resolver) -> None:
    """A JSON `scheduler` block (DeepSpeed's own schedule) gets its "auto" values from the flags."""
    sched = config.get("scheduler")
    if sched is None:
        return
    params = sched.setdefault("params", {}) if isinstance(sched, dict) else None
    if not isinstance(params, dict):
        raise UserError(f"{r.path}: \"scheduler\" must be an object like {{\"type\": \"WarmupDecayLR\", \"params\": {{...}}}}")
    kind = str(sched.get("type", ""))
    if kind.startswith("Warmup"):  # WarmupLR, WarmupDecayLR, WarmupCosineLR: a missing key is "auto"
        params.setdefault("warmup_num_steps", AUTO)
        if kind != "WarmupLR":
            params.setdefault("total_num_steps", AUTO)
    if "warmup_num_steps" in params:
        r.resolve("warmup_steps", params, "warmup_num_steps", "scheduler.params.warmup_num_steps")
    if params.get("warmup_max_lr") == AUTO or ("learning_rate" in r.given and "warmup_max_lr" in params):
        params["warmup_max_lr"] = config["optimizer"]["params"]["lr"]  # WarmupLR sets the rate from it
    if params.get("warmup_min_lr") == AUTO:
        params["warmup_min_lr"] = 0.0
    if "total_num_steps" in params and (r.args.max_steps > 0 or params["total_num_steps"] != AUTO):
        r.resolve("max_steps", params, "total_num_steps", "scheduler.params.total_num_steps")
    # total_num_steps "auto" without --max_steps is filled by the trainer, which knows the epoch length


def _write_back(config: dict, args) -> None:
    """The effective values, so that every later reader of `args` agrees with what DeepSpeed runs."""
    args.per_device_train_batch_size = config["train_micro_batch_size_per_gpu"]
    args.gradient_accumulation_steps = config["gradient_accumulation_steps"]
    args.max_grad_norm = config["gradient_clipping"]
    args.fp16, args.bf16 = config["fp16"]["enabled"], config["bf16"]["enabled"]
    args.seed = config["seed"]
    params = config["optimizer"]["params"]
    args.learning_rate = params["lr"]
    if "betas" in params:
        args.weight_decay, args.adam_epsilon = params["weight_decay"], params["eps"]
        args.adam_beta1, args.adam_beta2 = params["betas"]
    sched = config.get("scheduler", {}).get("params", {})
    if isinstance(sched.get("warmup_num_steps"), int):
        args.warmup_steps = sched["warmup_num_steps"]
    if isinstance(sched.get("total_num_steps"), int):
        args.max_steps = sched["total_num_steps"]


def _leftover_auto(node, where=""):
    if node == AUTO:
        return where
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found = _leftover_auto(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def resolve_ds_config(args, world_size: int) -> dict:
    """The config DeepSpeed will run with: the JSON of `--deepspeed_config` with the flags applied by the rule.

    Also writes the effective values back into `args` (call it before seeding and building the model).
    """
    path = find_config(args.deepspeed_config)
    config = copy.deepcopy(load_json(path))
    r = _Resolver(config, args, path)
    _resolve_zero(config, path)
    _resolve_precision(config, r)
    _resolve_optimizer(config, r)
    _resolve_batch(config, r, world_size)
    r.resolve("max_grad_norm", config, "gradient_clipping", "gradient_clipping")
    seed = r.resolve("seed", config, "seed", "seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"{path}: seed is {seed!r}: it must be an integer >= 0 (or \"auto\")")
    _resolve_scheduler(config, r)
    leftover = _leftover_auto({k: v for k, v in config.items() if k != "scheduler"})
    if leftover:
        raise UserError(f"{path}: {leftover} is \"auto\" but no ds-mlm flag sets it: write a value")
    _write_back(config, args)
    log.info("ds_config: %s, ZeRO-%d, %s, global batch %d", path, config["zero_optimization"]["stage"],
             precision(config), config["train_batch_size"])
    return config


def precision(config: dict) -> str:
    return "fp16" if config["fp16"]["enabled"] else "bf16" if config["bf16"]["enabled"] else "fp32"


def finalize_scheduler(config: dict, total_steps: int, path: str = "the DeepSpeed config") -> None:
    """Fill a JSON scheduler's total_num_steps "auto" once the trainer knows the step count; no "auto" may remain."""
    params = config.get("scheduler", {}).get("params", {})
    if params.get("total_num_steps") == AUTO:
        params["total_num_steps"] = total_steps
    leftover = _leftover_auto(config)
    if leftover:
        raise UserError(f"{path}: {leftover} is \"auto\" but no ds-mlm flag sets it: write a value")


def param_groups(model, weight_decay: float) -> list:
    """The `model_parameters` of deepspeed.initialize: AdamW groups, no weight decay on biases and LayerNorm weights
    (as HF's Trainer, which the ancestor used). Empty groups are dropped by DeepSpeed; the order is fixed."""
    import torch

    no_decay = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            if p_name == "bias" or isinstance(module, torch.nn.LayerNorm):
                no_decay.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    decay, plain = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if p.requires_grad:
            (plain if name in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def write_resolved_config(config: dict, output_dir: str) -> str:
    """Write `{output_dir}/ds_config.json` atomically (temp file, fsync, rename); call on rank 0."""
    from ds_mlm.checkpoint import atomic_write_text

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "ds_config.json")
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
