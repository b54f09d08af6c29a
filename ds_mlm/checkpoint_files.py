"""The checkpoints of a run on disk: their layout, which are complete, which are damaged, the newest one's pointer.
ds_mlm/checkpointer.py decides what to save, resume and delete; this module only reads and names directories.

On disk, under `--output_dir`:

    checkpoint-{step}/
        mp_rank_00_model_states.pt        DeepSpeed's files (engine.save_checkpoint, tag = the directory name): the
        *zero_pp_rank_*_optim_states.pt   module, the lr schedule, the optimizer (partitions, one per rank, ZeRO-1/2/3)
        rng_state_{rank}.pt               each rank's RNG states (python, numpy, torch, accelerator)
        trainer_state.json                the trainer's state (step, sampler position, log position, logging window,
                                          samples by source) and the run plan: written once (rank 0), read once
        config.json, tokenizer files      so `python -m ds_mlm.export` needs nothing else
        COMPLETE                          written by rank 0 after every rank has finished: every file and its size
        universal/                        DeepSpeed's universal form of the ZeRO state, made once when the checkpoint
                                          is resumed on another number of processes, then kept
    latest_checkpoint                     the name of the newest complete checkpoint, written after its COMPLETE

A checkpoint without COMPLETE was interrupted and is never resumed from. One whose files do not match COMPLETE's
list (truncated, missing) or whose archives do not open is damaged: the next older sound one is resumed instead,
with one warning naming it. Rotation (`--save_total_limit N`, rank 0, after the pointer moved) keeps the N newest
complete checkpoints and the one the pointer names, and deletes incomplete ones older than the newest complete one;
a deletion removes the marker first, so a half-deleted directory is merely incomplete.
"""

import json
import os
import re
import shutil
import zipfile

PREFIX, MARKER, POINTER, STATE_FILE, UNIVERSAL = "checkpoint-", "COMPLETE", "latest_checkpoint", \
    "trainer_state.json", "universal"
NAME = re.compile(rf"^{PREFIX}(\d+)$")


def step_of(path: str) -> int:
    m = NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def list_checkpoints(output_dir: str) -> list:
    """[(step, path, complete)] of every checkpoint-N directory, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else ():
        path = os.path.join(output_dir, name)
        if NAME.match(name) and os.path.isdir(path):
            found.append((step_of(path), path, is_complete(path)))
    return sorted(found)


def read_pointer(output_dir: str):
    try:
        with open(os.path.join(output_dir, POINTER), encoding="utf-8") as f:
            name = f.read().strip()
    except OSError:
        return None
    return os.path.join(output_dir, name) if name else None


def remove_checkpoint(path: str) -> None:
    """Marker first: if we die half-way the directory is merely incomplete, never a broken 'complete' one."""
    if os.path.exists(os.path.join(path, MARKER)):
        os.remove(os.path.join(path, MARKER))
    shutil.rmtree(path, ignore_errors=True)


def files(path: str) -> dict:
    """relative path -> size of every file of a checkpoint (its universal form excluded)."""
    out = {}
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != os.path.join(path, UNIVERSAL)]
        for name in files:
            full = os.path.join(folder, name)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    out.pop(MARKER, None)
    return out


def readable_archive(path: str) -> bool:
    """Does a torch.save file open as the zip archive it is? (Reads its directory, at the file's end: a file cut short
    has none.)"""
    try:
        zipfile.ZipFile(path).close()
    except (OSError, zipfile.BadZipFile):
        return False
    return True


def damage(path: str):
    """Why the complete checkpoint at `path` cannot be loaded (a short reason), or None when it looks sound."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            listed = json.load(f).get("files")
    except (OSError, ValueError):
        return f"its {MARKER} marker is unreadable"
    now = files(path)
    for name, size in (listed or {}).items():  # an older marker without a list: the archive check below
        if name not in now:
            return f"{name} is missing"
        if now[name] != size:
            return f"{name} has {now[name]:,} bytes, {size:,} were written"
    for name in now:
        if name.endswith(".pt") and not readable_archive(os.path.join(path, name)):
            return f"{name} is not a readable archive"
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        return f"{STATE_FILE} is missing"
    return None
