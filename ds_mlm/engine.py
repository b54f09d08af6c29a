"""The DeepSpeed engine of a run: `deepspeed.initialize` around the model, with the plan's config, parameter groups
and learning-rate schedule.

    engine = build_engine(plan, model)

The config is the plan's DeepSpeed dict as ds_config.py wrote it (a copy: DeepSpeed may fill it in). Loading a
checkpoint, universal form included, is the checkpointer's. Without a JSON `scheduler` block the schedule is HF's
(optim.Schedule); with one it is DeepSpeed's own. `--torch_compile` compiles the encoder.
"""

import copy
import functools
import importlib
import sys

from ds_mlm.optim import Schedule, param_groups

MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def build_engine(plan, model):
    import deepspeed

    _import_muon_compiling_lazily()
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


def _import_muon_compiling_lazily() -> None:
    """DeepSpeed asks whether the optimizer is its Muon (ZeRO's optimizer check, ZeRO 1/2's gradient reduction) by
    importing MUON, whose `@torch.compile` decorators load inductor and networkx as it is imported: 1.1 s of the
    first step (quiet), for an optimizer an AdamW run never calls. Imported here first with each decorated function
    compiled at its first call instead: the same functions, compiled as before where Muon runs."""
    import torch

    if MUON in sys.modules:
        return
    compile_now = torch.compile

    def compile_later(model=None, **options):
        if model is None:  # @torch.compile(...)
            return lambda function: compile_later(function, **options)
        if isinstance(model, torch.nn.Module):
            return compile_now(model, **options)
        compiled = []

        @functools.wraps(model)
        def call(*args, **kwargs):
            if not compiled:
                compiled.append(compile_now(model, **options))
            return compiled[0](*args, **kwargs)
        return call

    torch.compile = compile_later
    try:
        importlib.import_module(MUON)
    except ImportError:  # a DeepSpeed without Muon: nothing to defer
        pass
    finally:
        torch.compile = compile_now
