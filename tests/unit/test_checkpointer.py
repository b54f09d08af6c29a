"""Checkpoint bookkeeping: the marker listing every file, the pointer written last, rotation, choosing what to resume
(a damaged checkpoint skipped), clearing an old run only once a new one has started.

The real engine save/load, exact resume and elastic resume are in tests/integration/test_trainer.py and
tests/integration/test_elastic.py.
"""

import json
import os
import random

import numpy as np
import pytest
import torch

from ds_mlm import checkpointer as ck
from ds_mlm.checkpointer import Checkpointer
from ds_mlm.distributed import DistInfo
from ds_mlm.errors import UserError

ONE = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)


class FakeEngine:
    """Writes what DeepSpeed would (a zip archive per file); can be told to die half-way."""

    def __init__(self, fail=False):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # DeepSpeed's own `latest` file is not ours
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(client_state, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
        if self.fail:
            raise RuntimeError("disk full")


def save(out, step, state=None, limit=None, engine=None):
    return Checkpointer(str(out), ONE, limit).write(engine or FakeEngine(), step, state or {"global_step": step})


def names(out):
    return sorted((p.name for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n[11:]))


def chosen_step(out, resume_from=None, overwrite=False):
    chosen = Checkpointer(str(out), ONE, resume_from=resume_from, overwrite=overwrite).choose()
    return None if chosen is None else ck.step_of(chosen["path"])


def test_save_writes_state_then_marker_listing_the_files_then_pointer_then_rotates(tmp_path, monkeypatch):
    writes = []
    real = ck.atomic.write_text
    monkeypatch.setattr(ck.atomic, "write_text", lambda p, t: (writes.append(os.path.basename(p)), real(p, t)))
    for step in (2, 4, 6):
        save(tmp_path, step, limit=2)
    assert writes == [ck.STATE_FILE, ck.MARKER, ck.POINTER] * 3
    assert names(tmp_path) == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / ck.POINTER).read_text() == "checkpoint-6\n"
    assert json.loads((tmp_path / "checkpoint-6" / ck.STATE_FILE).read_text()) == {"global_step": 6}
    marker = json.loads((tmp_path / "checkpoint-6" / ck.MARKER).read_text())
    files = {f: (tmp_path / "checkpoint-6" / f).stat().st_size for f in os.listdir(tmp_path / "checkpoint-6")
             if f != ck.MARKER}
    assert marker["files"] == files and marker["step"] == 6 and marker["world_size"] == 1
    assert set(torch.load(tmp_path / "checkpoint-6" / "rng_state_0.pt", weights_only=False)) == {
        "python", "numpy", "torch", "accelerator"}
    client = torch.load(tmp_path / "checkpoint-6" / "mp_rank_00_model_states.pt", weights_only=False)
    assert "universal_checkpoint_info" in client  # convertible for an elastic resume
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_rotation_keeps_the_newest_complete_and_drops_stale_incomplete(tmp_path):
    for step in (10, 20, 30, 40, 50, 60):
        save(tmp_path, step)
    for step in (30, 60):
        os.remove(tmp_path / f"checkpoint-{step}" / ck.MARKER)
    (tmp_path / ck.POINTER).write_text("checkpoint-50\n")
    deleted = Checkpointer(str(tmp_path), ONE, 2).rotate()
    # 60 may be a save in progress (newer than the newest complete one): left alone
    assert names(tmp_path) == ["checkpoint-40", "checkpoint-50", "checkpoint-60"]
    assert sorted(os.path.basename(p) for p in deleted) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_rotation_never_deletes_the_pointers_checkpoint(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    (tmp_path / ck.POINTER).write_text("checkpoint-20\n")  # e.g. resumed from an older one by hand
    Checkpointer(str(tmp_path), ONE, 1).rotate()
    assert names(tmp_path) == ["checkpoint-20", "checkpoint-30"]


def test_a_failed_save_is_removed_and_never_resumed_from(tmp_path):
    save(tmp_path, 5)
    with pytest.raises(UserError, match="could not save checkpoint-10 .*: the last complete checkpoint, "
                                        "checkpoint-5, is intact; free some space and run the same command again"):
        save(tmp_path, 10, engine=FakeEngine(fail=True))
    assert not (tmp_path / "checkpoint-10").exists()  # the partial save is gone, never a directory that looks good
    assert (tmp_path / ck.POINTER).read_text() == "checkpoint-5\n"
    assert chosen_step(tmp_path) == 5


def test_resume_choice(tmp_path):
    assert chosen_step(tmp_path) is None  # nothing yet: start afresh
    for step in (10, 20, 30):
        save(tmp_path, step)
    os.remove(tmp_path / "checkpoint-30" / ck.MARKER)  # a save that was interrupted
    os.remove(tmp_path / ck.POINTER)  # a crash between marker and pointer: the newest complete one
    assert chosen_step(tmp_path) == 20
    (tmp_path / ck.POINTER).write_text("checkpoint-10\n")
    assert chosen_step(tmp_path) == 20  # the pointer never makes us go back past a newer complete one
    assert chosen_step(tmp_path, overwrite=True) is None
    assert chosen_step(tmp_path, str(tmp_path / "checkpoint-10")) == 10
    assert Checkpointer(str(tmp_path), ONE).choose()["state"] == {"global_step": 20}  # read once, for every rank
    with pytest.raises(UserError, match="is incomplete"):
        chosen_step(tmp_path, str(tmp_path / "checkpoint-30"))
    with pytest.raises(UserError, match="no such directory"):
        chosen_step(tmp_path, str(tmp_path / "checkpoint-99"))


@pytest.mark.parametrize("harm", ["truncate", "delete", "garble"])
def test_a_damaged_complete_checkpoint_is_skipped_with_one_warning(tmp_path, caplog, harm):
    for step in (10, 20):
        save(tmp_path, step)
    states = tmp_path / "checkpoint-20" / "mp_rank_00_model_states.pt"
    if harm == "truncate":
        os.truncate(states, states.stat().st_size // 2)
    elif harm == "delete":
        os.remove(states)
    else:  # same size, but the archive's directory at the end is gone
        data = bytearray(states.read_bytes())
        data[-100:] = bytes(100)
        states.write_bytes(bytes(data))
    assert ck.damage(str(tmp_path / "checkpoint-20"))
    with caplog.at_level("WARNING"):
        assert chosen_step(tmp_path) == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "checkpoint-20 is damaged (mp_rank_00_model_states.pt" in warnings[0]
    with pytest.raises(UserError, match="checkpoint-20 is damaged"):
        chosen_step(tmp_path, str(tmp_path / "checkpoint-20"))


def test_overwrite_clears_the_previous_run_only_when_asked(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    os.remove(tmp_path / "checkpoint-20" / ck.MARKER)
    (tmp_path / "train_log.jsonl").write_text("{}\n")
    Checkpointer(str(tmp_path), ONE).clear_previous_run()
    assert sorted(os.listdir(tmp_path)) == ["train_log.jsonl"]  # other files are not ours to delete here


def test_rng_states_round_trip():
    saved = ck.rng_states()
    first = (random.random(), np.random.rand(), torch.rand(3))
    ck.set_rng_states(saved)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])
