"""Export never destroys what it did not write (export.check_destination): a destination holding a user's file, or a
newer export, is refused in one line unless --force, which names what it replaces; the run's final export replaces
its own earlier export. Fast: the check on directories made here. Slow: the commands a user types, on a real run."""

import hashlib
import json
import os
import sys

import pytest

from conftest import run
from ds_mlm.errors import UserError
from ds_mlm.export import MARKER, MODEL_DIR, TOKENIZER_DIR, check_destination, read_marker


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


def digest(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha1(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, small_corpus, bpe_tokenizer_dir):
    """A run of 4 steps (checkpoints 2 and 4, the final export of step 4) and the command that made it."""
    out = tmp_path_factory.mktemp("four") / "out"
    cmd = [sys.executable, "-m", "ds_mlm.run_mlm", "--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir",
           small_corpus[0], "--eval_dir", small_corpus[1], "--output_dir", out, "--architecture", "roberta-tiny",
           "--max_seq_length", "64", "--per_device_train_batch_size", "4", "--max_steps", "4", "--save_steps", "2",
           "--logging_steps", "2", "--deepspeed_config", "zero0.json"]
    run(cmd)
    assert read_marker(out / MODEL_DIR)["step"] == 4
    return out, cmd


def export_cmd(checkpoint, out, *extra):
    return [sys.executable, "-m", "ds_mlm.export", "--checkpoint", checkpoint, "--output_dir", out, *extra]


@pytest.mark.slow
def test_export_over_a_directory_with_a_users_file(four_steps, tmp_path):
    out, _ = four_steps
    dest = tmp_path / "dest"
    (dest / MODEL_DIR).mkdir(parents=True)
    (dest / MODEL_DIR / "notes.txt").write_text("my notes")
    proc = run(export_cmd(out / "checkpoint-4", dest), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"ds-mlm: error: {dest / MODEL_DIR} holds 1 file(s) that no export wrote (notes.txt): exporting would delete "
        "them; move them away or choose another --output_dir (or pass --force to replace the directory)"]
    assert digest(dest) == {f"{MODEL_DIR}/notes.txt": hashlib.sha1(b"my notes").hexdigest()}  # nothing lost or added
    forced = run(export_cmd(out / "checkpoint-4", dest, "--force"))
    assert f"--force: replacing {dest / MODEL_DIR} holds 1 file(s) that no export wrote (notes.txt)" \
        in forced.stdout
    assert read_marker(dest / MODEL_DIR)["step"] == 4 and not (dest / MODEL_DIR / "notes.txt").exists()


@pytest.mark.slow
def test_an_older_checkpoint_over_the_final_export_needs_force_and_the_final_export_replaces_its_own(four_steps):
    out, cmd = four_steps
    final = digest(out / MODEL_DIR)
    proc = run(export_cmd(out / "checkpoint-2", out), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"ds-mlm: error: {out / MODEL_DIR} holds the export of step 4 (the run), newer than step 2: pass --force to "
        "replace it with the older one, or choose another --output_dir"]
    assert digest(out / MODEL_DIR) == final  # the step-4 model is intact
    forced = run(export_cmd(out / "checkpoint-2", out, "--force"))
    assert "replacing" in forced.stdout and read_marker(out / MODEL_DIR)["step"] == 2
    run(cmd)  # the same run again: training is done, its final export replaces the step-2 one, as before
    assert read_marker(out / MODEL_DIR)["step"] == 4 and digest(out / MODEL_DIR) == final

    (out / TOKENIZER_DIR / "notes.txt").write_text("mine")  # the run itself refuses before it starts
    proc = run(cmd, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"ds-mlm: error: {out / TOKENIZER_DIR} holds 1 file(s) that no export wrote (notes.txt): exporting would "
        "delete them; move them away or choose another --output_dir")
    assert (out / TOKENIZER_DIR / "notes.txt").read_text() == "mine"
