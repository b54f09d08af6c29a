"""The seed command, unchanged but for paths and small values, through the real deepspeed launcher on CPU."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForMaskedLM

from conftest import REPO, deepspeed_cmd, run
from ds_mlm.tokenization import load_tokenizer


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
    assert "bf16" in proc.stdout + proc.stderr  # --fp16 on this CPU runs bf16, and says so

    export = out / "roberta_thai"
    model = AutoModelForMaskedLM.from_pretrained(export)
    tokenizer = load_tokenizer(str(export), "auto")
    inputs = tokenizer("The school <mask> was there.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    position = (inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero().item()
    guess = tokenizer.decode([int(logits[0, position].argmax())])
    assert guess.strip() != "" or guess == " "  # a real token was predicted
    assert (out / "roberta_thai_tokenizer").is_dir()

    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert any("eval_loss" in r for r in records)
    resolved = json.loads((out / "ds_config.json").read_text())
    assert resolved["train_batch_size"] == 4 * 2 * 1
    assert resolved["bf16"]["enabled"] is True and not resolved.get("fp16", {}).get("enabled", False)
