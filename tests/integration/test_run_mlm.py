"""The seed command, unchanged but for paths and small values, through the real deepspeed launcher on CPU."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForMaskedLM

from conftest import deepspeed_cmd, fp16_fallback_warning, fp16_precision, run
from ds_mlm.tokenization import load_tokenizer

pytestmark = pytest.mark.slow  # real runs: a launcher, a trained model, or several processes


@pytest.fixture(scope="module")
def spm_tokenizer_dir(tmp_path_factory, small_corpus):
    out = tmp_path_factory.mktemp("spm") / "tokenizer"
    run([sys.executable, "-m", "ds_mlm.train_tokenizer", "--type", "spm", "--input_dir", small_corpus[0],
         "--vocab_size", "1000", "--output_dir", out])
    return out


def seed_command(tok, train, evaluation, out, **over):
    values = dict(max_seq_length=64, max_steps=6, save_steps=3, logging_steps=2, eval_steps=3, warmup_steps=2,
                  architecture="roberta-tiny", tokenizer_type="spm")
    values.update(over)
    return (f"--tokenizer_name_or_path {tok} --ext txt --train_dir {train} --eval_dir {evaluation} --fp16 "
            f"--max_seq_length {values['max_seq_length']} --learning_rate 5e-4 --weight_decay 0.01 --adam_beta2 0.98 "
            f"--adam_epsilon 1e-6 --max_steps {values['max_steps']} --per_device_train_batch_size 4 "
            f"--per_device_eval_batch_size 4 --gradient_accumulation_steps 2 --warmup_steps {values['warmup_steps']} "
            f"--seed 1234 --save_steps {values['save_steps']} --logging_steps {values['logging_steps']} "
            f"--save_total_limit 100 --evaluation_strategy steps --eval_steps {values['eval_steps']} "
            f"--prediction_loss_only --logging_dir {out}/logs --output_dir {out} --add_space_token "
            f"--datasets_cache_dir {out}/cache --datasets_type MemmapConcatFullSentenceTextDataset "
            f"--architecture {values['architecture']} --tokenizer_type {values['tokenizer_type']}").split()


def test_seed_command_through_the_deepspeed_launcher(tmp_path, small_corpus, spm_tokenizer_dir):
    out = tmp_path / "run"
    proc = run(deepspeed_cmd(*seed_command(spm_tokenizer_dir, *small_corpus, out)), timeout=900)
    used = fp16_precision()  # --fp16 on a CPU: fp16 where DeepSpeed takes it, else bf16 where native, else fp32
    assert fp16_fallback_warning(used) in proc.stdout + proc.stderr
    assert ("fp16 is not supported" in proc.stdout + proc.stderr) is (used != "fp16")

    export = out / "roberta_thai"
    model = AutoModelForMaskedLM.from_pretrained(export)
    tokenizer = load_tokenizer(str(export), "auto")
    inputs = tokenizer("The school <mask> was there.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    position = (inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero().item()
    assert int(logits[0, position].argmax()) not in tokenizer.all_special_ids  # a word, not <pad> or <mask>
    assert (out / "roberta_thai_tokenizer").is_dir()

    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert any("eval_loss" in r for r in records)
    resolved = json.loads((out / "ds_config.json").read_text())
    assert resolved["train_batch_size"] == 4 * 2 * 1
    assert (resolved["bf16"]["enabled"], resolved["fp16"]["enabled"]) == (used == "bf16", used == "fp16")


# -- every tokenizer type, end to end: train it, build the dataset with it, train a few steps, export ---------------

@pytest.fixture(scope="module")
def segmented_corpus(tmp_path_factory, small_corpus):
    """The small corpus cut into words by an offline segmenter, words joined by <|> (the sefr_cut input)."""
    from pythainlp.tokenize.newmm import segment

    root = tmp_path_factory.mktemp("segmented")
    for split, folder in zip(("train", "eval"), small_corpus):
        (root / split).mkdir()
        for src in sorted(folder.glob("*.txt")):
            lines = src.read_text(encoding="utf-8").splitlines()
            (root / split / src.name).write_text("\n".join("<|>".join(segment(x)) for x in lines) + "\n",
                                                 encoding="utf-8")
    return root / "train", root / "eval"


@pytest.mark.parametrize("kind", ["newmm", "syllable", "sefr_cut", "bpe"])
def test_each_tokenizer_type_builds_its_dataset_and_trains(kind, tmp_path, small_corpus, segmented_corpus,
                                                           world_of_one):
    from ds_mlm.data import open_store
    from ds_mlm.run_mlm import main
    from ds_mlm.train_tokenizer import main as train_tokenizer

    train, evaluation = segmented_corpus if kind == "sefr_cut" else small_corpus
    tok_dir, out = tmp_path / "tokenizer", tmp_path / "out"
    # a vocabulary of every word of the training text (BPE: 800 pieces), so no training token may be <unk>
    size = "800" if kind == "bpe" else "30000"
    assert train_tokenizer(["--type", kind, "--input_dir", str(train), "--vocab_size", size, "--min_frequency", "1",
                            "--output_dir", str(tok_dir)]) == 0
    tokenizer_type = "auto" if kind == "bpe" else kind
    space = [] if kind == "bpe" else ["--add_space_token"]  # byte-level BPE keeps spaces itself
    assert main(["--tokenizer_name_or_path", str(tok_dir), "--tokenizer_type", tokenizer_type, *space,
                 "--train_dir", str(train), "--eval_dir", str(evaluation), "--output_dir", str(out),
                 "--architecture", "roberta-tiny", "--max_seq_length", "64", "--per_device_train_batch_size", "4",
                 "--max_steps", "3", "--logging_steps", "1", "--save_steps", "3", "--evaluation_strategy", "steps",
                 "--eval_steps", "3", "--deepspeed_config", "zero0.json"]) == 0

    tokenizer = load_tokenizer(str(tok_dir), tokenizer_type, add_space_token=bool(space))
    store = open_store(str(out / "datasets_cache" / "train"))
    first = store[0].tolist()
    assert first[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in first
    assert max(max(store[i].tolist()) for i in range(len(store))) < len(tokenizer)
    assert not any(tokenizer.unk_token_id in store[i].tolist() for i in range(len(store)))  # same cutting twice
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and any("eval_loss" in r for r in records)
    model = AutoModelForMaskedLM.from_pretrained(out / "roberta_thai")
    assert model.config.vocab_size == len(tokenizer)
    reloaded = load_tokenizer(str(out / "roberta_thai"), "auto")
    text = "<|>".join(["ข่าว", " ", "วันนี้"]) if kind == "sefr_cut" else "ข่าว วันนี้ The school"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
