"""The DeepSpeed engine of a run: `deepspeed.initialize` around the model, with the plan's config, parameter groups
and learning-rate schedule.

    engine = build_engine(plan, model)

The config is the plan's DeepSpeed dict as ds_config.py wrote it (a copy: DeepSpeed may fill it in). Loading a
checkpoint, universal form included, is the checkpointer's. Without a JSON `scheduler` block the schedule is HF's
(optim.Schedule); with one it is DeepSpeed's own. `--torch_compile` compiles the encoder.
"""

import copy

from ds_mlm.optim import Schedule, param_groups


def build_engine(plan, model):
    import deepspeed

    config = copy.deepcopy(plan.ds_config)
    schedule = None
    if not plan.schedule.startswith("deepspeed:"):
        def schedule(optimizer):
            return Schedule(optimizer, plan.schedule, plan.learning_rate, plan.warmup_steps, plan.max_steps)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, plan.weight_decay),
                                      config=config, lr_scheduler=schedule)
    if plan.torch_compile:
        # The encoder only, in place (parameter names unchanged), with static shapes (one graph per batch width:
        # the collators pad widths to a multiple of 64). Not engine.compile(), which compiles the whole module:
        # inductor turns the embeddings' backward into an atomic scatter-add whose sums differ from run to run (no
        # exact resume), and the head's masked positions are a data-dependent shape. The encoder is most FLOPs.
        engine.module.roberta.encoder.compile(dynamic=False)
    return engine
