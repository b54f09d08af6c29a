"""Export: a ZeRO-3 run on 2 ranks through the launcher, its in-run export, and `python -m ds_mlm.export` on its
checkpoint (no launcher); both load with AutoModelForMaskedLM, fill a <mask>, and hold the trained fp32 weights.
And its destination, through the commands a user types on a real run: a user's file, or a newer export, is refused in
one line unless --force (the check itself, fast: tests/unit/test_export_destination.py)."""

import hashlib
import json
import os
import sys

import pytest
import torch

from conftest import REPO, free_port, run
from ds_mlm.export import MODEL_DIR, TOKENIZER_DIR, read_marker

pytestmark = pytest.mark.slow  # real runs: a launcher, a trained model, or several processes

SEQ = 64


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, small_corpus, bpe_tokenizer_dir):
    out = tmp_path_factory.mktemp("zero3") / "out"
    run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
         REPO / "ds_mlm" / "run_mlm.py", "--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir",
         small_corpus[0], "--eval_dir", small_corpus[1], "--output_dir", out, "--architecture", "roberta-tiny",
         "--max_seq_length", str(SEQ), "--deepspeed_config", "zero3.json", "--bf16", "false",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "5", "--max_steps", "6",
         "--learning_rate", "1e-3", "--logging_steps", "2", "--save_steps", "6", "--evaluation_strategy", "steps",
         "--eval_steps", "6"])
    return out


def fill(model_dir):
    from transformers import pipeline

    guesses = pipeline("fill-mask", model=str(model_dir), device="cpu")("The school <mask> was there.")
    assert len(guesses) == 5 and all("<mask>" not in g["sequence"] for g in guesses)
    return guesses


def test_in_run_export_is_the_trained_fp32_model(zero3_run, small_corpus):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ds_mlm.collator import MLMCollator
    from ds_mlm.trainer import EVAL_SEED

    resolved = json.loads((zero3_run / "ds_config.json").read_text())
    assert resolved["zero_optimization"]["stage"] == 3 and not resolved["bf16"]["enabled"]
    model_dir = zero3_run / "roberta_thai"
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.decoder.weight.data_ptr() == model.roberta.embeddings.word_embeddings.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(zero3_run / "roberta_thai_tokenizer")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(model_dir).get_vocab()
    # trained with the vocabulary padded to 2048 rows (--pad_vocab_multiple 64, the default); exported without them
    trained = json.loads((zero3_run / "checkpoint-6" / "config.json").read_text())
    assert (trained["vocab_size"], trained["unpadded_vocab_size"]) == (2048, len(tokenizer))
    assert model.config.vocab_size == model.roberta.embeddings.word_embeddings.weight.shape[0] == len(tokenizer)
    fill(model_dir)

    # The run's last evaluation (sharded over 2 ranks, fp32 weights) equals the exported model's loss on the same
    # eval set with the same fixed masking: the export holds the trained weights, and no eval sample was lost.
    records = [json.loads(x) for x in (zero3_run / "train_log.jsonl").read_text().splitlines()]
    [last_eval] = [r for r in records if "eval_loss" in r]
    from ds_mlm.data import open_store

    evaluation = open_store(str(zero3_run / "datasets_cache" / "validation"))
    collator = MLMCollator.from_tokenizer(tokenizer, mlm_probability=0.15, seed=EVAL_SEED)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(evaluation), 7):
            indices = list(range(start, min(start + 7, len(evaluation))))
            batch = collator(evaluation.__getitems__(indices), indices, 0)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            picked = batch["labels"] != -100
            total += float(torch.nn.functional.cross_entropy(logits[picked], batch["labels"][picked], reduction="sum"))
            count += int(picked.sum())
    assert last_eval["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_export_command_on_a_zero3_checkpoint(zero3_run, tmp_path):
    from transformers import AutoModelForMaskedLM

    exported = tmp_path / "exported"
    proc = run([sys.executable, "-m", "ds_mlm.export", "--checkpoint", zero3_run / "checkpoint-6", "--output_dir",
                exported])
    assert f"exported {zero3_run / 'checkpoint-6'} to {exported / 'roberta_thai'}" in proc.stdout
    a = AutoModelForMaskedLM.from_pretrained(exported / "roberta_thai")
    b = AutoModelForMaskedLM.from_pretrained(zero3_run / "roberta_thai")
    assert a.config.vocab_size == a.lm_head.bias.shape[0] == 2000  # the tokenizer's length, no padding rows
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name  # the checkpoint's fp32 partitions == the live engine's gathered weights
    assert (exported / "roberta_thai_tokenizer").is_dir()
    fill(exported / "roberta_thai")


def test_export_command_errors_are_one_line(tmp_path):
    proc = run([sys.executable, "-m", "ds_mlm.export", "--checkpoint", tmp_path / "nope", "--output_dir", tmp_path],
               check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"ds-mlm: error: --checkpoint {tmp_path / 'nope'}: no such directory; give an OUTPUT_DIR/checkpoint-N directory"]


KILLED_EXPORT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from transformers import PreTrainedModel
def save_pretrained(self, path, *args, **kwargs):
    open(os.path.join(path, "model.safetensors"), "wb").write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of writing the export
PreTrainedModel.save_pretrained = save_pretrained
from ds_mlm.export import cli_main
cli_main(sys.argv[1:])
"""


def copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def export_cmd(checkpoint, out, *extra):
    return [sys.executable, "-m", "ds_mlm.export", "--checkpoint", checkpoint, "--output_dir", out, *extra]


def test_export_refuses_a_checkpoint_cut_short_unless_forced_and_a_damaged_one(zero3_run, tmp_path):
    cut = copy_checkpoint(zero3_run / "checkpoint-6", tmp_path / "checkpoint-6")
    (cut / "COMPLETE").unlink()  # a save that never finished
    proc = run(export_cmd(cut, tmp_path / "a"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"ds-mlm: error: {cut} has no COMPLETE marker: its save was interrupted and its files may be partial; export "
        "an earlier checkpoint, or pass --force to export it anyway"]
    forced = run(export_cmd(cut, tmp_path / "a", "--force"))
    assert "has no COMPLETE marker (--force)" in forced.stdout and (tmp_path / "a" / "roberta_thai").is_dir()

    damaged = copy_checkpoint(zero3_run / "checkpoint-6", tmp_path / "damaged" / "checkpoint-6")
    optim = sorted(damaged.glob("*optim_states.pt"))[0]
    os.truncate(optim, optim.stat().st_size // 3)
    proc = run(export_cmd(damaged, tmp_path / "b"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"ds-mlm: error: {damaged} is damaged ({optim.name} has {optim.stat().st_size:,} bytes, ")
    assert line.endswith("were written): export an earlier checkpoint")
    assert not (tmp_path / "b" / "roberta_thai").exists()


def test_a_killed_export_leaves_nothing_that_the_next_one_does_not_remove(zero3_run, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "killed_export.py"
    script.write_text(KILLED_EXPORT.format(repo=str(REPO)))
    proc = run([sys.executable, script, "--checkpoint", zero3_run / "checkpoint-6", "--output_dir", out], check=False)
    assert proc.returncode == -9
    assert [p.name.split(".tmp-")[0] for p in out.iterdir()] == ["roberta_thai"]  # a staging dir, never the final one
    run(export_cmd(zero3_run / "checkpoint-6", out))
    assert sorted(p.name for p in out.iterdir()) == ["roberta_thai", "roberta_thai_tokenizer"]  # the leftover is gone
    fill(out / "roberta_thai")


# -- the destination: what an export may replace ------------------------------------------------------------------

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
