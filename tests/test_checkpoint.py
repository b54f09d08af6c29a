"""Checkpoint bookkeeping: completion marker, the pointer written last, rotation, choosing what to resume from.

The real engine save/load and the exact-resume loss comparison are in tests/test_trainer.py.
"""

import json
import os
import random

import numpy as np
import pytest
import torch

from ds_mlm import checkpoint
from ds_mlm.distributed import DistInfo
from ds_mlm.errors import UserError

ONE = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)


def make(out, step, complete=True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / checkpoint.MARKER).write_text("{}")
    return path


def names(out):
    return sorted((p.name for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n[11:]))


class FakeEngine:
    """Writes one file per save like DeepSpeed would; can be told to die half-way."""

    def __init__(self, fail=False):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # DeepSpeed's own `latest` file is not ours
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(client_state, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
        if self.fail:
            raise RuntimeError("disk full")


def test_rotation_keeps_the_newest_complete_and_drops_stale_incomplete(tmp_path):
    for step, ok in ((10, True), (20, True), (30, False), (40, True), (50, True), (60, False)):
        make(tmp_path, step, ok)
    (tmp_path / checkpoint.POINTER).write_text("checkpoint-50\n")
    deleted = checkpoint.rotate(str(tmp_path), 2)
    # 60 may be a save in progress (newer than the newest complete one): left alone
    assert names(tmp_path) == ["checkpoint-40", "checkpoint-50", "checkpoint-60"]
    assert sorted(os.path.basename(p) for p in deleted) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_rotation_never_deletes_the_pointers_checkpoint(tmp_path):
    for step in (10, 20, 30):
        make(tmp_path, step)
    (tmp_path / checkpoint.POINTER).write_text("checkpoint-20\n")  # e.g. resumed from an older one by hand
    checkpoint.rotate(str(tmp_path), 1)
    assert names(tmp_path) == ["checkpoint-20", "checkpoint-30"]


def test_save_writes_marker_then_pointer_then_rotates(tmp_path, monkeypatch):
    writes = []
    real = checkpoint.atomic_write_text
    monkeypatch.setattr(checkpoint, "atomic_write_text", lambda p, t: (writes.append(os.path.basename(p)), real(p, t)))
    out = str(tmp_path)
    for step in (2, 4, 6):
        checkpoint.save(FakeEngine(), out, step, {"global_step": step}, ONE, save_total_limit=2,
                        rank_state={"window": {"loss_sum": 1.5}})
    assert writes == [checkpoint.STATE_FILE, checkpoint.MARKER, checkpoint.POINTER] * 3
    assert names(tmp_path) == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / checkpoint.POINTER).read_text() == "checkpoint-6\n"
    assert json.loads((tmp_path / "checkpoint-6" / checkpoint.STATE_FILE).read_text()) == {"global_step": 6}
    saved = torch.load(tmp_path / "checkpoint-6" / "rng_state_0.pt", weights_only=False)
    assert set(saved) == {"python", "numpy", "torch", "accelerator", "rank_state"}
    assert saved["rank_state"] == {"window": {"loss_sum": 1.5}}
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_interrupted_save_is_never_resumed_from(tmp_path):
    out = str(tmp_path)
    checkpoint.save(FakeEngine(), out, 5, {"global_step": 5}, ONE)
    with pytest.raises(UserError, match="could not save checkpoint-10 .*: the last complete checkpoint, "
                                        "checkpoint-5, is intact; free some space and run the same command again"):
        checkpoint.save(FakeEngine(fail=True), out, 10, {"global_step": 10}, ONE)
    assert not (tmp_path / "checkpoint-10").exists()  # the partial save is gone, never a directory that looks good
    assert (tmp_path / checkpoint.POINTER).read_text() == "checkpoint-5\n"
    assert checkpoint.resolve_resume(out, None, overwrite=False) == str(tmp_path / "checkpoint-5")


def test_resume_choice(tmp_path):
    out = str(tmp_path)
    assert checkpoint.resolve_resume(out, None, overwrite=False) is None  # nothing yet: start afresh
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)
    # no pointer (a crash between marker and pointer): the newest complete one
    assert checkpoint.resolve_resume(out, None, overwrite=False) == str(tmp_path / "checkpoint-20")
    (tmp_path / checkpoint.POINTER).write_text("checkpoint-20\n")
    assert checkpoint.resolve_resume(out, None, overwrite=False) == str(tmp_path / "checkpoint-20")
    assert checkpoint.resolve_resume(out, None, overwrite=True) is None
    assert checkpoint.resolve_resume(out, str(tmp_path / "checkpoint-10"), overwrite=False) == str(tmp_path / "checkpoint-10")
    with pytest.raises(UserError, match="is incomplete"):
        checkpoint.resolve_resume(out, str(tmp_path / "checkpoint-30"), overwrite=False)
    with pytest.raises(UserError, match="no such directory"):
        checkpoint.resolve_resume(out, str(tmp_path / "checkpoint-99"), overwrite=False)


def test_overwrite_clears_the_previous_runs_checkpoints(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20, complete=False)
    (tmp_path / checkpoint.POINTER).write_text("checkpoint-10\n")
    (tmp_path / "train_log.jsonl").write_text("{}\n")
    checkpoint.clear_for_overwrite(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["train_log.jsonl"]  # other files are not ours to delete here


def test_rng_states_round_trip():
    saved = checkpoint.rng_states()
    first = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_states(saved)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_resume_refuses_another_partitioning(tmp_path):
    state = {"world_size": 2, "train_batch_size": 16}
    with pytest.raises(UserError, match="saved by 2 processes with ZeRO-2 partitions, this run has 1"):
        checkpoint.check_compatible(state, "ck", world_size=1, zero_stage=2, train_batch_size=16)
    checkpoint.check_compatible(state, "ck", world_size=1, zero_stage=0, train_batch_size=8)  # ZeRO-0: no partitions
    checkpoint.check_compatible(state, "ck", world_size=2, zero_stage=2, train_batch_size=16)


def test_resume_under_another_zero_stage_or_precision_is_refused():
    state = {"world_size": 1, "train_batch_size": 8, "zero_stage": 2, "precision": "fp32"}
    with pytest.raises(UserError, match="ck was saved with ZeRO-2, this run uses ZeRO-0: resume with the "
                                        "--deepspeed_config"):
        checkpoint.check_compatible(state, "ck", world_size=1, zero_stage=0, train_batch_size=8, precision="fp32")
    with pytest.raises(UserError, match="ck was saved training in fp32, this run trains in bf16"):
        checkpoint.check_compatible(state, "ck", world_size=1, zero_stage=2, train_batch_size=8, precision="bf16")
    checkpoint.check_compatible(state, "ck", world_size=1, zero_stage=2, train_batch_size=8, precision="fp32")
