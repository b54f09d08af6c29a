"""Checkpoints that are either complete or ignored, the newest sound one chosen on resume, rotation, and resuming on
another number of processes.

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
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import torch

from ds_mlm import atomic
from ds_mlm.errors import UserError
from ds_mlm.signals import die_with_parent

log = logging.getLogger(__name__)

PREFIX, MARKER, POINTER, STATE_FILE, UNIVERSAL = "checkpoint-", "COMPLETE", "latest_checkpoint", \
    "trainer_state.json", "universal"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
CONVERT_SECONDS = 3 * 3600.0  # ds_to_universal of a large model takes minutes; hours means it hangs


def step_of(path: str) -> int:
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def list_checkpoints(output_dir: str) -> list:
    """[(step, path, complete)] of every checkpoint-N directory, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else ():
        path = os.path.join(output_dir, name)
        if _NAME.match(name) and os.path.isdir(path):
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


def _files(path: str) -> dict:
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
    now = _files(path)
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


class Checkpointer:
    """Owns the checkpoints of one `--output_dir` (module docstring). Every method is called on every rank."""

    def __init__(self, output_dir: str, dist, save_total_limit=None):
        self.output_dir, self.dist, self.limit = output_dir, dist, save_total_limit

    # -- choosing what to resume --------------------------------------------------------------------------------------

    def choose(self, resume_from=None, overwrite: bool = False):
        """The checkpoint to resume as {"path", "state"} (its trainer_state.json), or None to start afresh; rank 0
        decides for every rank (nodes may see a shared directory's pointer at different moments)."""
        return self.dist.decide(self._choose, resume_from, overwrite)

    def _choose(self, resume_from, overwrite):
        if resume_from:
            if not os.path.isdir(resume_from):
                raise UserError(f"--resume_from_checkpoint {resume_from}: no such directory; give a checkpoint-N "
                                "directory (or omit the flag to resume from the newest one in --output_dir)")
            if not is_complete(resume_from):
                raise UserError(f"--resume_from_checkpoint {resume_from} is incomplete (no {MARKER} marker: its save "
                                "was interrupted); give an earlier checkpoint")
            why = damage(resume_from)
            if why:
                raise UserError(f"--resume_from_checkpoint {resume_from} is damaged ({why}); give another checkpoint")
            return {"path": resume_from, "state": self._read_state(resume_from)}
        if overwrite:
            return None
        complete = [path for _, path, ok in list_checkpoints(self.output_dir) if ok]
        pointed = read_pointer(self.output_dir)
        if pointed and is_complete(pointed) and pointed not in complete:
            complete.append(pointed)
        for path in sorted(complete, key=step_of, reverse=True):
            why = damage(path)
            if why is None:
                return {"path": path, "state": self._read_state(path)}
            log.warning("%s is damaged (%s): resuming from the checkpoint before it; delete it, or copy it back "
                        "whole", path, why)
        return None

    @staticmethod
    def _read_state(path: str) -> dict:
        try:
            with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}/{STATE_FILE} is unreadable ({e}): resume from another checkpoint") from None

    # -- loading --------------------------------------------------------------------------------------------------------

    def universal_needed(self, chosen, plan) -> bool:
        """Do the checkpoint's ZeRO partitions have to be regrouped for this world size?"""
        saved = chosen["state"]["plan"]
        return saved["world_size"] != plan.world_size and plan.zero_stage > 0

    def make_universal(self, chosen) -> None:
        """Convert the checkpoint to DeepSpeed's universal form beside it, once (rank 0; the others wait)."""
        def convert():
            path = chosen["path"]
            if os.path.isdir(os.path.join(path, UNIVERSAL)):
                return
            started = time.perf_counter()
            with atomic.staging_dir(os.path.join(path, UNIVERSAL), durable=False) as tmp:
                cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", path,
                       "--output_folder", tmp, "--inject_missing_state", "--num_extract_workers", "1",
                       "--num_merge_workers", "1"]
                try:  # tied to this rank (killed with it, even by SIGKILL); rank 0's own wait needs a bound
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_SECONDS,
                                          preexec_fn=die_with_parent())
                except subprocess.TimeoutExpired:
                    raise UserError(f"converting {path} for another number of processes did not end within "
                                    f"{CONVERT_SECONDS:.0f} s (deepspeed.checkpoint.ds_to_universal hangs): resume "
                                    "with the number of processes it was saved with") from None
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                    saved = chosen["state"].get("plan", {}).get("world_size", "its")
                    raise UserError(f"could not convert {path} for another number of processes ({last}): resume "
                                    f"with {saved} processes")
            log.info("converted %s to DeepSpeed's universal checkpoint form in %.1f s (kept in %s/%s)", path,
                     time.perf_counter() - started, path, UNIVERSAL)

        self.dist.decide(convert)

    def load(self, engine, chosen, universal: bool, same_world: bool) -> None:
        """Restore the engine (weights, optimizer, schedule) and, on the same world size, this rank's RNG states."""
        path = chosen["path"]
        parent, tag = (path, UNIVERSAL) if universal else os.path.split(os.path.normpath(path))
        try:
            loaded, _ = engine.load_checkpoint(parent, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        except (RuntimeError, OSError, EOFError, KeyError) as e:
            raise UserError(f"{path} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}): it "
                            "is damaged; move it out of --output_dir to resume from the one before") from None
        if loaded is None:
            raise UserError(f"DeepSpeed could not load {path}: move it out of --output_dir to resume from the one "
                            "before, or start afresh with --overwrite_output_dir")
        rng_file = os.path.join(path, f"rng_state_{self.dist.rank}.pt")
        if same_world and os.path.isfile(rng_file):
            set_rng_states(torch.load(rng_file, weights_only=False))  # our own file: numpy/python states need pickle

    # -- saving ---------------------------------------------------------------------------------------------------------

    def save(self, engine, step: int, state: dict, write_extras=None) -> str:
        """Save checkpoint-{step} on every rank; rank 0 writes the trainer state, marks it complete, moves the pointer,
        then rotates."""
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, \
            UNIVERSAL_CHECKPOINT_VERSION_VALUE

        tag = f"{PREFIX}{step}"
        path = os.path.join(self.output_dir, tag)
        if self.dist.is_main and os.path.isdir(path):  # left by another timeline (an older resume point): never mix
            remove_checkpoint(path)
        self.dist.barrier()
        # convertible to the universal form (elastic resume) without guessing
        client = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        try:
            engine.save_checkpoint(self.output_dir, tag=tag, client_state=client, save_latest=False)
            torch.save(rng_states(), os.path.join(path, f"rng_state_{self.dist.rank}.pt"))
            if self.dist.is_main:
                atomic.write_text(os.path.join(path, STATE_FILE), json.dumps(state, indent=2) + "\n")
                if write_extras is not None:
                    write_extras(path)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError, without errno
            self._give_up_on(path, e)
        self.dist.barrier()  # every rank's files are on disk before the marker says so
        if self.dist.is_main:
            atomic.fsync_tree(path)
            marker = {"step": step, "time": time.time(), "world_size": self.dist.world_size, "files": _files(path)}
            atomic.write_text(os.path.join(path, MARKER), json.dumps(marker) + "\n")
            atomic.write_text(os.path.join(self.output_dir, POINTER), tag + "\n")  # last: it names a complete one
            if self.limit:
                self.rotate()
        self.dist.barrier()
        return path

    def _give_up_on(self, path: str, error: Exception) -> None:
        """A save that failed: its directory never got the marker; remove it and say what is still good."""
        remove_checkpoint(path)
        free = shutil.disk_usage(self.output_dir).free
        why = ("the disk is full" if free < 64 * (1 << 20) or "space" in str(error).lower()
               else str(error).splitlines()[0])
        good = read_pointer(self.output_dir)
        kept = f"the last complete checkpoint, {os.path.basename(good)}, is intact" if good else "no checkpoint was kept"
        raise UserError(f"could not save {os.path.basename(path)} in {self.output_dir} ({why}): {kept}; free some "
                        "space and run the same command again to resume") from None

    def rotate(self) -> list:
        """Delete all but the `limit` newest complete checkpoints (never the pointer's) and stale incomplete ones."""
        checkpoints = list_checkpoints(self.output_dir)
        complete = [(step, path) for step, path, ok in checkpoints if ok]
        if not complete:
            return []
        keep = {os.path.normpath(path) for _, path in complete[-self.limit:]}
        pointed = read_pointer(self.output_dir)
        if pointed:
            keep.add(os.path.normpath(pointed))
        newest = complete[-1][0]
        doomed = [path for step, path, ok in checkpoints if os.path.normpath(path) not in keep and (ok or step < newest)]
        for path in doomed:
            remove_checkpoint(path)
        if doomed:
            log.info("save_total_limit %s: deleted %s", self.limit, ", ".join(os.path.basename(p) for p in doomed))
        return doomed

    def clear_previous_run(self) -> list:
        """--overwrite_output_dir, once the new run has taken its first step: the old run's checkpoints and pointer
        go (rank 0), so none is mistaken for ours. Until then a failed start leaves the old run whole."""
        old = list_checkpoints(self.output_dir) if self.dist.is_main else []
        if self.dist.is_main:
            if os.path.exists(os.path.join(self.output_dir, POINTER)):
                os.remove(os.path.join(self.output_dir, POINTER))
            for _, path, _ in old:
                remove_checkpoint(path)
            if old:
                log.info("--overwrite_output_dir: removed %d checkpoint(s) of the previous run", len(old))
        self.dist.barrier()
        return [p for _, p, _ in old]
