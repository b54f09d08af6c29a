"""Building token datasets end to end: same ids as the tokenizer, a cache that knows its inputs, dirty files,
worker-count independence, the ancestor's dataset classes, and kill -9 at random moments of a build."""

import logging
import os
import random
import shutil
import time

import numpy as np
import pytest
from transformers import AutoTokenizer

from ds_mlm.data import (ConcatDataset, DatasetSpec, MemmapConcatFullSentenceTextDataset, MemmapLineByLineTextDataset,
                         PaddedDataset, ensure_store, list_text_files, open_store,
                         pack_full_sentences, pack_lines)
from ds_mlm.data import packing as packing_module
from ds_mlm.data.manifest import MANIFEST, SHARDS, read_manifest
from ds_mlm.data.spec import separator_id
from ds_mlm.data.store import DATA, INDEX
from ds_mlm.errors import UserError

CONCAT, LINES = "MemmapConcatFullSentenceTextDataset", "MemmapLineByLineTextDataset"


class ByteTokenizer:
    """A tokenizer with ds-mlm's `batch_encode_ids`: id = UTF-8 byte + 5, so a store decodes back to its text."""

    bos_token_id, eos_token_id = 0, 2

    def __init__(self, size=261):
        self.size = size  # > 65536 makes the store uint32

    def __len__(self):
        return self.size

    def get_vocab(self):
        return {**{t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])},
                **{f"<0x{b:02X}>": b + 5 for b in range(256)}}

    def batch_encode_ids(self, lines):
        return [[b + 5 for b in line.encode()] for line in lines]


def decode_bytes(ids):
    return bytes(int(i) - 5 for i in ids if i >= 5)


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))


def store_bytes(path):
    """Every byte of a dataset's token data: each shard's files (by name) and the index."""
    manifest = read_manifest(str(path))
    shards = [sh["name"] for src in manifest["sources"] for sh in src["shards"]]
    return ([(name, open(os.path.join(path, SHARDS, name, DATA), "rb").read(),
              open(os.path.join(path, SHARDS, name, INDEX), "rb").read()) for name in shards],
            open(os.path.join(path, manifest["index"]), "rb").read())


def leftovers(root):
    return [os.path.join(d, n) for d, dirs, _ in os.walk(root) for n in dirs if ".tmp-" in n or ".old-" in n]


def samples(path):
    store = open_store(str(path))
    return [store[i].tolist() for i in range(len(store))]


def clean_lines(files):
    return [line.strip() for f in files for line in open(f, encoding="utf-8") if line.strip()]


def flat(ids):
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    return np.array([t for x in ids for t in x], dtype=np.uint16), offsets


