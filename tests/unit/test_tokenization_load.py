"""load_tokenizer: its one-line errors, `auto` on other kinds of directory, an ancestor's SentencePiece model. A saved
directory loading without ds-mlm (trust_remote_code) or any network: tests/integration/test_tokenization.py."""

import io
import json
import logging
import shutil

import pytest
import sentencepiece as spm

from ds_mlm.errors import UserError
from ds_mlm.tokenization import SPECIAL_TOKENS, ThaiRobertaTokenizer, ThaiWordsNewmmTokenizer, load_tokenizer

from conftest import SAMPLE

LINES = [line.strip() for line in (SAMPLE / "eval" / "botchan.txt").read_text(encoding="utf-8").splitlines()
         if line.strip()][:200]


def _one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def newmm_dir(tmp_path_factory):
    """A minimal newmm tokenizer directory, as the ancestor shipped one: just newmm.json."""
    path = tmp_path_factory.mktemp("newmm")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, "<_>", "\n", "ข่าว", "วันนี้"])}
    (path / "newmm.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ancestor_spm_dir(tmp_path_factory):
    """A SentencePiece model trained with SentencePiece's own defaults (<unk> 0, <s> 1, </s> 2, no <pad> or <mask>),
    alone in its directory like an ancestor's."""
    path = tmp_path_factory.mktemp("ancestor_spm")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES), model_writer=model, vocab_size=300,
                                   minloglevel=2)
    (path / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    return path


def test_unknown_type_lists_the_valid_ones(newmm_dir):
    message = _one_line_error(lambda: load_tokenizer(newmm_dir, "wordpiece"))
    for name in ("auto", "spm", "ThaiRobertaTokenizer", "newmm", "ThaiWordsNewmmTokenizer", "syllable",
                 "ThaiWordsSyllableTokenizer", "sefr_cut", "FakeSefrCutTokenizer"):
        assert name in message


def test_missing_path_and_file_path(tmp_path):
    assert "does not exist" in _one_line_error(lambda: load_tokenizer(tmp_path / "nope"))
    assert "--tokenizer_name_or_path" in _one_line_error(lambda: load_tokenizer(None))
    (tmp_path / "file.txt").write_text("x")
    assert "is a file" in _one_line_error(lambda: load_tokenizer(tmp_path / "file.txt", "spm"))


def test_wrong_type_names_what_was_found_and_the_type_that_fits(newmm_dir):
    message = _one_line_error(lambda: load_tokenizer(newmm_dir, "spm"))
    assert "sentencepiece.bpe.model" in message and "newmm.json" in message and "--tokenizer_type newmm" in message


def test_a_directory_nothing_can_load_is_a_one_line_error(tmp_path):
    (tmp_path / "notes.md").write_text("not a tokenizer")
    assert "notes.md" in _one_line_error(lambda: load_tokenizer(tmp_path))


def test_auto_loads_a_bare_ancestor_directory_by_its_vocabulary_file(newmm_dir):
    tok = load_tokenizer(newmm_dir)
    assert isinstance(tok, ThaiWordsNewmmTokenizer)
    assert tok("ข่าว วันนี้")["input_ids"] == [0, 7, 8, 2]  # without the flag a space only separates words


def test_auto_loads_an_hf_directory_fast_and_ignores_the_space_token_with_one_warning(bpe_tokenizer_dir, caplog):
    tok = load_tokenizer(bpe_tokenizer_dir)
    assert tok.is_fast and tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert tok.decode(tok("The school was there.")["input_ids"], skip_special_tokens=True) == "The school was there."
    with caplog.at_level(logging.WARNING, logger="ds_mlm.tokenization"):
        flagged = load_tokenizer(bpe_tokenizer_dir, add_space_token=True)  # the ancestor's command carries the flag
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("--add_space_token has no effect on ") and "ignored" in warnings[0]
    text = "ข่าว วันนี้ The school"
    assert flagged(text)["input_ids"] == tok(text)["input_ids"]  # no effect at all


def test_an_ancestor_sentencepiece_model_is_shifted_to_ids_0_to_4(ancestor_spm_dir, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(ancestor_spm_dir / "sentencepiece.bpe.model"))
    for flag in (False, True):
        tok = load_tokenizer(ancestor_spm_dir, "spm", add_space_token=flag)
        assert isinstance(tok, ThaiRobertaTokenizer) and tok.offset == 5
        assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
        assert sorted(tok.get_vocab().values()) == list(range(len(tok)))
        assert len(tok) == len(sp) + 5 + flag  # the flag appends <_>: the model has no such piece
        text = LINES[5]
        ids = tok(text)["input_ids"]
        if not flag:  # SentencePiece's own ids, shifted
            assert ids == [0] + [i + 5 for i in sp.encode(text)] + [2]
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.batch_encode_ids(LINES[:20] + ["qq€ <mask>"]) == tok(LINES[:20] + ["qq€ <mask>"],
                                                                           add_special_tokens=False)["input_ids"]
        if flag:  # spaces are <_>, so a lone ▁ can only be the ancestor's line separator
            assert tok.convert_tokens_to_string(["▁", "<_>", "▁"]) == "\n \n"
        tok.save_pretrained(tmp_path / str(flag))
        assert load_tokenizer(tmp_path / str(flag))(LINES[:20])["input_ids"] == tok(LINES[:20])["input_ids"]


def test_a_damaged_vocabulary_is_a_one_line_error(newmm_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(newmm_dir, broken)
    (broken / "newmm.json").write_text('{"<s>": 0, "<pad', encoding="utf-8")  # cut off mid-write
    with pytest.raises(UserError, match="cannot load ThaiWordsNewmmTokenizer from .*broken.*: the tokenizer files "
                                        "are missing or damaged"):
        load_tokenizer(str(broken), "newmm")
