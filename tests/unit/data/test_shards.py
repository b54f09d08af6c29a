"""Sharded datasets: one shard per input file, rebuilds that tokenize exactly what changed, resumption after kill -9,
the same bytes from every input format, pieces of large files, reading across shards, and damaged shards."""

import gc
import gzip
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import ds_mlm.data.ensure as ensure
from ds_mlm.data import DatasetSpec, ShardedStore, ensure_store, list_input_files, open_store
from ds_mlm.data.manifest import MANIFEST, SHARDS, read_manifest
from ds_mlm.data.store import DATA, HEADER_BYTES, INDEX, StoreWriter, TokenStore
from ds_mlm.data.verify import main as verify_main

from conftest import REPO, SAMPLE
from unit.data.test_build import ByteTokenizer, leftovers, store_bytes


def write_corpus(root, n_files=5, lines=120):
    root.mkdir(parents=True, exist_ok=True)
    thai = (SAMPLE / "train" / "thaigov.txt").read_text(encoding="utf-8").splitlines()
    for k in range(n_files):
        chosen = thai[k * lines:(k + 1) * lines]
        (root / f"part-{k:02d}.txt").write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return root


def tokenized(monkeypatch):
    """The shard names each build tokenizes, recorded from build_shards."""
    calls = []
    real = ensure.build_shards

    def spy(plan, dataset, shards, *args, **kwargs):
        calls.append(sorted(s.name for s in shards))
        return real(plan, dataset, shards, *args, **kwargs)

    monkeypatch.setattr(ensure, "build_shards", spy)
    return calls


def test_adding_changing_and_deleting_one_file_rebuilds_exactly_one_shard(tmp_path, monkeypatch):
    corpus, path = write_corpus(tmp_path / "corpus"), str(tmp_path / "cache" / "train")
    calls = tokenized(monkeypatch)

    def ensure():
        spec = DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64)
        report = ensure_store(spec, path)
        return report, {s.name.split(".")[0]: s.name for s in spec.plan().shards}

    first, names = ensure()
    assert len(first.built) == 5 and calls[-1] == sorted(names.values())
    assert ensure()[0] is None and len(calls) == 1  # nothing changed: not even build_shards is called
    (corpus / "part-09.txt").write_text("a new month of crawl\nand its second line\n")
    report, names = ensure()
    assert calls[-1] == [names["part-09"]] and report.reused == 5
    with open(corpus / "part-02.txt", "a", encoding="utf-8") as f:
        f.write("one more line\n")
    report, names = ensure()
    assert calls[-1] == [names["part-02"]] and report.reused == 5
    os.remove(corpus / "part-03.txt")
    report, names = ensure()
    assert calls[-1] == [] and report.built == [] and report.reused == 5  # nothing to tokenize: a new manifest
    assert sorted(os.listdir(os.path.join(path, SHARDS))) == sorted(names.values())  # the deleted file's shard went
    store = open_store(path)
    reference = str(tmp_path / "fresh")
    ensure_store(DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64), reference)
    assert store_bytes(path) == store_bytes(reference)  # the same bytes as a build from scratch
    assert [s.tolist() for s in store.__getitems__(range(len(store)))] == \
        [s.tolist() for s in open_store(reference).__getitems__(range(len(store)))]


def _build_forever(corpus, path, ready):
    os.setpgid(0, 0)
    spec = DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64)
    ready.set()
    ensure_store(spec, path, num_workers=2, chunk_size=20)


def test_a_build_killed_after_some_shards_resumes_without_tokenizing_them(tmp_path, monkeypatch):
    corpus, path = write_corpus(tmp_path / "corpus", n_files=8, lines=200), str(tmp_path / "cache" / "train")
    reference = str(tmp_path / "reference")
    ensure_store(DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64), reference)
    ready = multiprocessing.get_context("fork").Event()
    victim = multiprocessing.get_context("fork").Process(target=_build_forever, args=(corpus, path, ready))
    victim.start()
    ready.wait(30)
    shards_dir = os.path.join(path, SHARDS)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill -9 once 3 shards are published, in the middle of the build
        done = [n for n in os.listdir(shards_dir) if ".tmp-" not in n] if os.path.isdir(shards_dir) else []
        if len(done) >= 3:
            break
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.join()
    finished = sorted(n for n in os.listdir(shards_dir) if ".tmp-" not in n)
    assert 3 <= len(finished) < 8 and not os.path.exists(os.path.join(path, MANIFEST))
    calls = tokenized(monkeypatch)
    report = ensure_store(DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64), path)
    assert report.reused == len(finished) and not set(calls[0]) & set(finished) and len(calls[0]) == 8 - len(finished)
    assert store_bytes(path) == store_bytes(reference) and not leftovers(tmp_path)


