"""The checkpoint policy of a run, end to end (as torchtitan's CheckpointManager): when to save (interval, last step,
signal), what to resume (the newest sound checkpoint, checked once, converted for another number of processes),
restore, and rotation.

    checkpointer = Checkpointer(output_dir, dist, keep, save_steps, resume_from, overwrite)   # or .from_args
    checkpointer.choose(plan)      # before the data: the checkpoint to resume; what the plan knows is checked
    checkpointer.accept(plan)      # with the data: the rest checked; converted for another world size if needed
    checkpointer.restore(trainer)  # engine, hyperparameters, trainer state, RNG (once the engine is built)
    checkpointer.after_step(trainer); checkpointer.on_stop(trainer)   # the Trainer's questions: save now?

The checkpoints on disk (layout, COMPLETE marker, damage, pointer): ds_mlm/checkpoint_files.py.
"""

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from ds_mlm import atomic
from ds_mlm.checkpoint_files import MARKER, POINTER, PREFIX, STATE_FILE, UNIVERSAL, damage, files, is_complete, \
    list_checkpoints, read_pointer, remove_checkpoint, step_of
from ds_mlm.errors import UserError
from ds_mlm.signals import die_with_parent
from ds_mlm.hashing import seed_from
from ds_mlm.plan import compare

log = logging.getLogger(__name__)

