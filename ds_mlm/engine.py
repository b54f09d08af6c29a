"""The DeepSpeed engine of a run: `deepspeed.initialize` around the model, with the plan's config, parameter groups
and learning-rate schedule.

    engine = build_engine(plan, model, load_universal=False)

`load_universal` adds DeepSpeed's `"checkpoint": {"load_universal": true}` (read at initialize time) when the
resumed checkpoint was saved by another number of processes (checkpointer.py). Without a JSON `scheduler` block
the schedule is HF's (optim.Schedule); with one it is DeepSpeed's own.
"""

import copy

from ds_mlm.optim import Schedule, param_groups


def build_engine(plan, model, load_universal: bool = False):
    import deepspeed

    config = copy.deepcopy(plan.ds_config)
    if load_universal:
        config.setdefault("checkpoint", {})["load_universal"] = True
    schedule = None
    if not plan.schedule.startswith("deepspeed:"):
        def schedule(optimizer):
            return Schedule(optimizer, plan.schedule, plan.learning_rate, plan.warmup_steps, plan.max_steps)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, plan.weight_decay),
                                      config=config, lr_scheduler=schedule)
    return engine
