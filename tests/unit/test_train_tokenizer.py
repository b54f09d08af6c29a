"""The train-tokenizer command: every kind from a slice of the sample corpus, loadable with `auto` and its own type;
text cleaning; vocabulary size and frequency cut; one-line errors for bad input."""

import json
import sys

import pytest

from ds_mlm.tokenization import SPECIAL_TOKENS, load_tokenizer
from ds_mlm.train_tokenizer import TrainTokenizerArguments, cli_main, train

from conftest import SAMPLE, run

KINDS = {"spm": "spm", "newmm": "newmm", "syllable": "syllable", "sefr_cut": "sefr_cut", "bpe": "auto"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """100 lines of each sample file (sefr_cut: the same lines segmented with <|>)."""
    from pythainlp.tokenize.newmm import segment

    root = tmp_path_factory.mktemp("corpus")
    (root / "plain").mkdir()
    (root / "segmented").mkdir()
    for src in sorted((SAMPLE / "train").glob("*.txt")):
        lines = src.read_text(encoding="utf-8").splitlines()[:100]
        (root / "plain" / src.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / "segmented" / src.name).write_text("\n".join("<|>".join(segment(x)) for x in lines) + "\n",
                                                   encoding="utf-8")
    return root


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_trains_through_the_command_and_loads_with_auto_and_its_type(corpus, tmp_path, kind):
    source = corpus / ("segmented" if kind == "sefr_cut" else "plain")
    extra = ["--model_type", "bpe"] if kind == "spm" else ["--min_frequency", "2"]
    command = ["--type", kind, "--input_dir", str(source), "--vocab_size", "700", "--output_dir", str(tmp_path),
               "--num_workers", "2", *extra]
    if kind == "spm":  # as users (and test_run_mlm) run it
        run([sys.executable, "-m", "ds_mlm.train_tokenizer", *command])
    else:  # the same command in this process: no interpreter start-up
        with pytest.raises(SystemExit) as exit_info:
            cli_main(command)
        assert exit_info.value.code == 0
    text = "<|>".join(["ข่าว", " ", "วันนี้"]) if kind == "sefr_cut" else "ข่าว วันนี้ The school"
    ids = None
    for tokenizer_type in {"auto", KINDS[kind]}:
        tok = load_tokenizer(tmp_path, tokenizer_type)
        assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
        assert len(tok) <= 700
        assert ids in (None, tok(text)["input_ids"])
        ids = tok(text)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) > 3


def test_word_vocabulary_is_cleaned_cut_by_frequency_and_ranked(tmp_path):
    (tmp_path / "in").mkdir()
    # A BOM (as thaigov has before each article), padding spaces, blank lines, Windows line ends.
    text = "\ufeffข่าว ข่าว วันนี้\r\n   \r\n  ข่าว ไทย  \n\n\ufeffวันนี้ ข่าว\n"
    (tmp_path / "in" / "a.txt").write_text(text, encoding="utf-8")
    train(TrainTokenizerArguments(type="newmm", input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
                                  min_frequency=2, num_workers=1))
    vocab = json.loads((tmp_path / "out" / "newmm.json").read_text(encoding="utf-8"))
    # ข่าว 4 times, วันนี้ 2, ไทย once (cut); reserved tokens first; the most frequent word next.
    assert list(vocab) == [*SPECIAL_TOKENS, "<_>", "\n", "ข่าว", "วันนี้"]
    assert list(vocab.values()) == list(range(len(vocab)))

    train(TrainTokenizerArguments(type="newmm", input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "small"),
                                  vocab_size=8, num_workers=1))
    small = json.loads((tmp_path / "small" / "newmm.json").read_text(encoding="utf-8"))
    assert list(small) == [*SPECIAL_TOKENS, "<_>", "\n", "ข่าว"]  # --vocab_size counts the reserved tokens


def test_word_counts_are_the_same_in_worker_processes(corpus, tmp_path):
    dirs = [train(TrainTokenizerArguments(type="syllable", input_dir=str(corpus / "plain"), num_workers=workers,
                                          output_dir=str(tmp_path / str(workers)))) for workers in (1, 2)]
    assert len({(tmp_path / d / "syllable.json").read_text(encoding="utf-8") for d in dirs}) == 1


@pytest.mark.parametrize("args, message", [
    (["--type", "wordpiece"], "unknown --type 'wordpiece': use one of spm, newmm, syllable, sefr_cut, bpe"),
    (["--type", "spm", "--vocab_size", "5"], "--vocab_size 5 leaves no room"),
    (["--type", "newmm", "--vocab_size", "7"], "--vocab_size 7 leaves no room"),
    (["--type", "spm", "--ext", "md"], "holds no *.md file"),
    (["--type", "spm", "--model_type", "char"], "unknown --model_type 'char'"),
])
def test_bad_input_is_one_line_and_exit_2(corpus, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--input_dir", str(corpus / "plain"), "--output_dir", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ds-mlm: error: ") and message in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_vocabulary_sentencepiece_cannot_fill_with_its_characters_is_a_user_error(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--type", "spm", "--input_dir", str(corpus / "plain"), "--output_dir", str(tmp_path),
                  "--vocab_size", "50", "--num_workers", "1"])
    assert exit_info.value.code == 2
    assert "SentencePiece could not train" in capsys.readouterr().err.splitlines()[-1]
