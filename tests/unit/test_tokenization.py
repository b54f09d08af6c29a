"""Behaviour of every ds-mlm tokenizer type on Thai and English sample text: ids, layout, spaces, save/load, speed path.

Each type is trained (in-process, by the train-tokenizer command's code) on a slice of data/sample; the texts checked
are lines of that slice, so every character (spm) and every word (word level) is in the vocabulary and a round trip
must give the text back exactly.
"""

import multiprocessing
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, RobertaForMaskedLM, pipeline

from ds_mlm.model import check_compatible, make_config
from ds_mlm.tokenization import SPECIAL_TOKENS, load_tokenizer
from ds_mlm.tokenization.words import SEFR_CUT_SEPARATOR, pre_tokenize
from ds_mlm.train_tokenizer import TrainTokenizerArguments, train

from conftest import SAMPLE

TYPES = ("spm", "newmm", "syllable", "sefr_cut")
SLICE = 120  # lines per sample file: enough words for a real vocabulary, fast to train


def _slice(name: str) -> list[str]:
    lines = [line.strip() for line in (SAMPLE / "train" / name).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line][:SLICE]


@pytest.fixture(scope="module")
def texts():
    """A few sample lines per language, with several spaces in a row to see that each one comes back."""
    thai, english = _slice("thaigov.txt"), _slice("botchan.txt")
    return {"thai": thai[3:8] + [thai[1] + "  " + thai[2]], "english": english[10:15] + [english[0] + "   x"]}


