"""GPU-throughput options, exercised on CPU in a world of one: the tflops / mfu / data_wait record, the padded
vocabulary (training and every export), and --torch_compile training and resuming exactly."""

import json

import pytest
import torch

from conftest import SEQ, TIMING, cpu_mixed_precision, make_trainer, read_log, train


def test_throughput_record_and_mfu_with_peak_tflops(tmp_path, data, world_of_one, monkeypatch):
    from ds_mlm.flops import train_flops
    from ds_mlm.loader import StepLoader

    seen = []
    take = StepLoader.next

    def recorded(self):
        step = take(self)
        seen.append(step)
        return step

    monkeypatch.setattr(StepLoader, "next", recorded)
    trainer = make_trainer(tmp_path, data, world_of_one, "--max_steps", "4", "--logging_steps", "2",
                           "--gradient_accumulation_steps", "2", "--peak_tflops", "0.25", eval_set=False)
    train(trainer)
    records = read_log(tmp_path / "out")
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.25, rel=1e-12)
        assert 0 <= r["data_wait"] <= 1 and "peak_memory_gib" not in r  # CPU: no CUDA memory to report
    # a fresh checkout JIT-compiles the masking kernels (numba) in the loader's first steps: the share is judged after
    assert records[-1]["data_wait"] < 0.5
    # each micro-batch counts the FLOPs of its own shape and masked tokens, on the padded model (2000 -> 2048 rows)
    config = trainer.engine.module.config
    assert config.vocab_size == 2048 and len(seen) == 4
    for step in seen:
        assert len(step.micro_batches) == len(step.shapes) == 2
        for batch, (rows, width, masked) in zip(step.micro_batches, step.shapes):
            assert batch["input_ids"].shape == (rows, width) == (8, SEQ)
            assert masked == int((batch["labels"] != -100).sum()) > 0
            assert train_flops(config, rows, width, masked) > 0
    window_flops = sum(train_flops(config, *shape) for step in seen[2:] for shape in step.shapes)  # steps 3 and 4
    window_seconds = 2 * 16 / records[1]["samples_per_s"]  # 2 steps of 8 x 2 samples
    assert records[1]["tflops"] == pytest.approx(window_flops / window_seconds / 1e12, rel=1e-6)


def test_no_mfu_on_cpu_without_peak_tflops(tmp_path, data, world_of_one):
    trainer = make_trainer(tmp_path, data, world_of_one, "--max_steps", "1", "--logging_steps", "1", eval_set=False)
    train(trainer)
    [record] = read_log(tmp_path / "out")
    assert "mfu" not in record and record["tflops"] > 0 and trainer.plan.peak_tflops is None


@pytest.mark.parametrize("config", ["zero0.json", "zero1.json", "zero2.json", "zero3.json"])
def test_padded_training_exports_exactly_the_tokenizers_rows(tmp_path, data, world_of_one, config):
    """Trained with 2048 rows for 2000 tokens: the live export and the checkpoint export have 2000 rows,
    vocab_size 2000, and the trained model's logits on the real tokens; the collator drew only real ids."""
    from transformers import AutoModelForMaskedLM

    from ds_mlm.export import export_checkpoint, export_model

    tokenizer = data[0]
    trainer = make_trainer(tmp_path, data, world_of_one, "--deepspeed_config", config, "--bf16", "false",
                           "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "5e-3", eval_set=False)
    assert trainer.loader.collator.vocab_size == len(tokenizer) == 2000  # random replacements: real ids only
    train(trainer)
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "config.json").read_text())
    assert (saved["vocab_size"], saved["unpadded_vocab_size"]) == (2048, 2000)  # the tensors' shapes, the real ids

    live = export_model(trainer.engine, tokenizer, str(tmp_path / "live"), trainer.dist)
    from_checkpoint = export_checkpoint(str(tmp_path / "out" / "checkpoint-2"), str(tmp_path / "ckpt"))
    ids = torch.randint(5, 2000, (2, 24))
    trainer.engine.eval()
    with torch.no_grad():
        trained = trainer.engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    assert trained.shape == (2, 24, 2000)
    for model_dir in (live, from_checkpoint):
        model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
        assert model.config.vocab_size == len(tokenizer) == 2000
        assert "unpadded_vocab_size" not in model.config.to_dict()
        assert model.roberta.embeddings.word_embeddings.weight.shape[0] == 2000 == model.lm_head.bias.shape[0]
        assert model.lm_head.decoder.weight.data_ptr() == model.roberta.embeddings.word_embeddings.weight.data_ptr()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, trained)
    a, b = (AutoModelForMaskedLM.from_pretrained(d).state_dict() for d in (live, from_checkpoint))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_vocabulary_padding(tmp_path, data, world_of_one):
    from ds_mlm.errors import UserError

    train(make_trainer(tmp_path, data, world_of_one, "--max_steps", "1", "--logging_steps", "1", eval_set=False))
    with pytest.raises(UserError, match="cannot resume .*checkpoint-1: the model: vocab_size 2048 in the checkpoint, "
                                        "vocab_size 2000 now"):
        make_trainer(tmp_path, data, world_of_one, "--max_steps", "2", "--logging_steps", "1",
                     "--pad_vocab_multiple", "1", eval_set=False)


