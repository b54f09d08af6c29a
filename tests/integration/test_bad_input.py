"""Bad input: each mistake is one line naming the bad thing and the fix, exit status 2, no traceback, and the caches
and checkpoints of an earlier run are left exactly as they were.

Mistakes in the flags themselves fail while parsing: they need no earlier run (PARSE_CASES, fast). For the others a
good run (2 steps, a checkpoint) is made once, and every case points the same command at its output and cache
directories with one thing wrong (slow: a real run first). Most cases call the CLI entry in-process; a few go
through a real subprocess to prove the exit status and stderr of the command users type.
"""

import hashlib
import os
import sys

import pytest

from conftest import build_bpe_tokenizer, run


def good_args(tok, train, evaluation, out):
    return ["--tokenizer_name_or_path", str(tok), "--train_dir", str(train), "--eval_dir", str(evaluation),
            "--output_dir", str(out), "--datasets_cache_dir", str(out / "cache"), "--architecture", "roberta-tiny",
            "--max_seq_length", "64", "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "2",
            "--logging_steps", "1", "--deepspeed_config", "zero0.json"]


def with_flag(args, flag, value):
    """`args` with `flag` set to `value` (replaced if present, appended otherwise)."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def tree_digest(*roots) -> dict:
    """relative path -> (size, mtime_ns, sha1) of every file under the roots: what 'left untouched' means."""
    out = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    digest = hashlib.sha1(f.read()).hexdigest()
                st = os.stat(path)
                out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, small_corpus, bpe_tokenizer_dir):
    """An earlier run's output dir (a checkpoint, a final model) and its token stores."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    run([sys.executable, "-m", "ds_mlm.run_mlm", *good_args(bpe_tokenizer_dir, *small_corpus, out)])
    assert (out / "checkpoint-2" / "COMPLETE").is_file() and (out / "cache" / "train").exists()
    return out


def call(argv, capsys):
    """The CLI in-process: (exit status, stderr lines)."""
    from ds_mlm.run_mlm import cli_main

    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def folder_with(path, *files) -> str:
    path.mkdir()
    for name in files:
        (path / name).write_text("some text\n")
    return str(path)


def write_config(tmp_path, text):
    path = tmp_path / "ds.json"
    path.write_text(text)
    return str(path)


