"""The DeepSpeed config of a run: a JSON file from `ds_configs/`, with the command-line flags folded in by one rule.

The precedence rule (also in ds_configs/README.md), for every setting that is both a flag and a JSON key:

    1. a flag given on the command line wins;
    2. otherwise a JSON value of "auto" (or a missing key) takes the flag's default;
    3. otherwise the JSON value stands.

Each time a given flag replaces a different value written in the JSON, one log line says so. `resolve_ds_config` is
the JSON the flags have spoken into; `deepspeed_config` adds what depends on the device (precision.py) and ds-mlm's
optimizer choice, checks it once and has DeepSpeed validate it; `with_total_steps` adds the step count once the data
are known. This module is the one writer of the DeepSpeed dict; `plan.make_plan` reads the run's effective settings
from it (nothing is written back into the arguments).
Flag -> JSON key:

    --per_device_train_batch_size  train_micro_batch_size_per_gpu     --max_grad_norm  gradient_clipping
    --gradient_accumulation_steps  gradient_accumulation_steps        --fp16           fp16.enabled
    --learning_rate                optimizer.params.lr                --bf16           bf16.enabled
    --weight_decay                 optimizer.params.weight_decay      --seed           seed (a ds-mlm key; DeepSpeed ignores it)
    --adam_beta1, --adam_beta2     optimizer.params.betas[0], [1]     --warmup_steps   scheduler.params.warmup_num_steps
    --adam_epsilon                 optimizer.params.eps               --max_steps      scheduler.params.total_num_steps

`train_batch_size` has no flag: "auto" (or missing) means micro x grad_acc x world; any other value must equal that
product. The scheduler keys only matter when the JSON has a `scheduler` block; without one (the shipped configs)
ds-mlm builds HF's schedule from `--lr_scheduler_type`, `--warmup_steps` and the step count (optim.py).

What DeepSpeed would only reject deep inside `deepspeed.initialize` (or accept and ignore) is checked here, as one
line: an optimizer or scheduler type it does not know, one that has no CPU kernel on a CPU, a learning rate <= 0,
an inconsistent batch; a top-level key it does not know (a typo such as `trian_batch_size`) is a warning naming the
closest valid key.
"""

import copy
import difflib
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


def _resolve_precision(config: dict, r: _Resolver) -> None:
    """fp16/bf16 as one choice: a given --fp16 turns bf16 off and vice versa (the device's say comes later: precision.py)."""
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


def requested_precision(config: dict) -> str:
    """The precision the JSON and flags ask for (before the device has its say)."""
    return "fp16" if config["fp16"]["enabled"] else "bf16" if config["bf16"]["enabled"] else "fp32"


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


# DeepSpeed's own optimizer names (deepspeed/runtime/config.py); any torch.optim class name works too.
DEEPSPEED_OPTIMIZERS = ("adam", "adamw", "lamb", "onebitadam", "zerooneadam", "onebitlamb", "adagrad", "lion",
                        "muon", "muadam", "muadamw", "musgd")
NO_CPU_KERNEL = ("lamb", "lion", "onebitadam", "zerooneadam", "onebitlamb")  # "not been implemented on CPU backend"
DEEPSPEED_SCHEDULERS = ("LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
# DeepSpeed's top-level keys (its config reference), and ds-mlm's "seed": anything else is probably a typo.
KNOWN_KEYS = frozenset((
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "flops_profiler",
    "activation_checkpointing", "sparse_attention", "tensorboard", "wandb", "csv_monitor", "comet", "elasticity",
    "communication_data_type", "seq_parallel_communication_data_type", "data_types", "checkpoint", "aio",
    "autotuning", "compression_training", "data_efficiency", "curriculum_learning", "quantize_training",
    "weight_quantization", "pipeline", "progressive_layer_drop", "hybrid_engine", "compile", "eigenvalue",
    "dataloader_drop_last", "disable_allgather", "gradient_allreduce_op", "managed_gradient_accumulation",
    "tensor_parallel", "expert_parallel", "use_data_before_expert_parallelism", "vocabulary_size",
    "timers", "graph_harvesting", "nebula", "mics_shard_size", "mics_hierarchical_params_gather", "seed"))


def _check_keys(config: dict, path: str) -> None:
    for key in sorted(set(config) - KNOWN_KEYS):
        close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.6)
        log.warning("ds_config: %s: unknown key \"%s\" is ignored%s", path, key,
                    f" (did you mean \"{close[0]}\"?)" if close else "")


def _check_optimizer_type(kind: str, path: str, device: str) -> None:
    import torch

    name = kind.lower()
    if name not in DEEPSPEED_OPTIMIZERS and not isinstance(getattr(torch.optim, kind, None), type):
        raise UserError(f"{path}: unknown optimizer type {kind!r}: use AdamW (or another DeepSpeed optimizer, or "
                        "a torch.optim class name)")
    if device == "cpu" and name in NO_CPU_KERNEL:
        raise UserError(f"{path}: optimizer {kind} has no CPU kernel in DeepSpeed (it needs a GPU): use \"type\": "
                        "\"AdamW\" on a CPU")