def test_the_same_text_in_every_format_gives_byte_identical_token_data(tmp_path):
    lines = (SAMPLE / "eval" / "botchan.txt").read_text(encoding="utf-8").splitlines()[:400]
    records = ["\n".join(lines[i:i + 3]) for i in range(0, len(lines), 3)]  # records of several lines
    text = "\n".join(records) + "\n"
    jsonl = "".join(json.dumps({"text": r, "meta": {"i": i}}) + "\n" for i, r in enumerate(records))
    writers = {"txt": lambda p: p.write_text(text, encoding="utf-8"),
               "jsonl": lambda p: p.write_text(jsonl, encoding="utf-8"),
               "jsonl.gz": lambda p: p.write_bytes(gzip.compress(jsonl.encode())),
               "jsonl.zst": lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode())),
               "txt.zst": lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(text.encode())),
               "parquet": lambda p: pq.write_table(pa.table({"text": records}), p, row_group_size=37)}
    got = {}
    for ext, write in writers.items():
        folder = tmp_path / ext
        folder.mkdir()
        write(folder / f"corpus.{ext}")
        path = tmp_path / f"cache-{ext}"
        ensure_store(DatasetSpec(list_input_files(str(folder), ext), ByteTokenizer(), 64), str(path), chunk_size=50)
        [shard] = os.listdir(path / SHARDS)
        index = (path / SHARDS / shard / INDEX).read_bytes()
        got[ext] = ((path / SHARDS / shard / DATA).read_bytes(), index[HEADER_BYTES:], index[96:104])
    assert all(value == got["txt"] for value in got.values())  # data, offsets and their checksums
    assert len(got["txt"][0]) > 10_000