def other_specials_tokenizer(tmp_path, sample_dirs):
    """A BPE tokenizer whose special tokens sit at other ids than the model config expects (<pad>=0, <s>=1)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(p) for p in sorted(sample_dirs[1].glob("*.txt"))], vocab_size=400, min_frequency=2,
              special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<mask>"], show_progress=False)
    folder = tmp_path / "odd_tokenizer"
    folder.mkdir()
    bpe.save_model(str(folder))
    RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt")).save_pretrained(str(folder))
    return str(folder)


PARSE_CASES = {  # name -> (how the good command is changed, words the message must contain): refused by parse_args
    "max_seq_length too small": (lambda a, t: with_flag(a, "--max_seq_length", "2"), ["--max_seq_length 2"]),
    "max_seq_length not a number": (lambda a, t: with_flag(a, "--max_seq_length", "long"),
                                    ["--max_seq_length", "invalid int value", "'long'"]),
    "architecture unknown": (lambda a, t: with_flag(a, "--architecture", "roberta-huge"), ["roberta-huge",
                                                                                             "roberta-base"]),
    "datasets_type unknown": (lambda a, t: with_flag(a, "--datasets_type", "Lines"), ["Lines",
                                                                                       "MemmapLineByLineTextDataset"]),
    "save_total_limit 0": (lambda a, t: with_flag(a, "--save_total_limit", "0"), ["--save_total_limit 0"]),
    "fp16 and bf16": (lambda a, t: a + ["--fp16", "--bf16"], ["--fp16 and --bf16 both given"]),
    "unknown flag": (lambda a, t: a + ["--learning_rte", "1e-4"], ["unrecognized arguments: --learning_rte"]),
}


@pytest.mark.parametrize("case", sorted(PARSE_CASES))
def test_a_bad_flag_is_one_line_before_anything_happens(case, tmp_path, capsys):
    change, words = PARSE_CASES[case]
    argv = change(good_args(tmp_path / "tok", tmp_path / "train", tmp_path / "eval", tmp_path / "out"), tmp_path)
    code, err = call(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("ds-mlm: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert list(tmp_path.iterdir()) == []  # nothing created, not even the output directory


CASES = {  # name -> (how the good command is changed, words the message must contain): refused after parsing
    "train_dir missing": (lambda a, t: with_flag(a, "--train_dir", str(t / "nope")), ["--train_dir", "nope"]),
    "train_dir empty": (lambda a, t: with_flag(a, "--train_dir", folder_with(t / "empty")), ["--train_dir", "*.txt"]),
    "train_dir without txt": (lambda a, t: with_flag(a, "--train_dir", folder_with(t / "md", "a.md")),
                              ["--train_dir", "*.txt"]),
    "eval_dir missing": (lambda a, t: with_flag(a, "--eval_dir", str(t / "gone")), ["--eval_dir", "gone"]),
    "max_seq_length too large": (lambda a, t: with_flag(a, "--max_seq_length", "600"),
                                 ["--max_seq_length 600", "use --max_seq_length 512 or less"]),
        "tokenizer path missing": (lambda a, t: with_flag(a, "--tokenizer_name_or_path", str(t / "no_tok")),
                               ["no_tok"]),
    "tokenizer type unknown": (lambda a, t: with_flag(a, "--tokenizer_type", "wordpiece"),
                               ["wordpiece", "newmm"]),
    "tokenizer type wrong for files": (lambda a, t: with_flag(a, "--tokenizer_type", "spm"), ["spm"]),
    "ds_config malformed": (lambda a, t: with_flag(a, "--deepspeed_config",
                                                   write_config(t, '{\n  "zero_optimization": {"stage": 2,}\n}')),
                            ["ds.json:2:", "malformed JSON"]),
    "ds_config zero stage": (lambda a, t: with_flag(a, "--deepspeed_config",
                                                    write_config(t, '{"zero_optimization": {"stage": 4}}')),
                             ["unknown ZeRO stage 4", "0, 1, 2 or 3"]),
    "ds_config batch arithmetic": (lambda a, t: with_flag(a, "--deepspeed_config",
                                                          write_config(t, '{"train_batch_size": 7}')),
                                   ["train_batch_size 7", "micro batch 4", "gradient accumulation 1",
                                    "world size 1"]),
    "ds_config fp16 and bf16": (lambda a, t: with_flag(a, "--deepspeed_config", write_config(
        t, '{"fp16": {"enabled": true}, "bf16": {"enabled": true}}')), ["both fp16 and bf16"]),
    "ds_config optimizer without a CPU kernel": (lambda a, t: with_flag(a, "--deepspeed_config", write_config(
        t, '{"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}')), ["Lamb has no CPU kernel", "AdamW"]),
    "ds_config unknown optimizer": (lambda a, t: with_flag(a, "--deepspeed_config", write_config(
        t, '{"optimizer": {"type": "AdamWW"}}')), ["unknown optimizer type 'AdamWW'"]),
    "ds_config unknown scheduler": (lambda a, t: with_flag(a, "--deepspeed_config", write_config(
        t, '{"scheduler": {"type": "Cosine"}}')), ["unknown scheduler type 'Cosine'", "WarmupCosineLR"]),
    "ds_config learning rate 0": (lambda a, t: with_flag(a, "--deepspeed_config", write_config(
        t, '{"optimizer": {"type": "AdamW", "params": {"lr": 0}}}')), ["optimizer.params.lr is 0", "positive"]),
    "ds_config key DeepSpeed rejects": (lambda a, t: with_flag(a, "--deepspeed_config", write_config(
        t, '{"zero_optimization": {"stage": 0, "overlap_comms": true}}')),
        ["DeepSpeed rejects this config", "overlap_comms", "Extra inputs are not permitted"]),
    # a resume the checkpoint cannot fit: refused before any build, write or load (ds_config.json kept as it was)
    "resume under another ZeRO stage": (lambda a, t: with_flag(a, "--deepspeed_config", "zero1.json"),
                                        ["cannot resume", "ZeRO stage: 0 in the checkpoint, 1 now"]),
    "resume with another seed": (lambda a, t: with_flag(a, "--seed", "7"),
                                 ["cannot resume", "--seed: 42 in the checkpoint, 7 now"]),
    "resume with another tokenizer": (lambda a, t: with_flag(a, "--tokenizer_name_or_path",
                                                             str(build_bpe_tokenizer(t / "tok", 1500))),
                                      ["cannot resume", "the tokenizer: fingerprint", "vocab_size"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, earlier_run, small_corpus, bpe_tokenizer_dir,
                                                   world_of_one, capsys):
    before = tree_digest(earlier_run)
    change, words = CASES[case]
    argv = change(good_args(bpe_tokenizer_dir, *small_corpus, earlier_run), tmp_path)
    code, err = call(argv, capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("ds-mlm: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert tree_digest(earlier_run) == before  # no cache, checkpoint, log or model of the earlier run touched


@pytest.mark.slow
def test_special_ids_that_do_not_match_the_config(tmp_path, earlier_run, small_corpus, sample_dirs, world_of_one,
                                                  capsys):
    before = tree_digest(earlier_run)
    argv = good_args(other_specials_tokenizer(tmp_path, sample_dirs), *small_corpus, earlier_run)
    code, err = call(argv, capsys)
    assert code == 2 and len(err) == 1
    assert "the tokenizer's bos token id is 1 but the model config expects 0" in err[0]
    assert tree_digest(earlier_run) == before


@pytest.mark.slow
def test_the_real_command_prints_one_line_and_exits_2(tmp_path, earlier_run, small_corpus, bpe_tokenizer_dir):
    before = tree_digest(earlier_run)
    argv = with_flag(good_args(bpe_tokenizer_dir, *small_corpus, earlier_run), "--max_seq_length", "600")
    proc = run([sys.executable, "-m", "ds_mlm.run_mlm", *argv], check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "ds-mlm: error: --max_seq_length 600 does not fit max_position_embeddings 514 (RoBERTa needs "
        "max_seq_length + pad_token_id + 1 <= max_position_embeddings): use --max_seq_length 512 or less"]
    assert tree_digest(earlier_run) == before


@pytest.mark.slow  # a fresh interpreter or a whole run: seconds
def test_ext_with_or_without_the_dot(tmp_path, small_corpus, bpe_tokenizer_dir):
    """The ancestor's default `.txt` made the pattern `*..txt`; both spellings read the same files."""
    from ds_mlm.data import open_store

    from ds_mlm.run_mlm import main

    stores = []
    for name, ext in (("plain", "txt"), ("dotted", ".txt")):
        out = tmp_path / name
        assert main([*good_args(bpe_tokenizer_dir, *small_corpus, out), "--ext", ext, "--build_dataset_only"]) == 0
        stores.append(open_store(str(out / "cache" / "train")))
    assert len(stores[0]) > 0
    assert stores[0].fingerprint == stores[1].fingerprint  # the same files, tokenizer and settings
    plain, dotted = ([store[i].tolist() for i in range(len(store))] for store in stores)
    assert plain == dotted
