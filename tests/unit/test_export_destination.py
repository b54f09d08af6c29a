"""Export never destroys what it did not write (export.check_destination): a destination holding a user's file, or a
newer export, is refused in one line unless --force, which names what it replaces; the run's final export replaces
its own earlier export. Here, fast: the check on directories made here. The commands a user types, on a real run:
tests/integration/test_export.py."""

import json

import pytest

from ds_mlm.errors import UserError
from ds_mlm.export import MARKER, MODEL_DIR, TOKENIZER_DIR, check_destination


def exported(root, step, files=("config.json", "model.safetensors")):
    """A directory as an export of `step` leaves it (files, marker)."""
    for name in (MODEL_DIR, TOKENIZER_DIR):
        (root / name).mkdir(parents=True)
        for f in files:
            (root / name / f).write_text("x")
        (root / name / MARKER).write_text(json.dumps({"format": "ds-mlm export", "step": step, "source": "ckpt",
                                                      "files": sorted(files)}))


def test_a_users_file_is_refused_and_forced_replacements_are_named(tmp_path):
    exported(tmp_path, 4)
    (tmp_path / MODEL_DIR / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as refused:
        check_destination(str(tmp_path), 5)
    assert str(refused.value) == (f"{tmp_path / MODEL_DIR} holds 1 file(s) that no export wrote (notes.txt): "
                                  "exporting would delete them; move them away or choose another --output_dir (or "
                                  "pass --force to replace the directory)")
    assert check_destination(str(tmp_path), 5, force=True) == [
        f"{tmp_path / MODEL_DIR} holds 1 file(s) that no export wrote (notes.txt)"]
    assert (tmp_path / MODEL_DIR / "notes.txt").read_text() == "mine"  # a check deletes nothing


def test_an_older_step_over_a_newer_export_needs_force(tmp_path):
    exported(tmp_path, 10)
    assert check_destination(str(tmp_path), 10) == [] and check_destination(str(tmp_path), 12) == []
    with pytest.raises(UserError, match=r"holds the export of step 10 \(ckpt\), newer than step 2: pass --force"):
        check_destination(str(tmp_path), 2)
    assert len(check_destination(str(tmp_path), 2, force=True)) == 2  # both directories named


def test_a_directory_without_marker_is_not_ours_except_an_old_final_export(tmp_path):
    (tmp_path / MODEL_DIR).mkdir()
    (tmp_path / MODEL_DIR / "config.json").write_text("{}")  # an export made before the marker, or a user's model
    with pytest.raises(UserError, match="holds 1 file"):
        check_destination(str(tmp_path), 3)
    own = {"config.json", "model.safetensors", "tokenizer.json"}
    assert check_destination(str(tmp_path), final_names=own) == []  # the run's own final export replaces it
    (tmp_path / MODEL_DIR / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as refused:
        check_destination(str(tmp_path), final_names=own)
    assert "(notes.txt)" in str(refused.value) and "--force" not in str(refused.value)
    (tmp_path / TOKENIZER_DIR).write_text("a file where a directory goes")
    (tmp_path / MODEL_DIR / "notes.txt").unlink()
    with pytest.raises(UserError, match=f"{TOKENIZER_DIR} holds 1 file"):
        check_destination(str(tmp_path), final_names=own)
