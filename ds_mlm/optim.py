"""The optimizer's parameter groups and the learning-rate schedule, both read from the run plan.

Groups: AdamW with weight decay on the matrices and embeddings, none on biases and LayerNorm weights (as HF's
Trainer, which the ancestor used). Each group carries its name ("decay" / "no_decay"), so the plan's values can be
put back into the right group after a checkpoint load (`apply_hyperparameters`): a torch optimizer's state dict
restores the OLD lr, betas, eps and weight decay, and a resumed run must train with the values it announces.

Schedule: HF's schedules (linear, cosine, constant_with_warmup: what the ancestor's Trainer used), as a function of
the optimizer step. Its only state is the number of steps taken, so a resumed run follows its own plan: a new
--learning_rate, --warmup_steps or --max_steps applies from the next step (DeepSpeed's WarmupDecayLR differs: its
warm-up is at least 2 steps and starts at warmup_min_lr; a JSON `scheduler` block chooses it instead).
"""

import math

import torch

DECAY, NO_DECAY = "decay", "no_decay"


def param_groups(model, weight_decay: float) -> list:
    """The `model_parameters` of deepspeed.initialize, in a fixed order; tied weights appear once."""
    no_decay = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            if p_name == "bias" or isinstance(module, torch.nn.LayerNorm):
                no_decay.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if name in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": DECAY},
            {"params": plain, "weight_decay": 0.0, "name": NO_DECAY}]


def apply_hyperparameters(engine, plan) -> None:
    """Put the plan's lr, betas, eps and weight decay into every group (a checkpoint load restored the old ones:
    DeepSpeed loads the optimizer's partitions after the schedule, so even the lr must be set again)."""
    if isinstance(engine.lr_scheduler, Schedule):
        engine.lr_scheduler.apply()  # the plan's lr at the loaded step
    if plan.optimizer.lower() not in ("adam", "adamw"):
        return
    for group in engine.optimizer.param_groups:
        group["weight_decay"] = plan.weight_decay if group.get("name", DECAY) == DECAY else 0.0
        group["betas"] = tuple(plan.betas)
        group["eps"] = plan.eps


def multiplier(kind: str, step: int, warmup: int, total: int) -> float:
    """HF's lr factor at `step` (0-based: the factor the step is taken with)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total - step) / max(1, total - warmup))  # linear


class Schedule:
    """lr = peak x multiplier(step); `step()` after each optimizer step (DeepSpeed calls it); state = the step."""

    def __init__(self, optimizer, kind: str, peak_lr: float, warmup: int, total: int):
        self.optimizer, self.kind, self.peak_lr, self.warmup, self.total = optimizer, kind, peak_lr, warmup, total
        self.steps = 0
        self.apply()

    def lr_at(self, step: int) -> float:
        return self.peak_lr * multiplier(self.kind, step, self.warmup, self.total)

    def apply(self) -> None:
        """Set every group's lr to the schedule's value at the current step."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.steps)

    def step(self, *args, **kwargs) -> None:
        self.steps += 1
        self.apply()

    def get_last_lr(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    get_lr = get_last_lr

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        # our state, or a torch LambdaLR's (an older ds-mlm checkpoint): the step count only, never its base_lrs
        self.steps = int(state.get("steps", state.get("last_epoch", 0)))
        self.apply()

    def describe(self) -> str:
        end = {"linear": f"decays linearly to 0 at step {self.total}",
               "cosine": f"decays as a cosine to 0 at step {self.total}",
               "constant_with_warmup": "then stays constant"}[self.kind]
        warm = f"warm-up over {self.warmup} steps, " if self.warmup else ""
        return f"peak lr {self.peak_lr:.3g}, {warm}{end}"