@pytest.mark.parametrize("datasets_type", [CONCAT, LINES])
def test_the_store_holds_the_tokenizers_ids_packed(tmp_path, tokenizer, small_corpus, datasets_type):
    files = list_text_files(str(small_corpus[0]), "txt")
    assert len(files) == 2
    report = ensure_store(DatasetSpec(files, tokenizer, 64, datasets_type), str(tmp_path / "s"), chunk_size=50)
    expected, lines, blocks_total = [], 0, 0
    for path in files:  # one shard per file: blocks never straddle two files
        ids = tokenizer(clean_lines([path]), add_special_tokens=False)["input_ids"]  # the slow path, as a reference
        lines += len(ids)
        if datasets_type == CONCAT:
            assert "▁" not in tokenizer.get_vocab() and "\n" not in tokenizer.get_vocab()  # so </s> separates
            blocks, offsets, stats = pack_full_sentences(*flat(ids), 64, 0, 2, tokenizer.eos_token_id)
        else:
            blocks, offsets, stats = pack_lines(*flat(ids), 64, 0, 2)
        expected += [blocks[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        blocks_total += stats.blocks
    assert samples(tmp_path / "s") == expected
    assert report.pack.blocks == blocks_total and report.read.files == 2 and report.read.lines == lines
    assert len(report.built) == 2 and report.reused == 0
    assert f"{blocks_total:,} of at most 64 ids" in report.format()


@pytest.mark.parametrize("packing, window", [("best_fit", None), ("best_fit", 16), ("sequential", None)])
def test_workers_and_chunk_size_do_not_change_a_byte(tmp_path, tokenizer, sample_dirs, monkeypatch, packing, window):
    if window:  # a window smaller than a chunk and than a file: it slides across chunk boundaries
        monkeypatch.setattr(packing_module, "BEST_FIT_WINDOW", window)
    spec = DatasetSpec(list_text_files(str(sample_dirs[1]), "txt"), tokenizer, 128, packing=packing)
    one = ensure_store(spec, str(tmp_path / "one"), num_workers=1, chunk_size=2500)
    two = ensure_store(spec, str(tmp_path / "two"), num_workers=2, chunk_size=7)
    assert store_bytes(tmp_path / "one") == store_bytes(tmp_path / "two")
    assert one.pack == two.pack and one.pack.tokens > 0


def test_best_fit_fills_the_stored_blocks_and_the_report_says_so_per_shard(tmp_path, tokenizer, sample_dirs):
    files = list_text_files(str(sample_dirs[0]), "txt")
    reports = {packing: ensure_store(DatasetSpec(files, tokenizer, 128, packing=packing), str(tmp_path / packing))
               for packing in ("sequential", "best_fit")}
    best, seq = reports["best_fit"], reports["sequential"]
    assert best.pack.tokens == seq.pack.tokens and best.pack.dropped_tokens == 0  # every token kept
    assert best.pack.blocks < seq.pack.blocks and best.mean_fill > seq.mean_fill
    store = open_store(str(tmp_path / "best_fit"))
    assert best.mean_fill == pytest.approx(store.num_tokens / (len(store) * 128))  # the report's fill is the store's
    text = best.format()
    assert f"mean fill {best.mean_fill:.1%}" in text and "best_fit packing" in text
    for name, stats in best.shard_stats.items():  # one line per shard, its own fill
        assert f"{name}: {stats.blocks:,} samples, fill {stats.block_tokens / (stats.blocks * 128):.1%}" in text
    assert len(best.shard_stats) == len(best.built) == len(files)


def test_the_packing_is_in_the_fingerprint(tokenizer, small_corpus):
    files = list_text_files(str(small_corpus[0]), "txt")
    spec = lambda **kw: DatasetSpec(files, tokenizer, 64, **kw)
    best, seq = spec(packing="best_fit"), spec(packing="sequential")
    assert best.fingerprint() != seq.fingerprint() and spec().fingerprint() == best.fingerprint()  # the default
    assert {s.name for s in best.plan().shards}.isdisjoint(s.name for s in seq.plan().shards)
    assert spec(datasets_type=LINES, packing="best_fit").fingerprint() == \
        spec(datasets_type=LINES, packing="sequential").fingerprint()  # packing changes nothing line by line
    with pytest.raises(UserError, match="unknown packing"):
        spec(packing="first_fit")


def test_the_cache_is_reused_only_while_its_inputs_are_unchanged(tmp_path, tokenizer, bpe_tokenizer_dir,
                                                               small_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus[1], corpus)
    path = str(tmp_path / "cache" / "train")
    files = list_text_files(str(corpus), ".txt")

    def ensure(tok=tokenizer, block_size=64):
        spec = DatasetSpec(files, tok, block_size)
        report = ensure_store(spec, path)
        return report, os.stat(os.path.join(path, MANIFEST)), open_store(path, expect_fingerprint=spec.fingerprint())

    built, st, _ = ensure()
    assert built is not None and len(built.built) == 2
    again, st2, _ = ensure()
    assert again is None and (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    text = open(files[0], encoding="utf-8").read()
    i = text.index("a")
    open(files[0], "w", encoding="utf-8").write(text[:i] + "b" + text[i + 1:])  # same size, one byte changed
    report, st3, _ = ensure()
    assert report is not None and st3.st_ino != st2.st_ino
    assert [n.split(".")[0] for n in report.built] == [os.path.basename(files[0]).split(".")[0]]  # that file only
    assert report.reused == 1

    report, st4, store = ensure(block_size=32)
    assert report is not None and len(report.built) == 2 and max(store.sizes()) <= 32

    other = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    other.add_tokens(["ประเทศไทย"])
    report, st5, _ = ensure(tok=other, block_size=32)
    assert report is not None and len(report.built) == 2
    assert ensure(tok=other, block_size=32)[0] is None
    assert len(ensure_store(DatasetSpec(files, other, 32), path, overwrite=True).built) == 2
    assert len(os.listdir(os.path.join(path, SHARDS))) == 2  # the shards of older settings are gone


def test_dirty_files_are_repaired_counted_and_named(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo \xff\r\n\r\n\xef\xbb\xbfthree\rfour")
    (tmp_path / "b.txt").write_bytes(b"\n  \n\t\n")
    files = list_text_files(str(tmp_path), "txt")
    with caplog.at_level(logging.WARNING):
        report = ensure_store(DatasetSpec(files, ByteTokenizer(), 16, LINES), str(tmp_path / "s"))
    r = report.read
    assert (r.files, r.lines, r.blank_lines, r.boms, r.replaced) == (2, 4, 4, 2, 1)
    assert [decode_bytes(s).decode() for s in samples(tmp_path / "s")] == ["one", "two \ufffd", "three", "four"]
    assert "a.txt: 1 invalid UTF-8 sequence" in caplog.text and "b.txt: no text" in caplog.text


def test_no_sample_at_all_is_a_user_error_and_writes_no_manifest(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blank.txt").write_text("\n \n")
    with pytest.raises(UserError, match=f"no sample from the input {tmp_path / 'in'} .*add text"):
        ensure_store(DatasetSpec([str(tmp_path / "in" / "blank.txt")], ByteTokenizer(), 16), str(tmp_path / "s"))
    assert not (tmp_path / "s" / MANIFEST).exists() and not leftovers(tmp_path)


def test_a_damaged_or_partial_shard_is_rebuilt(tmp_path, caplog):
    (tmp_path / "f.txt").write_text("some text\nmore text\n" * 300)
    spec, path = DatasetSpec([str(tmp_path / "f.txt")], ByteTokenizer(), 16), tmp_path / "s"
    ensure_store(spec, str(path))
    good = store_bytes(path)
    [(name, data, index)] = good[0]
    shard = path / SHARDS / name
    for damage in (lambda: (shard / INDEX).write_bytes(index[:40] + b"?" + index[41:]),  # the header
                   lambda: (shard / DATA).write_bytes(data[:-2]),  # a partial data.bin
                   lambda: (shard / DATA).write_bytes(data[:4000] + bytes(b ^ 1 for b in data[4000:8096]) +
                                                      data[8096:])):  # 4 KiB flipped: only the checksum sees it
        damage()
        with caplog.at_level(logging.INFO):
            report = ensure_store(spec, str(path))
        assert report is not None and report.built == [name] and store_bytes(path) == good


@pytest.mark.parametrize("policy, lost", [("split", False), ("skip", True), ("truncate", True)])
def test_a_long_line_is_kept_whole_only_when_split(tmp_path, policy, lost):
    line = " ".join(f"w{i}" for i in range(40_000))  # 228 kB: thousands of blocks of 64 ids
    (tmp_path / "f.txt").write_text(f"first\n{line}\nlast\n")
    report = ensure_store(DatasetSpec([str(tmp_path / "f.txt")], ByteTokenizer(70_000), 64, CONCAT, policy),
                          str(tmp_path / "s"))
    store = open_store(str(tmp_path / "s"))
    assert store.dtype.itemsize == 4  # a vocabulary beyond 65536 ids: uint32
    text = b"".join(decode_bytes(store[i][1:-1]) for i in range(len(store)))
    assert (line.encode() in text.replace(b"\xfd", b"")) != lost  # separator </s> = 2 decodes to nothing
    assert (report.pack.split, report.pack.skipped, report.pack.truncated) == tuple(
        int(policy == p) for p in ("split", "skip", "truncate"))


def test_the_separator_is_the_break_piece_else_newline_else_eos(tokenizer):
    class Vocab(ByteTokenizer):
        def __init__(self, extra):
            super().__init__()
            self.extra = extra

        def get_vocab(self):
            return {**super().get_vocab(), **self.extra}

    assert separator_id(Vocab({"▁": 300, "\n": 301})) == 300
    assert separator_id(Vocab({"\n": 301})) == 301
    assert separator_id(Vocab({})) == 2
    assert separator_id(tokenizer) == tokenizer.eos_token_id


def test_list_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "c.md").write_text("c")
    assert list_text_files(str(tmp_path), ".txt") == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert list_text_files(str(tmp_path), "md") == [str(tmp_path / "c.md")]
    for directory, words in ((tmp_path / "missing", "no such directory"), (tmp_path / "a.txt", "not a directory"),
                             (tmp_path, "no \\*.rst file")):
        with pytest.raises(UserError, match=words):
            list_text_files(str(directory), "rst")


def test_the_ancestors_dataset_classes(tmp_path, tokenizer, small_corpus):
    files = list_text_files(str(small_corpus[1]), "txt")
    concat = MemmapConcatFullSentenceTextDataset(tokenizer, files[0], 64, str(tmp_path / "c"))
    assert concat.report is not None and len(concat) > 0
    assert MemmapConcatFullSentenceTextDataset(tokenizer, files[0], 64, str(tmp_path / "c")).report is None
    lines = MemmapLineByLineTextDataset(tokenizer, files, 32, str(tmp_path / "l"), 100, False)
    ids = tokenizer(clean_lines(files), add_special_tokens=False)["input_ids"]
    assert len(lines) == sum(-(-len(x) // 30) for x in ids)  # a long line is split into samples of 30 + 2 ids
    padded = PaddedDataset(lines, tokenizer.pad_token_id, 32)
    assert all(len(padded[i]) == 32 for i in range(5))
    assert padded[0][len(lines[0]):].eq(tokenizer.pad_token_id).all()
    both = ConcatDataset([concat, lines])
    picks = [len(concat) + 3, 0, len(both) - 1, 5, len(concat)]
    assert [s.tolist() for s in both.__getitems__(picks)] == [both[i].tolist() for i in picks]


def build_alternately(specs, path):
    """The kill -9 victim: rebuild `path` from one spec, then the other, forever (each replaces the last)."""
    os.setpgid(0, 0)  # its own process group, so the kill takes its tokenizer workers too
    while True:
        for spec in specs:
            ensure_store(spec, path, num_workers=2)


def _die_in_the_worker(*args):
    os._exit(9)  # as the OOM killer would end it


def test_a_worker_that_dies_ends_the_build_with_one_line(tmp_path, tokenizer, small_corpus, monkeypatch):
    import ds_mlm.data.build as build

    monkeypatch.setattr(build, "_tokenize", _die_in_the_worker)  # forked workers inherit the patch
    spec = DatasetSpec(list_text_files(str(small_corpus[0]), "txt"), tokenizer, 64)
    with pytest.raises(UserError, match="a tokenizer process died or hangs while building .*: lower "
                                        "--preprocessing_num_workers or --tokenize_chunksize"):
        ensure_store(spec, str(tmp_path / "train"), num_workers=2)
    assert os.listdir(tmp_path / "train" / SHARDS) == []  # nothing kept, not even the temporary directory