def _segmented(line: str) -> str:
    """A line as an offline segmenter would write it for sefr_cut: words (and spaces) separated by <|>."""
    from pythainlp.tokenize.newmm import segment

    return SEFR_CUT_SEPARATOR.join(segment(line))


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """{type: directory} of a tokenizer trained on the slice (sefr_cut: on the slice segmented with <|>)."""
    root = tmp_path_factory.mktemp("tokenizers")
    corpus = root / "corpus"
    corpus.mkdir()
    lines = _slice("thaigov.txt") + _slice("botchan.txt") + ["x"]
    (corpus / "plain.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "segmented").mkdir()
    (root / "segmented" / "seg.txt").write_text("\n".join(map(_segmented, lines)) + "\n", encoding="utf-8")
    dirs = {}
    for kind in TYPES:
        source = root / ("segmented" if kind == "sefr_cut" else "corpus")
        dirs[kind] = train(TrainTokenizerArguments(type=kind, input_dir=str(source), output_dir=str(root / kind),
                                                   vocab_size=100_000 if kind != "spm" else 1500, num_workers=1))
    return dirs


def _input(kind: str, text: str) -> str:
    return _segmented(text) if kind == "sefr_cut" else text


@pytest.fixture(params=TYPES)
def kind(request):
    return request.param


@pytest.mark.parametrize("language", ["thai", "english"])
def test_round_trip_restores_spaces_with_the_space_token(tokenizer_dirs, texts, kind, language):
    tok = load_tokenizer(tokenizer_dirs[kind], kind, add_space_token=True)
    for text in texts[language]:
        ids = tok(_input(kind, text))["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids) == f"<s>{text}</s>"


@pytest.mark.parametrize("language", ["thai", "english"])
def test_round_trip_without_the_space_token(tokenizer_dirs, texts, kind, language):
    tok = load_tokenizer(tokenizer_dirs[kind], kind)
    for text in texts[language]:
        decoded = tok.decode(tok(_input(kind, text))["input_ids"], skip_special_tokens=True)
        # spm models written by ds-mlm have <_> built in; the word-level types drop spaces (documented).
        assert decoded == (text if kind == "spm" else text.replace(" ", ""))


def test_special_tokens_have_ids_0_to_4_and_the_vocabulary_has_no_hole(tokenizer_dirs, kind):
    for flag in (False, True):
        tok = load_tokenizer(tokenizer_dirs[kind], kind, add_space_token=flag)
        assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
        assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (
            0, 1, 2, 3, 4)
        assert sorted(tok.all_special_ids) == [0, 1, 2, 3, 4]
        vocab = tok.get_vocab()
        assert sorted(vocab.values()) == list(range(len(tok)))
        tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
        assert all(vocab[token] == i for i, token in enumerate(tokens))
        assert tok.convert_tokens_to_ids("<_>") == 5
        config = make_config("roberta-tiny", None, tok)
        check_compatible(config, tok, 64)  # run_mlm's sanity checks pass


def test_pair_layout_and_token_type_ids(tokenizer_dirs, texts, kind):
    tok = load_tokenizer(tokenizer_dirs[kind], kind, add_space_token=True)
    a, b = (_input(kind, t) for t in texts["thai"][:2])
    ids_a, ids_b = tok.batch_encode_ids([a, b])
    pair = tok(a, b, return_token_type_ids=True, return_special_tokens_mask=True)
    assert pair["input_ids"] == [0] + ids_a + [2, 2] + ids_b + [2]
    assert set(pair["token_type_ids"]) == {0}
    assert pair["special_tokens_mask"] == [1] + [0] * len(ids_a) + [1, 1] + [0] * len(ids_b) + [1]
    single = tok(a, return_token_type_ids=True)
    assert single["input_ids"] == [0] + ids_a + [2] and set(single["token_type_ids"]) == {0}


def test_padding_and_truncation_as_fine_tuning_code_uses_them(tokenizer_dirs, texts, kind):
    tok = load_tokenizer(tokenizer_dirs[kind], kind, add_space_token=True)
    short, long = _input(kind, "ข่าว"), _input(kind, " ".join(texts["thai"]))
    batch = tok([short, long], padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][1, -1].item() == tok.eos_token_id  # truncated, still closed by </s>
    n = len(tok(short)["input_ids"])
    assert batch["input_ids"][0, n:].eq(tok.pad_token_id).all() and batch["attention_mask"][0].sum().item() == n
    assert tok.model_max_length == 512  # RoBERTa's 514 positions: truncation=True alone keeps inputs in range


def test_saved_directory_loads_back_with_identical_ids(tokenizer_dirs, texts, kind, tmp_path):
    lines = [_input(kind, t) for t in texts["thai"] + texts["english"]]
    for flag in (False, True):
        tok = load_tokenizer(tokenizer_dirs[kind], kind, add_space_token=flag)
        saved = tmp_path / f"saved-{flag}"
        tok.save_pretrained(saved)
        want = tok(lines)["input_ids"]
        for loaded in (AutoTokenizer.from_pretrained(saved), load_tokenizer(saved), load_tokenizer(saved, kind)):
            assert type(loaded) is type(tok) and loaded.add_space_token == tok.add_space_token
            assert loaded(lines)["input_ids"] == want
            assert len(loaded) == len(tok)


def test_batch_encode_ids_equals_the_tokenizer_call(tokenizer_dirs, texts, kind):
    lines = [_input(kind, t) for t in texts["thai"] + texts["english"]]
    lines += ["", "<mask>", f"{lines[0]}<mask> {lines[1]}</s>", "<s><pad> never seen: ฿€ qqqzz", " <_> "]
    for flag in (False, True):
        tok = load_tokenizer(tokenizer_dirs[kind], kind, add_space_token=flag)
        assert tok.batch_encode_ids(lines) == tok(lines, add_special_tokens=False)["input_ids"]


# Text made of pieces that stress the split on added tokens: specials, <_>, sefr_cut's mark, spaces, other whitespace.
_PIECES = st.sampled_from(["ข่าว", "รัฐบาล", "ไทย", "the", "school", "x", "€", " ", "  ", "\t", "\n", "<mask>", "<s>",
                           "</s>", "<pad>", "<unk>", "<_>", "<|>", "<", ">", "_", "|", "<mask", "s>"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.lists(_PIECES, max_size=12).map("".join), min_size=1, max_size=6))
def test_batch_encode_ids_equals_the_tokenizer_call_on_any_text(tokenizer_dirs, lines):
    for kind in TYPES:
        for flag in (False, True):
            tok = load_tokenizer(tokenizer_dirs[kind], kind, add_space_token=flag)
            assert tok.batch_encode_ids(lines) == tok(lines, add_special_tokens=False)["input_ids"]


_FORKED = None  # the tokenizer a forked worker inherits


def _encode_in_worker(lines):
    return _FORKED.batch_encode_ids(lines)


def test_pickled_and_forked_tokenizers_give_identical_ids(tokenizer_dirs, texts, kind):
    global _FORKED
    tok = load_tokenizer(tokenizer_dirs[kind], kind, add_space_token=True)
    lines = [_input(kind, t) for t in texts["thai"] + texts["english"]]
    want = tok.batch_encode_ids(lines)
    assert pickle.loads(pickle.dumps(tok)).batch_encode_ids(lines) == want
    _FORKED = tok
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_encode_in_worker, (lines,)) == want


def test_sefr_cut_separators_are_not_words(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["sefr_cut"], "sefr_cut", add_space_token=True)
    tokens = tok.tokenize("ข่าว<|>รัฐบาล<|> <|>ไทย")
    assert tokens == ["ข่าว", "รัฐบาล", "<_>", "ไทย"]
    assert pre_tokenize("sefr_cut", "a<|>b c<|>") == ["a", "b", "c"]


def test_unknown_words_map_to_unk(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["newmm"], "newmm")
    ids = tok("qqqzz", add_special_tokens=False)["input_ids"]
    assert ids == [tok.unk_token_id]


@pytest.mark.parametrize("kind", ["spm", "newmm"])
def test_fill_mask_pipeline_runs_on_an_exported_directory(tokenizer_dirs, kind, tmp_path):
    tok = load_tokenizer(tokenizer_dirs[kind], kind, add_space_token=True)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(make_config("roberta-tiny", None, tok)).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)  # the export layout: model and tokenizer in one directory
    fill = pipeline("fill-mask", model=str(tmp_path), device="cpu", top_k=3)
    assert type(fill.tokenizer) is type(tok) and fill.tokenizer.add_space_token
    results = fill("ข่าว <mask> วันนี้")
    assert len(results) == 3
    for r in results:  # spaces around the mask survive decoding, whatever an untrained model guesses
        assert r["sequence"].startswith("ข่าว ") and r["sequence"].endswith(" วันนี้")