CONVERT_SECONDS = 3 * 3600.0  # ds_to_universal of a large model takes minutes; hours means it hangs
_UNCHOSEN = object()


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
    """Owns the checkpoint policy of one `--output_dir` (module docstring): what to resume, when to save (every
    `save_steps`, the last step, a signal), rotation (`keep`). Every method is called on every rank."""

    def __init__(self, output_dir: str, dist, keep=None, save_steps=None, resume_from=None, overwrite: bool = False):
        self.output_dir, self.dist, self.limit = output_dir, dist, keep
        self.save_steps, self.resume_from, self.overwrite = save_steps, resume_from, overwrite
        self.chosen = _UNCHOSEN  # {"path", "state"} of the checkpoint to resume, or None to start afresh
        self.universal = False  # does the chosen checkpoint load through DeepSpeed's universal form?
        self._checked = None  # the plan the chosen checkpoint was last compared with
        self._saved_step = self._cleared = None

    @classmethod
    def from_args(cls, dist, train_args) -> "Checkpointer":
        return cls(train_args.output_dir, dist, train_args.save_total_limit, train_args.save_steps,
                   train_args.resume_from_checkpoint, train_args.overwrite_output_dir)

    @property
    def fresh_over_old(self) -> bool:
        """A fresh run over an old --output_dir (--overwrite_output_dir, nothing resumed)."""
        return bool(self.overwrite) and self.choose() is None

    # -- choosing what to resume --------------------------------------------------------------------------------------

    def choose(self, plan=None):
        """The checkpoint to resume as {"path", "state"} (its trainer_state.json), or None to start afresh; rank 0
        decides for every rank (nodes may see a shared directory's pointer at different moments), once. With a plan:
        refuse (one UserError) what the checkpoint cannot fit, of what the plan knows and was not checked yet."""
        if self.chosen is _UNCHOSEN:
            self.chosen = self.dist.decide(self._choose, self.resume_from, self.overwrite)
        if plan is not None and self.chosen is not None:
            self._check(plan)
        return self.chosen

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

    def _check(self, plan) -> None:
        """Refuse, with one line, a resume the checkpoint's state cannot fit; say what the run follows otherwise. Each
        setting is compared once: before the data only what is known, then what the data added (plan.compare)."""
        chosen = self.chosen
        saved = chosen["state"].get("plan")
        if saved is None:
            raise UserError(f"{chosen['path']} was saved by an older ds-mlm without a run plan: resume it with that "
                            "version, or export it (python -m ds_mlm.export) and warm-start with --model_name_or_path")
        refusals, notes = compare(saved, plan, known_before=self._checked)
        if refusals:
            raise UserError(f"cannot resume {chosen['path']}: {'; '.join(refusals)}; restore those settings, or start "
                            "afresh with --overwrite_output_dir (python -m ds_mlm.export turns the checkpoint into a "
                            "model to warm-start from with --model_name_or_path)")
        if self.dist.is_main:
            for note in notes:
                log.warning("resume: %s", note)
        self._checked = plan

    def accept(self, plan) -> None:
        """With the whole plan (its data known): check the rest, and convert the checkpoint to DeepSpeed's universal
        form when its ZeRO partitions must be regrouped for this world size. Before anything of the run is written."""
        if self.choose(plan) is None:
            return
        self.universal = self.chosen["state"]["plan"]["world_size"] != plan.world_size and plan.zero_stage > 0
        if self.universal:
            self.dist.decide(self._make_universal)

    def _make_universal(self) -> None:
        """Convert the chosen checkpoint to DeepSpeed's universal form beside it, once (rank 0; the others wait)."""
        path = self.chosen["path"]
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
                saved = self.chosen["state"].get("plan", {}).get("world_size", "its")
                raise UserError(f"could not convert {path} for another number of processes ({last}): resume "
                                f"with {saved} processes")
        log.info("converted %s to DeepSpeed's universal checkpoint form in %.1f s (kept in %s/%s)", path,
                 time.perf_counter() - started, path, UNIVERSAL)

    # -- loading --------------------------------------------------------------------------------------------------------

    def restore(self, trainer) -> None:
        """Resume the accepted checkpoint, if any, into the trainer: the engine (weights, optimizer, schedule), the
        plan's hyperparameters, the trainer's state, and the RNG (each rank's own on the same world size; re-seeded
        from (seed, step, rank) on another, since per-rank states do not map onto another number of ranks)."""
        if self.choose() is None:
            return
        from ds_mlm.optim import apply_hyperparameters

        plan, engine, state = trainer.plan, trainer.engine, self.chosen["state"]
        saved_world = state["plan"]["world_size"]
        self.load(engine, same_world=saved_world == self.dist.world_size)
        apply_hyperparameters(engine, plan)
        trainer.load_state_dict(state)
        if saved_world != self.dist.world_size:
            seed = seed_from(plan.seed, trainer.global_step, self.dist.rank)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            log.info("resumed on %d processes a checkpoint of %d%s: dropout is re-seeded from (seed, step, rank)",
                     self.dist.world_size, saved_world,
                     " (through DeepSpeed's universal checkpoint)" if self.universal else "")
        log.info("resumed from %s at step %d (%s samples consumed); the next step runs at lr %.4g", self.chosen["path"],
                 trainer.global_step, f"{state['sampler']['consumed_samples']:,}", engine.get_lr()[0])

    def load(self, engine, same_world: bool) -> None:
        """Restore the engine from the chosen checkpoint and, on the same world size, this rank's RNG states."""
        path = self.chosen["path"]
        if self.universal:  # DeepSpeed reads this flag only inside load_checkpoint (runtime/engine.py, 0.19.8)
            engine._config.load_universal_checkpoint = True
        parent, tag = (path, UNIVERSAL) if self.universal else os.path.split(os.path.normpath(path))
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

    # -- when to save (the Trainer asks) --------------------------------------------------------------------------------

    def after_step(self, trainer) -> None:
        """After each optimizer step: a fresh run over an old --output_dir clears the old run's checkpoints once it has
        taken its first step (a run that never started leaves the old one whole); save every `save_steps` steps and
        at the last step (a rerun then finds the training done)."""
        if self.fresh_over_old and not self._cleared:
            self._cleared = True
            self.clear_previous_run()
        step = trainer.global_step
        if (self.save_steps and step % self.save_steps == 0) or step == trainer.plan.max_steps:
            self.save(trainer)

    def on_stop(self, trainer) -> bool:
        """A signal stops the run: save the step reached unless it is saved already (or none was taken)."""
        if self._saved_step == trainer.global_step or trainer.global_step == 0:
            return False
        self.save(trainer)
        return True

    def save(self, trainer) -> str:
        """checkpoint-{step} of the trainer: its engine, its state and the plan, and the files export needs."""
        state = {**trainer.state_dict(), "plan": trainer.plan.to_dict()}
        path = self.write(trainer.engine, trainer.global_step, state, trainer.write_extras)
        self._saved_step = trainer.global_step
        log.info("saved %s", path)
        return path

    # -- saving ---------------------------------------------------------------------------------------------------------

    def write(self, engine, step: int, state: dict, write_extras=None) -> str:
        """Write checkpoint-{step} on every rank; rank 0 writes the trainer state, marks it complete, moves the pointer,
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
            marker = {"step": step, "time": time.time(), "world_size": self.dist.world_size, "files": files(path)}
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
