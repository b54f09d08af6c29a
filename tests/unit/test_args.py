"""The command line: every flag of the ancestor's command parses, and bad values are one-line errors."""

import subprocess
import sys

import pytest

from ds_mlm.args import build_parser, parse_args
from ds_mlm.errors import UserError

SEED_COMMAND = (
    "--tokenizer_name_or_path T --ext txt --train_dir D --eval_dir E --fp16 --max_seq_length 128 "
    "--learning_rate 5e-4 --weight_decay 0.01 --adam_beta2 0.98 --adam_epsilon 1e-6 --max_steps 20 "
    "--per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 2 "
    "--warmup_steps 5 --seed 1234 --save_steps 10 --logging_steps 10 --save_total_limit 100 "
    "--evaluation_strategy steps --eval_steps 10 --prediction_loss_only --logging_dir L --output_dir O "
    "--add_space_token --datasets_cache_dir C --datasets_type MemmapConcatFullSentenceTextDataset "
    "--architecture roberta-base --tokenizer_type spm"
).split()
SEED_FLAGS = [a[2:] for a in SEED_COMMAND if a.startswith("--")]


def test_seed_command_parses_into_the_right_fields():
    model, data, train = parse_args(SEED_COMMAND)
    assert (model.tokenizer_name_or_path, model.tokenizer_type, model.add_space_token) == ("T", "spm", True)
    assert (data.train_dir, data.eval_dir, data.ext, data.max_seq_length) == (["D"], ["E"], ["txt"], 128)
    assert data.datasets_cache_dir == "C" and data.datasets_type == "MemmapConcatFullSentenceTextDataset"
    assert (train.learning_rate, train.weight_decay, train.adam_beta2, train.adam_epsilon) == (5e-4, 0.01, 0.98, 1e-6)
    assert (train.max_steps, train.per_device_train_batch_size, train.gradient_accumulation_steps) == (20, 4, 2)
    assert (train.warmup_steps, train.seed, train.save_steps, train.save_total_limit) == (5, 1234, 10, 100)
    assert (train.evaluation_strategy, train.eval_steps, train.logging_dir, train.output_dir) == ("steps", 10, "L", "O")
    assert train.fp16 and train.prediction_loss_only and not train.bf16
    assert set(SEED_FLAGS) <= train.explicit_flags
    assert "adam_beta1" not in train.explicit_flags  # defaults are not "given": the ds_config JSON may set them


def test_help_lists_every_seed_flag_with_a_description():
    text = build_parser().format_help()
    for flag in SEED_FLAGS + ["deepspeed_config", "local_rank", "build_dataset_only"]:
        assert f"--{flag}" in text
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help line"


@pytest.mark.parametrize("spelling", ["--local_rank=1", "--local-rank=1", "--local_rank 1"])
def test_launchers_local_rank_spellings(spelling):
    *_, train = parse_args(["--train_dir", "D", "--output_dir", "O", *spelling.split()])
    assert train.local_rank == 1


def test_ext_with_or_without_dot_and_aliases():
    _, data, train = parse_args(["--train_dir", "D", "--output_dir", "O", "--ext", ".txt", "--eval_strategy", "steps",
                                 "--deepspeed", "x.json"])
    assert data.ext == ["txt"] and train.evaluation_strategy == "steps" and train.deepspeed_config == "x.json"


def test_several_sources_extensions_and_weights():
    _, data, _ = parse_args(["--train_dir", "news", "web", "--train_weights", "0.7", "0.3", "--eval_dir", "e1", "e2",
                             "--ext", "jsonl.gz", ".parquet", "--text_field", "content", "--output_dir", "O"])
    assert (data.train_dir, data.train_weights, data.eval_dir) == (["news", "web"], [0.7, 0.3], ["e1", "e2"])
    assert (data.ext, data.text_field, data.verify_data) == (["jsonl.gz", "parquet"], "content", "once")
    for extra, words in ((["--train_weights", "1"], "1 value\\(s\\) for 2 --train_dir"),
                         (["--train_weights", "1", "0"], "positive"),
                         (["--train_dir", "a", "a"], "given twice"), (["--verify_data", "sometimes"], "once")):
        with pytest.raises(UserError, match=words):
            parse_args(["--train_dir", "a", "b", "--output_dir", "O", *extra])


@pytest.mark.parametrize("extra, words", [
    (["--max_seq_length", "2"], "max_seq_length"),
    (["--architecture", "roberta-huge"], "roberta-tiny"),
    (["--datasets_type", "Nope"], "MemmapLineByLineTextDataset"),
    (["--save_total_limit", "0"], "save_total_limit"),
    (["--fp16", "--bf16"], "choose one"),
    (["--evaluation_strategy", "sometimes"], "steps"),
    (["--per_device_train_batch_size", "0"], "at least 1"),
    (["--long_sentence", "chop"], "split"),
])
def test_bad_values_are_user_errors_that_name_the_fix(extra, words):
    with pytest.raises(UserError, match=words):
        parse_args(["--train_dir", "D", "--output_dir", "O", *extra])


def test_missing_required_flags():
    with pytest.raises(UserError, match="--train_dir"):
        parse_args(["--output_dir", "O"])
    with pytest.raises(UserError, match="--output_dir"):
        parse_args(["--train_dir", "D"])


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    from ds_mlm.run_mlm import cli_main

    cases = ((["--max_seq_length", "abc"], "invalid int value"), (["--save_total_limit", "0"], "save_total_limit"),
             (["--no_such_flag", "1"], "unrecognized arguments"))
    for argv, needle in cases[1:]:  # in this process: the cli wrapper's own exit
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["--train_dir", "D", "--output_dir", str(tmp_path), *argv])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, stderr
        assert needle in stderr and "Traceback" not in stderr
        assert len([line for line in stderr.splitlines() if "error" in line]) == 1
    argv, needle = cases[0]  # and once as the real command
    proc = subprocess.run([sys.executable, "-m", "ds_mlm.run_mlm", "--train_dir", "D", "--output_dir",
                           str(tmp_path), *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1


HEAVY = ("torch", "transformers", "deepspeed", "numba", "pythainlp", "sentencepiece", "tokenizers")
PROBE = """
import runpy, sys
sys.argv = ["run_mlm.py", *sys.argv[1:]]
try:
    runpy.run_module("ds_mlm.run_mlm", run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print("HEAVY", ",".join(heavy), "EXIT", code, file=sys.stderr)
""" % (HEAVY,)


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["--train_dir", "D", "--max_seq_length", "x"], 2)])
def test_help_and_bad_flags_import_no_heavy_library(argv, status):
    # `--help` and a mistyped flag must answer at once: nothing of torch / transformers / DeepSpeed / numba loaded
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    probe = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY")]
    assert probe == [f"HEAVY  EXIT {status}"], proc.stderr
    if status == 0:
        assert "--tokenizer_name_or_path" in proc.stdout and "--deepspeed_config" in proc.stdout
    else:
        assert "ds-mlm: error: argument --max_seq_length" in proc.stderr
