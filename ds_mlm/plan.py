"""The run plan: every effective setting of a run, derived once, by pure functions, from the flags, the ds_config
JSON, the device, the world and the data. Every module reads the plan; nothing writes back into the arguments.

    plan, warning = make_plan(model_args, data_args, train_args, device, world_size, config, tokenizer_id)
    plan = plan.with_data(train_samples)   # the step count, once the token store is known
    plan.ds_config            # the dict deepspeed.initialize gets (ds_config.py writes it; OUTPUT_DIR/ds_config.json)
    plan.to_dict()            # saved in every checkpoint's trainer_state.json
    refusals, notes = compare(saved_plan_dict, plan)   # on resume: what the run follows, warns about or refuses

What a resumed run does with a setting that changed since the checkpoint (one line each):

    follows   learning_rate, weight_decay, betas, eps, max_grad_norm, schedule, warmup_steps, max_steps,
              mlm_probability, whole_word_mask: the optimizer and the schedule take the new values from the next
              step (optim.py)
    elastic   world_size, micro_batch, grad_accumulation (same global batch): the same samples per step
              (sampler.py); another world size loads ZeRO partitions through a universal checkpoint (checkpointer.py)
    warns     global_batch: training goes on from the samples consumed, steps count batches of the new size;
              mixture (--train_dir sources, --train_weights shares): the samples to come are drawn from the new one
    refuses   precision, zero_stage, optimizer, seed, seq_length, model (its shapes), tokenizer, train_samples:
              the checkpoint's state does not fit (export it and warm-start instead)

Everything but the step count is known before the datasets are built, so a resume that will be refused is refused
before an hours-long build (compare() skips what is not known yet).
"""

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Tuple

from ds_mlm.ds_config import deepspeed_config, with_total_steps
from ds_mlm.precision import Device

