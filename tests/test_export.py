"""Export: a ZeRO-3 run on 2 ranks through the launcher, its in-run export, and `python -m ds_mlm.export` on its
checkpoint (no launcher); both load with AutoModelForMaskedLM, fill a <mask>, and hold the trained fp32 weights."""

import json
import sys

import pytest
import torch

from conftest import REPO, free_port, run

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
