"""Resuming a run: refuse what the checkpoint cannot fit, say what the run follows, restore the rest.

    chosen = checkpointer.choose(...)        # {"path", "state"}: the newest sound checkpoint
    check(chosen, plan, dist)                # one line per change (plan.compare); a refusal is one UserError
    restore(trainer, checkpointer, chosen, plan, dist, universal)

On the same world size everything comes back as it was (engine, sampler, logging window, every rank's RNG): the
loss sequence is the uninterrupted run's, bit for bit. On another world size the ZeRO partitions come through
DeepSpeed's universal checkpoint, the sample order is the same (sampler.py), and the dropout RNG of each rank is
re-seeded from (seed, step, rank), since per-rank states do not map onto another number of ranks.
"""

import logging
import random

import numpy as np
import torch

from ds_mlm.errors import UserError
from ds_mlm.hashing import seed_from
from ds_mlm.optim import apply_hyperparameters
from ds_mlm.plan import compare

log = logging.getLogger(__name__)


def check(chosen, plan, dist, say: bool = True) -> None:
    """Refuse, with one line, a resume the checkpoint's state cannot fit; say (`say`) what the run follows
    otherwise. Before the data are known the plan has no step count: only what is known is compared."""
    saved = chosen["state"].get("plan")
    if saved is None:
        raise UserError(f"{chosen['path']} was saved by an older ds-mlm without a run plan: resume it with that "
                        "version, or export it (python -m ds_mlm.export) and warm-start with --model_name_or_path")
    refusals, notes = compare(saved, plan)
    if refusals:
        raise UserError(f"cannot resume {chosen['path']}: {'; '.join(refusals)}; restore those settings, or start "
                        "afresh with --overwrite_output_dir (python -m ds_mlm.export turns the checkpoint into a model "
                        "to warm-start from with --model_name_or_path)")
    if dist.is_main and say:
        for note in notes:
            log.warning("resume: %s", note)


def restore(trainer, checkpointer, chosen, plan, dist, universal: bool) -> None:
    """Load the checkpoint into the engine and the trainer (after `check`)."""
    saved_world = chosen["state"]["plan"]["world_size"]
    checkpointer.load(trainer.engine, chosen, universal, same_world=saved_world == dist.world_size)
    apply_hyperparameters(trainer.engine, plan)
    trainer.load_state_dict(chosen["state"])
    if saved_world != dist.world_size:
        seed = seed_from(plan.seed, trainer.global_step, dist.rank)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        log.info("resumed on %d processes a checkpoint of %d%s: dropout is re-seeded from (seed, step, rank)",
                 dist.world_size, saved_world, " (through DeepSpeed's universal checkpoint)" if universal else "")
    log.info("resumed from %s at step %d (%s samples consumed); the next step runs at lr %.4g", chosen["path"],
             trainer.global_step, f"{trainer.position['consumed_samples']:,}", trainer.engine.get_lr()[0])
