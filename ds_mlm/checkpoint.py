"""Checkpoints that are either complete or ignored, a pointer written last, rotation, and exact resume.

On disk, under `--output_dir`:

    checkpoint-{step}/                DeepSpeed's own files (engine.save_checkpoint, tag = the directory name):
        mp_rank_00_model_states.pt    module weights, lr scheduler, DeepSpeed's client_state (rank 0's only)
        *zero_pp_rank_*_optim_states.pt   optimizer state partitions, one per rank (ZeRO-1/2/3)
        rng_state_{rank}.pt           each rank's RNG states (python, numpy, torch, accelerator; DeepSpeed saves none)
                                      and its own small trainer state (the unlogged sums of its logging window)
        trainer_state.json            global step, sampler state, consumed samples, train_log.jsonl position, run shape
        config.json                   the model config (so `python -m ds_mlm.export` needs nothing else)
        tokenizer files               the tokenizer of the run (idem)
        COMPLETE                      written by rank 0 after every rank has finished writing: the completion marker
    latest_checkpoint                 the name of the newest complete checkpoint ("checkpoint-40"); written LAST,
                                      atomically (temp file, fsync, os.replace)

A checkpoint without COMPLETE was interrupted and is never resumed from. Rotation (`--save_total_limit N`, rank 0,
after the pointer moved) keeps the N newest complete checkpoints and the one the pointer names, and deletes
incomplete ones older than the newest complete one. A deletion removes the marker first, so a half-deleted directory
is merely incomplete.
"""

import json
import logging
import os
import random
import re
import shutil
import tempfile
import time

import numpy as np
import torch

from ds_mlm import distributed
from ds_mlm.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
MARKER = "COMPLETE"
POINTER = "latest_checkpoint"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def atomic_write_text(path: str, text: str) -> None:
    """Readers see the old file or the new one, never half of one: write a temp file, fsync, os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def list_checkpoints(output_dir: str) -> list:
    """[(step, path, complete)] of every checkpoint-N directory, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path, is_complete(path)))
    return sorted(found)


def newest_complete(output_dir: str):
    """The newest complete checkpoint directory in output_dir, or None."""
    complete = [path for _, path, ok in list_checkpoints(output_dir) if ok]
    return complete[-1] if complete else None


def read_pointer(output_dir: str):
    try:
        with open(os.path.join(output_dir, POINTER), encoding="utf-8") as f:
            name = f.read().strip()
    except OSError:
        return None
    return os.path.join(output_dir, name) if name else None


def remove_checkpoint(path: str) -> None:
    """Marker first: if we die half-way the directory is merely incomplete, never a broken 'complete' one."""
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(path, ignore_errors=True)


def rotate(output_dir: str, limit) -> list:
    """Delete all but the `limit` newest complete checkpoints (never the pointer's) and stale incomplete ones."""
    checkpoints = list_checkpoints(output_dir)
    complete = [(step, path) for step, path, ok in checkpoints if ok]
    if not complete:
        return []
    keep = {path for _, path in complete[-limit:]} if limit else {path for _, path in complete}
    pointed = read_pointer(output_dir)
    if pointed:
        keep.add(os.path.normpath(pointed))
    newest_step = complete[-1][0]
    doomed = [path for step, path, ok in checkpoints
              if os.path.normpath(path) not in {os.path.normpath(k) for k in keep} and (ok or step < newest_step)]
    for path in doomed:
        remove_checkpoint(path)
    if doomed:
        log.info("save_total_limit %s: deleted %s", limit, ", ".join(os.path.basename(p) for p in doomed))
    return doomed


def rng_states() -> dict:
    from deepspeed.accelerator import get_accelerator

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": get_accelerator().get_rng_state()}