def test_export_refuses_a_tokenizer_of_another_length(tmp_path, data, world_of_one, bpe_tokenizer_dir):
    from conftest import build_bpe_tokenizer
    from ds_mlm.errors import UserError
    from ds_mlm.export import export_checkpoint

    train(make_trainer(tmp_path, data, world_of_one, "--max_steps", "1", "--logging_steps", "1", eval_set=False))
    other = build_bpe_tokenizer(tmp_path / "other", vocab_size=1500)
    with pytest.raises(UserError, match="the tokenizer has 1500 tokens but .* was trained with 2000"):
        export_checkpoint(str(tmp_path / "out" / "checkpoint-1"), str(tmp_path / "x"), str(other))


@pytest.mark.slow
def test_compile_trains_and_resumes_exactly(tmp_path, data, world_of_one):
    """--torch_compile on CPU (inductor): 6 steps straight equal 3 steps, a stop, and a resume to 6 (every logged
    number but the timings), with plain parameter names in the checkpoint; and it trains the same model as eager."""
    flags = ("--torch_compile", "--deepspeed_config", "zero1.json", "--logging_steps", "1", "--save_steps", "3",
             "--learning_rate", "2e-3", "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "2",
             "--max_steps", "6")
    straight = make_trainer(tmp_path / "a", data, world_of_one, *flags, eval_set=False)
    assert straight.loader.collator.pad_to_multiple_of == 64
    train(straight)
    assert straight.engine.module.roberta.encoder._compiled_call_impl is not None  # compiled in place
    train(make_trainer(tmp_path / "b", data, world_of_one, *flags, "--max_steps", "3", eval_set=False))
    resumed = make_trainer(tmp_path / "b", data, world_of_one, *flags, eval_set=False)
    assert resumed.resumed and resumed.global_step == 3
    train(resumed)

    def numbers(out):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_log(out)]

    assert [r["step"] for r in numbers(tmp_path / "a" / "out")] == [1, 2, 3, 4, 5, 6]
    assert numbers(tmp_path / "b" / "out") == numbers(tmp_path / "a" / "out")  # equal, not close
    a, b = (torch.load(tmp_path / run / "out" / "checkpoint-6" / "mp_rank_00_model_states.pt", weights_only=False)
            ["module"] for run in "ab")
    assert not any("_orig_mod" in k for k in b)  # compiled in place: the names of an eager run
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the weights too, bit for bit

    # the compiled encoder computes the eager encoder's function (eval mode: no dropout, whose masks differ)
    model = resumed.engine.module.eval()
    batch = resumed.loader.collator(data[1].__getitems__([0, 1, 2]), [0, 1, 2], 0)
    with torch.no_grad():
        compiled = model(**batch)[0]
        model.roberta.encoder._compiled_call_impl, kept = None, model.roberta.encoder._compiled_call_impl
        eager = model(**batch)[0]
    model.roberta.encoder._compiled_call_impl = kept
    close = 1e-2 if cpu_mixed_precision() == "bf16" else 1e-5  # fused kernels round differently in bf16
    assert float(compiled) == pytest.approx(float(eager), rel=close)