def test_pieces_of_a_large_file_are_shards_of_whole_lines(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", n_files=1, lines=2000)
    files = list_input_files(str(corpus), "txt")
    size = os.path.getsize(files[0])
    spec = DatasetSpec(files, ByteTokenizer(), 64, piece_bytes=size // 4)
    plan = spec.plan()
    ranges = [s.byte_range for s in plan.shards]
    assert len(ranges) == 4 and ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    data = open(files[0], "rb").read()
    assert all(data[r[1] - 1:r[1]] == b"\n" for r in ranges)
    report = ensure_store(spec, str(tmp_path / "pieces"))
    assert len(report.built) == 4 and report.read.files == 1
    whole = ensure_store(DatasetSpec(files, ByteTokenizer(), 64, datasets_type="MemmapLineByLineTextDataset"),
                         str(tmp_path / "lines"))
    pieces = ensure_store(DatasetSpec(files, ByteTokenizer(), 64, datasets_type="MemmapLineByLineTextDataset",
                                      piece_bytes=size // 4), str(tmp_path / "lines-pieces"))
    assert pieces.read.lines == whole.read.lines  # no line lost or doubled at a cut
    a, b = open_store(str(tmp_path / "lines")), open_store(str(tmp_path / "lines-pieces"))
    assert [s.tolist() for s in a.__getitems__(range(len(a)))] == [s.tolist() for s in b.__getitems__(range(len(b)))]


def test_reads_across_many_shards_equal_the_shards_read_one_by_one(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=1)
    rng = np.random.default_rng(3)
    for k in range(40):  # shards of 0 to 30 samples, empty ones included
        n = int(rng.integers(0, 31))
        (corpus / f"s{k:03d}.txt").write_text("".join(f"line {k} {i} {'x' * int(rng.integers(1, 90))}\n"
                                                      for i in range(n)))
    path = str(tmp_path / "d")
    ensure_store(DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 32), path)
    store = ShardedStore(path)
    expected = []
    for src in read_manifest(path)["sources"]:
        for shard in src["shards"]:
            one = TokenStore(os.path.join(path, SHARDS, shard["name"]))
            expected += [one[i].tolist() for i in range(len(one))]
    assert len(store) == len(expected) and store.num_tokens == sum(map(len, expected))
    picks = rng.integers(-len(store), len(store), size=500).tolist()
    got = store.__getitems__(picks)
    assert all(g.dtype == np.uint16 for g in got)
    assert [g.tolist() for g in got] == [expected[i] for i in picks]
    assert store[5].tolist() == expected[5] and store.sizes().tolist() == [len(e) for e in expected]
    clone = pickle.loads(pickle.dumps(store))
    assert [clone[i].tolist() for i in range(0, len(clone), 7)] == expected[::7]
    with pytest.raises(IndexError):
        store.__getitems__([len(store)])
    kept = store.__getitems__([0, len(store) - 1])  # views outlive their dataset: the region stays mapped
    del store, clone
    gc.collect()
    assert [k.tolist() for k in kept] == [expected[0], expected[-1]]
    with pytest.raises(ValueError, match="read-only"):
        kept[0][0] = 7


def test_a_damaged_shard_is_one_line_and_rebuilt(tmp_path, caplog, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_files=3, lines=400)
    spec, path = DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64), tmp_path / "cache" / "train"
    ensure_store(spec, str(path))
    good = store_bytes(path)
    name = good[0][1][0]
    data = bytearray((path / SHARDS / name / DATA).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0x01 for b in data[middle:middle + 4096])  # ids stay in the vocabulary
    (path / SHARDS / name / DATA).write_bytes(bytes(data))

    verify = subprocess.run([sys.executable, "-m", "ds_mlm.data.verify", str(tmp_path / "cache")], cwd=REPO,
                            capture_output=True, text=True)  # the command as a user runs it
    assert verify.returncode == 1 and verify.stderr == ""
    [damaged] = [line for line in verify.stdout.splitlines() if "damaged:" in line]
    assert damaged.startswith(f"ds-mlm: damaged: {path / SHARDS / name / DATA}: the token data are damaged (crc32 ")
    assert damaged.endswith("the next run rebuilds this shard")

    with caplog.at_level(logging.WARNING):
        report = ensure_store(spec, str(path))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"{path / SHARDS / name / DATA}: the token data are damaged") and \
        warning.endswith(": rebuilding this shard")
    assert report.built == [name] and report.reused == 2 and store_bytes(path) == good
    assert verify_main([str(path)]) == 0
    [summary] = capsys.readouterr().out.splitlines()
    assert summary.startswith(f"{path}: 3 shard(s), ") and summary.endswith(" s: no damaged")


def test_shards_are_checked_once_per_host_unless_always(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", n_files=2)
    spec, path = DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64), str(tmp_path / "d")
    ensure_store(spec, path)
    checked = []
    import ds_mlm.data.verify as verify

    real_verify = verify.TokenStore.verify
    monkeypatch.setattr(verify.TokenStore, "verify", lambda self: checked.append(self.path) or real_verify(self))
    assert ensure_store(spec, path) is None and checked == []  # checked at the first open after the build
    assert ensure_store(spec, path, verify="always") is None and len(checked) == 2
    assert ensure_store(spec, path, verify="never") is None and len(checked) == 2
    [name] = [n for n in os.listdir(os.path.join(path, SHARDS))][:1]
    os.utime(os.path.join(path, SHARDS, name, DATA))  # touched (ctime changes): checked again
    assert ensure_store(spec, path) is None and len(checked) == 3


def test_a_format_1_store_is_rebuilt_with_one_line(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus", n_files=1)
    path = tmp_path / "train"
    with StoreWriter(str(path), np.uint16, "ab" * 32) as writer:  # then made to look like format 1
        writer.append(np.arange(10), np.array([0, 10]))
        writer.commit()
    raw = bytearray((path / INDEX).read_bytes())
    raw[8:12] = (1).to_bytes(4, "little")
    (path / INDEX).write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO):
        report = ensure_store(DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64), str(path))
    assert report is not None and "an older ds-mlm (format 1, one store for all files)" in caplog.text
    assert sorted(os.listdir(path)) == sorted([MANIFEST, SHARDS, ".verified", read_manifest(str(path))["index"]])
    (path / "notes.txt").write_text("mine")
    shutil.rmtree(path / SHARDS)
    with pytest.raises(Exception, match="holds notes.txt, not a ds-mlm token dataset"):
        ensure_store(DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64), str(path))