def _resolve_optimizer(config: dict, r: _Resolver, device: str) -> None:
    opt = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if not isinstance(opt, dict) or not isinstance(opt.get("params", {}), dict):
        raise UserError(f"{r.path}: \"optimizer\" must be an object like {{\"type\": \"AdamW\", \"params\": {{...}}}}")
    kind = str(opt.setdefault("type", "AdamW"))
    _check_optimizer_type(kind, r.path, device)
    params = opt.setdefault("params", {})
    lr = r.resolve("learning_rate", params, "lr", "optimizer.params.lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"{r.path}: optimizer.params.lr is {lr!r}: the learning rate must be a positive number "
                        "(or \"auto\": --learning_rate)")
    if kind.lower() not in ("adam", "adamw"):
        log.info("ds_config: optimizer %s: --weight_decay/--adam_* apply to Adam/AdamW only", kind)
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
    if kind not in DEEPSPEED_SCHEDULERS:
        raise UserError(f"{r.path}: unknown scheduler type {kind!r}: use one of {', '.join(DEEPSPEED_SCHEDULERS)}, "
                        "or drop the \"scheduler\" block for HF's schedules (--lr_scheduler_type)")
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
    # total_num_steps "auto" without --max_steps is filled by the run plan, which knows the epoch length


def leftover_auto(node, where=""):
    """The first key still "auto" in a config, or None."""
    if node == AUTO:
        return where
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found = leftover_auto(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def resolve_ds_config(args, world_size: int, device: str = "cpu") -> dict:
    """The `--deepspeed_config` JSON with the flags applied by the rule; `args` is read, never written."""
    path = find_config(args.deepspeed_config)
    config = copy.deepcopy(load_json(path))
    _check_keys(config, path)
    r = _Resolver(config, args, path)
    _resolve_zero(config, path)
    _resolve_precision(config, r)
    _resolve_optimizer(config, r, device)
    _resolve_batch(config, r, world_size)
    r.resolve("max_grad_norm", config, "gradient_clipping", "gradient_clipping")
    seed = r.resolve("seed", config, "seed", "seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"{path}: seed is {seed!r}: it must be an integer >= 0 (or \"auto\")")
    _resolve_scheduler(config, r)
    return config


def deepspeed_config(args, world_size: int, device, max_steps=None):
    """(the dict deepspeed.initialize gets, the precision the run trains in, the warning to print once when the
    device changed the precision, or None): the rule above, the device's say (precision.py), ds-mlm's optimizer
    choice, then one check for a value left "auto" and DeepSpeed's own validation. `device`: a precision.Device;
    `max_steps`: the step count for a JSON scheduler's "auto" total_num_steps (None until the data are known:
    `with_total_steps`). The one writer of the DeepSpeed dict."""
    from ds_mlm.precision import choose

    source = find_config(args.deepspeed_config)
    config = resolve_ds_config(args, world_size, device.name)
    precision, warning = choose(requested_precision(config), device)
    config["fp16"]["enabled"], config["bf16"]["enabled"] = precision == "fp16", precision == "bf16"
    params = config["optimizer"]["params"]
    offload = config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    if str(config["optimizer"]["type"]).lower() in ("adam", "adamw") and not offload:
        # torch.optim.AdamW(fused=True): nothing to JIT-compile (DeepSpeed's FusedAdam takes ~50 s on CPU and does
        # not resume bit-exactly there), and on CPU 5x faster per step than the foreach one (bench/train.py)
        if params.setdefault("torch_adam", True):
            params.setdefault("fused", True)
    sched = config.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == AUTO:
        sched["total_num_steps"] = max_steps  # None until the data are known (with_total_steps)
    leftover = leftover_auto(config)  # the one check: the flags, the device and the plan had their say
    if leftover:
        raise UserError(f"{source}: {leftover} is \"auto\" but no ds-mlm flag sets it: write a value")
    _deepspeed_accepts(config, source)
    return config, precision, warning


def with_total_steps(config: dict, max_steps: int) -> dict:
    """The dict once the step count is known: a JSON scheduler's total_num_steps left "auto" gets it (a copy)."""
    config = copy.deepcopy(config)
    sched = config.get("scheduler", {}).get("params", {})
    if "total_num_steps" in sched and sched["total_num_steps"] is None:
        sched["total_num_steps"] = max_steps
    return config


def _deepspeed_accepts(config: dict, source: str) -> None:
    """DeepSpeed's own validation (pydantic: unknown or mistyped keys inside its blocks), before anything is written,
    instead of a traceback from deepspeed.initialize later. The batch arithmetic was checked already; without a
    process group DeepSpeed counts a world of one (and a test may plan for another world than its own), so it is given
    the batch of the world it will count."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig

    from ds_mlm import distributed

    checked = copy.deepcopy(config)
    sched = checked.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps", 0) is None:
        sched["total_num_steps"] = 1  # a stand-in until the step count is known
    world = torch.distributed.get_world_size() if distributed.initialized() else 1  # the world DeepSpeed will count
    checked["train_batch_size"] = checked["train_micro_batch_size_per_gpu"] * checked["gradient_accumulation_steps"] * world
    try:
        DeepSpeedConfig(checked)
    except Exception as e:  # noqa: BLE001 (pydantic's ValidationError, ValueError, AssertionError...)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"{source}: DeepSpeed rejects this config ({'; '.join(lines[:3])[:300]}): fix or remove "
                        "that key") from None