MODEL_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size")


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    """Processes in the job."""
    micro_batch: int
    """Samples per micro-batch per process."""
    grad_accumulation: int
    """Micro-batches per optimizer step per process."""
    seq_length: int
    """Ids per sample at most (--max_seq_length)."""
    precision: str
    """What the run trains in (fp32, bf16, fp16), after the device had its say (precision.py)."""
    zero_stage: int
    """ZeRO stage 0-3."""
    optimizer: str
    """The JSON's optimizer type (AdamW unless it says otherwise)."""
    learning_rate: float
    """Peak learning rate."""
    weight_decay: float
    """Weight decay of the decay group (biases and LayerNorm weights get none)."""
    betas: Tuple[float, float]
    """Adam betas."""
    eps: float
    """Adam epsilon."""
    max_grad_norm: float
    """Gradient clipping norm (0: none)."""
    schedule: str
    """linear, cosine, constant_with_warmup (HF's), or deepspeed:<type> for a JSON scheduler block."""
    warmup_steps: int
    """Warm-up steps of the schedule."""
    max_steps: Optional[int]
    """Optimizer steps of the whole run (None until with_data)."""
    steps_per_epoch: Optional[int]
    """Optimizer steps in one pass over the training set, its ragged tail dropped (None until with_data)."""
    train_samples: Optional[int]
    """Samples in the training set (None until with_data)."""
    seed: int
    """Seed of the model init, the sample order and the masking."""
    mlm_probability: float
    """Share of tokens masked."""
    whole_word_mask: bool
    """Whole-word masking."""
    model: dict
    """The model's shapes (MODEL_SHAPE of its config); vocab_size counts the padded rows it trains with."""
    tokenizer: str
    """The tokenizer's fingerprint (vocabulary, specials, the ids of a probe text)."""
    output_dir: str
    """Checkpoints, logs and the final model."""
    logging_dir: str
    """TensorBoard events."""
    device: str
    """The accelerator (cpu, cuda, ...)."""
    torch_compile: bool
    """Is the encoder compiled (--torch_compile)?"""
    peak_tflops: Optional[float]
    """The device's dense bf16/fp16 peak for the logged mfu: --peak_tflops, else the GPU's row in flops.py."""
    ds_config: dict = field(repr=False)
    """The final DeepSpeed config: the JSON with the flags, the precision and the step count filled in."""
    num_train_epochs: float = field(default=0.0, repr=False)
    """--num_train_epochs, for the step count when --max_steps is not given."""
    mixture: Optional[list] = None
    """[[training source (absolute), its share of the samples (--train_weights, normalised) or None]]."""

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: micro_batch x grad_accumulation x world_size (the JSON's train_batch_size)."""
        return self.micro_batch * self.grad_accumulation * self.world_size

    @property
    def epochs(self) -> float:
        return self.max_steps / max(self.steps_per_epoch, 1)

    def with_data(self, train_samples: int) -> "RunPlan":
        """The plan once the training set is known: its step count, in the plan and in a JSON scheduler block."""
        steps_per_epoch = max(train_samples // self.global_batch, 1)
        max_steps = self.max_steps or max(math.ceil(self.num_train_epochs * steps_per_epoch), 1)
        return replace(self, train_samples=train_samples, steps_per_epoch=steps_per_epoch, max_steps=max_steps,
                       ds_config=with_total_steps(self.ds_config, max_steps))

    def to_dict(self) -> dict:
        """What a checkpoint records (trainer_state.json) and compare() reads: the fields, and the global batch
        (derived, but recorded as before so checkpoints of every version compare alike)."""
        out = asdict(self)
        out.pop("ds_config")
        out["betas"] = list(self.betas)
        out["global_batch"] = self.global_batch
        return out


def make_plan(model_args, data_args, train_args, device: Device, world_size: int, model_config,
              tokenizer_id: str = "") -> Tuple[RunPlan, Optional[str]]:
    """(the plan of this run before its data are known, the warning to print once when the device changed the
    precision, or None). The DeepSpeed dict comes from ds_config.deepspeed_config (its one writer); every field is
    read from it. `tokenizer_id`: the tokenizer's fingerprint (data.spec.tokenizer_fingerprint)."""
    from ds_mlm.flops import peak_tflops
    from ds_mlm.model import padded_vocab_size

    max_steps = train_args.max_steps if train_args.max_steps > 0 else None
    ds, precision, warning = deepspeed_config(train_args, world_size, device, max_steps)
    shapes = {k: getattr(model_config, k) for k in MODEL_SHAPE}
    shapes["vocab_size"] = padded_vocab_size(model_config.vocab_size, model_args.pad_vocab_multiple)
    opt = ds["optimizer"]
    params = opt["params"]
    sched = ds.get("scheduler")
    plan = RunPlan(
        world_size=world_size, micro_batch=ds["train_micro_batch_size_per_gpu"],
        grad_accumulation=ds["gradient_accumulation_steps"],
        seq_length=data_args.max_seq_length, precision=precision, zero_stage=ds["zero_optimization"]["stage"],
        optimizer=str(opt["type"]), learning_rate=float(params["lr"]),
        weight_decay=float(params.get("weight_decay", 0.0)),
        betas=tuple(float(b) for b in params.get("betas", (train_args.adam_beta1, train_args.adam_beta2))),
        eps=float(params.get("eps", train_args.adam_epsilon)), max_grad_norm=float(ds["gradient_clipping"]),
        schedule=f"deepspeed:{sched['type']}" if sched else train_args.lr_scheduler_type,
        warmup_steps=int(sched["params"].get("warmup_num_steps", 0)) if sched else train_args.warmup_steps,
        max_steps=max_steps, steps_per_epoch=None, train_samples=None, seed=ds["seed"],
        mlm_probability=data_args.mlm_probability, whole_word_mask=data_args.whole_word_mask,
        model=shapes, tokenizer=tokenizer_id,
        output_dir=train_args.output_dir, logging_dir=train_args.logging_dir, device=device.name,
        torch_compile=train_args.torch_compile,
        peak_tflops=train_args.peak_tflops or (peak_tflops(device.product, precision) if device.product else None),
        ds_config=ds, num_train_epochs=train_args.num_train_epochs, mixture=_mixture(data_args))
    return plan, warning


def _mixture(data_args) -> list:
    one = len(data_args.train_dir) == 1  # one source: its weight changes nothing
    weights = data_args.train_weights if data_args.train_weights and not one else [None] * len(data_args.train_dir)
    return [[os.path.abspath(d), w and round(w / sum(weights), 6)] for d, w in zip(data_args.train_dir, weights)]


# -- resume ---------------------------------------------------------------------------------------------------------

FOLLOW = ("learning_rate", "weight_decay", "betas", "eps", "max_grad_norm", "schedule", "warmup_steps", "max_steps",
          "mlm_probability", "whole_word_mask")
ELASTIC = ("world_size", "micro_batch", "grad_accumulation")
REFUSE = ("precision", "zero_stage", "optimizer", "seed", "seq_length", "model", "tokenizer", "train_samples")
_FLAG = {"learning_rate": "--learning_rate", "weight_decay": "--weight_decay", "betas": "--adam_beta1/2",
         "eps": "--adam_epsilon", "max_grad_norm": "--max_grad_norm", "schedule": "--lr_scheduler_type",
         "warmup_steps": "--warmup_steps", "max_steps": "--max_steps", "mlm_probability": "--mlm_probability",
         "whole_word_mask": "--whole_word_mask", "seed": "--seed", "seq_length": "--max_seq_length",
         "precision": "--fp16/--bf16 or the ds_config", "zero_stage": "the ds_config's ZeRO stage",
         "optimizer": "the ds_config's optimizer", "train_samples": "the training data", "model": "the model",
         "tokenizer": "the tokenizer"}


def compare(saved: dict, plan: RunPlan, known_before: Optional[RunPlan] = None):
    """(refusals, notes): one line per setting that differs from the checkpoint's plan (module docstring).
    `known_before`: the plan compared already (before the data were known): only what became known since is compared,
    so each setting is checked, and each note said, once."""
    now = plan.to_dict()
    before = known_before.to_dict() if known_before is not None else {}

    def differs(key):
        return key in saved and now[key] is not None and before.get(key) is None and saved[key] != now[key]

    refusals, notes = [], []
    for key in REFUSE:
        if differs(key):
            old, new = saved[key], now[key]
            if isinstance(old, dict):  # name only the shapes that differ
                differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                old, new = {k: old.get(k) for k in differ}, {k: new.get(k) for k in differ}
            refusals.append(f"{_FLAG[key]}: {_show(key, old)} in the checkpoint, {_show(key, new)} now")
    for key in FOLLOW:
        if differs(key):
            notes.append(f"{_FLAG[key]} changed from {_show(key, saved[key])} to {_show(key, now[key])}: the run "
                         "follows the new value")
    if known_before is not None:  # the batch is known before the data: said the first time
        return refusals, notes
    if saved.get("global_batch", plan.global_batch) != plan.global_batch:
        notes.append(f"the global batch changed from {saved['global_batch']} to {plan.global_batch} samples: "
                     "training goes on from the samples consumed, and steps now count batches of "
                     f"{plan.global_batch}")
    elif any(saved.get(k, now[k]) != now[k] for k in ELASTIC):
        was = "x".join(str(saved.get(k)) for k in ("micro_batch", "grad_accumulation", "world_size"))
        notes.append(f"micro batch x accumulation x processes changed from {was} to {plan.micro_batch}x"
                     f"{plan.grad_accumulation}x{plan.world_size} at the same global batch of {plan.global_batch}: "
                     "every step trains on the same samples as before")
    if saved.get("mixture", now["mixture"]) != now["mixture"]:  # a checkpoint older than the field has none
        notes.append(f"the training mixture changed from {_show('mixture', saved['mixture'])} to "
                     f"{_show('mixture', now['mixture'])}: training goes on from the samples consumed, drawn from "
                     "the new mixture")
    return refusals, notes


def _show(key, value) -> str:
    if key == "tokenizer":
        return f"fingerprint {str(value)[:12]}"
    if key == "mixture":  # --train_dir and --train_weights
        return " ".join(f"{d}:{'by size' if w is None else w}" for d, w in value)
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