def set_rng_states(states: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    get_accelerator().set_rng_state(states["accelerator"])


def save(engine, output_dir: str, step: int, trainer_state: dict, dist, save_total_limit=None,
         write_extras=None, rank_state=None) -> str:
    """Save checkpoint-{step} on every rank; rank 0 marks it complete, moves the pointer, then rotates."""
    tag = f"{PREFIX}{step}"
    path = os.path.join(output_dir, tag)
    if dist.rank == 0 and os.path.isdir(path):  # left by another timeline (an older resume point): never mix files
        remove_checkpoint(path)
    distributed.barrier()
    try:
        engine.save_checkpoint(output_dir, tag=tag, client_state={"ds_mlm": trainer_state}, save_latest=False)
        torch.save({**rng_states(), "rank_state": rank_state}, os.path.join(path, f"rng_state_{dist.rank}.pt"))
        if dist.rank == 0:
            atomic_write_text(os.path.join(path, STATE_FILE), json.dumps(trainer_state, indent=2) + "\n")
            if write_extras is not None:
                write_extras(path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError, without errno
        _give_up_on(path, output_dir, e)
    distributed.barrier()  # every rank's files are on disk before the marker says so
    if dist.rank == 0:
        atomic_write_text(os.path.join(path, MARKER), json.dumps({"step": step, "time": time.time()}) + "\n")
        atomic_write_text(os.path.join(output_dir, POINTER), tag + "\n")  # last: it names a complete checkpoint
        if save_total_limit:
            rotate(output_dir, save_total_limit)
    distributed.barrier()
    return path


def _give_up_on(path: str, output_dir: str, error: Exception) -> None:
    """A save that failed: its directory never got the marker; remove it and say what is still good."""
    remove_checkpoint(path)
    free = shutil.disk_usage(output_dir).free
    why = "the disk is full" if free < 64 * (1 << 20) or "space" in str(error).lower() else str(error).splitlines()[0]
    good = read_pointer(output_dir)
    kept = f"the last complete checkpoint, {os.path.basename(good)}, is intact" if good else "no checkpoint was kept"
    raise UserError(f"could not save {os.path.basename(path)} in {output_dir} ({why}): {kept}; free some space "
                    "and run the same command again to resume") from None


def resolve_resume(output_dir: str, resume_from, overwrite: bool):
    """The checkpoint directory to resume from, or None to start afresh."""
    if resume_from:
        if not os.path.isdir(resume_from):
            raise UserError(f"--resume_from_checkpoint {resume_from}: no such directory; give a checkpoint-N "
                            f"directory (or omit the flag to resume from the newest one in --output_dir)")
        if not is_complete(resume_from):
            raise UserError(f"--resume_from_checkpoint {resume_from} is incomplete (no {MARKER} marker: its save "
                            "was interrupted); give an earlier checkpoint")
        return resume_from
    if overwrite:
        return None
    pointed = read_pointer(output_dir)
    newest = newest_complete(output_dir)
    if pointed and is_complete(pointed) and (newest is None or _step(pointed) >= _step(newest)):
        return pointed
    return newest


def _step(path: str) -> int:
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def clear_for_overwrite(output_dir: str) -> list:
    """--overwrite_output_dir: remove the old run's checkpoints and pointer (rank 0), so none is mistaken for ours."""
    old = list_checkpoints(output_dir)
    pointer = os.path.join(output_dir, POINTER)
    if os.path.exists(pointer):
        os.remove(pointer)
    for _, path, _ in old:
        remove_checkpoint(path)
    if old:
        log.info("--overwrite_output_dir: removed %d checkpoint(s) of the previous run", len(old))
    return [p for _, p, _ in old]


def load(engine, path: str, dist):
    """Restore engine state (weights, optimizer, lr scheduler) and this rank's RNG states.

    Returns (trainer_state, this rank's rank_state or None)."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    parent, tag = os.path.split(os.path.normpath(path))
    load_path, _ = engine.load_checkpoint(parent, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load the checkpoint {path}: start afresh with --overwrite_output_dir")
    rng_file = os.path.join(path, f"rng_state_{dist.rank}.pt")
    if not os.path.isfile(rng_file):
        log.warning("%s has no RNG state for rank %d: dropout will differ from an uninterrupted run", path, dist.rank)
        return state, None
    saved = torch.load(rng_file, weights_only=False)  # our own file: numpy/python states need pickle
    set_rng_states(saved)
    return state, saved.get("rank_state")


def check_compatible(state: dict, path: str, world_size: int, zero_stage: int, train_batch_size: int,
                     precision: str = None) -> None:
    """A resume must keep the shapes the checkpoint's optimizer partitions and sample order depend on."""
    fresh = ("resume with the --deepspeed_config and precision flags it was trained with, or start afresh with "
             "--overwrite_output_dir (python -m ds_mlm.export turns the checkpoint into a model to warm-start from)")
    if state.get("zero_stage", zero_stage) != zero_stage:
        raise UserError(f"{path} was saved with ZeRO-{state['zero_stage']}, this run uses ZeRO-{zero_stage}: {fresh}")
    if precision is not None and state.get("precision", precision) != precision:
        raise UserError(f"{path} was saved training in {state['precision']}, this run trains in {precision}: {fresh}")
    if state["world_size"] != world_size and zero_stage > 0:
        raise UserError(f"{path} was saved by {state['world_size']} processes with ZeRO-{zero_stage} partitions, this "
                        f"run has {world_size}: resume with {state['world_size']} processes, or start afresh with "
                        "--overwrite_output_dir (python -m ds_mlm.export turns the checkpoint into a model to warm-start from)")
    if state["train_batch_size"] != train_batch_size:  # the sampler goes on from the same sample; steps change size
        log.warning("%s was trained with a global batch of %d, this run has %d: training goes on from the same "
                    "sample, but steps (and the lr schedule) now count batches of %d", path,
                    state["train_batch_size"], train_batch_size, train_batch_size)
