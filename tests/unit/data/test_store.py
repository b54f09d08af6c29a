"""The token store on disk: exact round trips, zero-copy reads, and every kind of unusable store detected."""

import os
import pickle
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from ds_mlm.data.store import (DATA, HEADER_BYTES, INDEX, DamagedStore, StaleCacheError, StoreWriter, TokenStore,
                               file_crc32, remove_dead_leftovers, store_dtype)
from ds_mlm.errors import UserError

FINGERPRINT = "ab" * 32


def random_blocks(rng, n, high):
    lengths = rng.integers(1, 40, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return rng.integers(0, high, size=int(offsets[-1])), offsets


def write_store(path, dtype, chunks, fingerprint=FINGERPRINT):
    with StoreWriter(str(path), dtype, fingerprint) as writer:
        for tokens, offsets in chunks:
            writer.append(tokens, offsets)
        writer.commit()


@pytest.mark.parametrize("vocab_size", [2000, 65536, 250_002])
def test_round_trip_is_exact(tmp_path, vocab_size):
    dtype = store_dtype(vocab_size)
    assert dtype.itemsize == (2 if vocab_size <= 65536 else 4)
    rng = np.random.default_rng(vocab_size)
    chunks = [random_blocks(rng, n, vocab_size) for n in (5, 0, 17, 1)]
    expected = [t[a:b] for t, o in chunks for a, b in zip(o[:-1], o[1:])]
    write_store(tmp_path / "s", dtype, chunks)
    store = TokenStore(str(tmp_path / "s"), expect_fingerprint=FINGERPRINT)
    assert len(store) == len(expected) and store.dtype == dtype and store.fingerprint == FINGERPRINT
    assert store.num_tokens == sum(map(len, expected))
    for i, sample in enumerate(expected):
        got = store[i]
        assert got.dtype == torch.int64 and got.tolist() == sample.tolist()
    indices = rng.integers(-len(expected), len(expected), size=50).tolist()
    for i, got in zip(indices, store.__getitems__(indices)):
        assert got.dtype == dtype and got.tolist() == expected[i].tolist()
    assert store.sizes().tolist() == [len(s) for s in expected]
    assert os.path.getsize(tmp_path / "s" / DATA) == store.num_tokens * dtype.itemsize  # no header in data.bin
    with pytest.raises(IndexError):
        store[len(expected)]
    with pytest.raises(IndexError):
        store.__getitems__([0, len(expected)])
    clone = pickle.loads(pickle.dumps(store))  # what a DataLoader worker receives
    assert [clone[i].tolist() for i in range(len(clone))] == [s.tolist() for s in expected]


def test_an_empty_store_opens(tmp_path):
    write_store(tmp_path / "s", np.uint16, [])
    store = TokenStore(str(tmp_path / "s"))
    assert len(store) == 0 and store.__getitems__([]) == []


def test_the_dataloader_reads_batches_through_getitems(tmp_path):
    rng = np.random.default_rng(0)
    tokens, offsets = random_blocks(rng, 30, 1000)
    write_store(tmp_path / "s", np.uint16, [(tokens, offsets)])
    store = TokenStore(str(tmp_path / "s"))
    sampler = torch.utils.data.BatchSampler(range(30), batch_size=7, drop_last=False)
    loader = torch.utils.data.DataLoader(store, batch_sampler=sampler, collate_fn=lambda samples: samples)
    got = [s.tolist() for batch in loader for s in batch]
    assert got == [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def rewrite_header(path, **changes):
    index = path / INDEX
    raw = bytearray(index.read_bytes())
    fields = dict(zip(("magic", "version", "itemsize", "n_samples", "n_tokens", "fingerprint", "data_crc",
                       "offsets_crc"), struct.unpack_from("<8sIIQQ64sII", raw)))
    fields.update(changes)
    raw[:104] = struct.pack("<8sIIQQ64sII", *fields.values())
    raw[104:108] = struct.pack("<I", zlib.crc32(bytes(raw[:104])))
    index.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / INDEX).unlink(), "no complete token store"),
    (lambda p: (p / DATA).unlink(), "no complete token store"),
    (lambda p: (p / INDEX).write_bytes((p / INDEX).read_bytes()[:50]), "bad magic"),
    (lambda p: (p / INDEX).write_bytes(b"X" + (p / INDEX).read_bytes()[1:]), "bad magic"),
    (lambda p: (p / INDEX).write_bytes((p / INDEX).read_bytes()[:20] + b"\x07" + (p / INDEX).read_bytes()[21:]),
     "damaged"),
    (lambda p: rewrite_header(p, version=1), "format version 1, this ds-mlm reads 2"),
    (lambda p: rewrite_header(p, version=3), "format version 3"),
    (lambda p: rewrite_header(p, itemsize=3), "id width"),
    (lambda p: rewrite_header(p, n_tokens=3), "sizes do not match"),
    (lambda p: (p / DATA).write_bytes((p / DATA).read_bytes()[:-2]), "sizes do not match"),
    (lambda p: (p / INDEX).write_bytes((p / INDEX).read_bytes()[:-8]), "sizes do not match"),
    (lambda p: (p / INDEX).write_bytes((p / INDEX).read_bytes()[:HEADER_BYTES] + np.array(
        [5, 9, 12], dtype="<i8").tobytes()), "offsets do not span"),
])
def test_unusable_stores_are_detected(tmp_path, damage, message):
    tokens, offsets = np.arange(12), np.array([0, 5, 12])
    write_store(tmp_path / "s", np.uint16, [(tokens, offsets)])
    TokenStore(str(tmp_path / "s"))
    damage(tmp_path / "s")
    with pytest.raises(StaleCacheError, match=message):
        TokenStore(str(tmp_path / "s"))


def test_another_fingerprint_is_stale_and_a_missing_store_too(tmp_path):
    write_store(tmp_path / "s", np.uint16, [(np.arange(3), np.array([0, 3]))])
    with pytest.raises(StaleCacheError, match="other inputs"):
        TokenStore(str(tmp_path / "s"), expect_fingerprint="cd" * 32)
    with pytest.raises(StaleCacheError):
        TokenStore(str(tmp_path / "nothing"))


def test_an_aborted_write_leaves_nothing_and_the_old_store_stays(tmp_path):
    write_store(tmp_path / "s", np.uint16, [(np.arange(3), np.array([0, 3]))])
    with pytest.raises(RuntimeError):
        with StoreWriter(str(tmp_path / "s"), np.uint16, "cd" * 32) as writer:
            writer.append(np.arange(10), np.array([0, 10]))
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["s"]
    assert TokenStore(str(tmp_path / "s")).fingerprint == FINGERPRINT


def test_a_directory_that_is_not_a_store_is_never_replaced(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a token store"):
        write_store(tmp_path / "s", np.uint16, [(np.arange(3), np.array([0, 3]))])
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_leftovers_of_dead_builds_are_removed_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name in (f"s.tmp-{host}-{dead.stdout.strip()}", f"s.old-{host}-{dead.stdout.strip()}",
                 f"s.tmp-{host}-{os.getpid()}", f"s.tmp-otherhost-{dead.stdout.strip()}", "t.tmp-x"):
        (tmp_path / name).mkdir()
    remove_dead_leftovers(str(tmp_path / "s"))
    assert sorted(os.listdir(tmp_path)) == sorted([f"s.tmp-{host}-{os.getpid()}",
                                                   f"s.tmp-otherhost-{dead.stdout.strip()}", "t.tmp-x"])


def test_the_header_records_the_checksums_of_the_data_and_verify_catches_flipped_bytes(tmp_path):
    rng = np.random.default_rng(7)
    chunks = [random_blocks(rng, 400, 2000) for _ in range(3)]
    write_store(tmp_path / "s", np.uint16, chunks)
    store = TokenStore(str(tmp_path / "s"))
    assert store.data_crc32 == zlib.crc32((tmp_path / "s" / DATA).read_bytes())
    assert store.offsets_crc32 == zlib.crc32((tmp_path / "s" / INDEX).read_bytes()[HEADER_BYTES:])
    assert file_crc32(str(tmp_path / "s" / DATA)) == store.data_crc32
    store.verify()
    data = bytearray((tmp_path / "s" / DATA).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0x01 for b in data[middle:middle + 4096])  # ids stay in the vocabulary
    (tmp_path / "s" / DATA).write_bytes(bytes(data))
    damaged = TokenStore(str(tmp_path / "s"))  # opening stays cheap: sizes and header only
    with pytest.raises(DamagedStore, match=r"s/data.bin: the token data are damaged \(crc32 [0-9a-f]{8}, written as"):
        damaged.verify()
    write_store(tmp_path / "t", np.uint16, chunks)
    index = bytearray((tmp_path / "t" / INDEX).read_bytes())
    index[HEADER_BYTES + 8 * 600] ^= 0x04  # a middle offset: the spans stay inside data.bin
    (tmp_path / "t" / INDEX).write_bytes(bytes(index))
    with pytest.raises(DamagedStore, match="t/data.idx: the token data are damaged"):
        TokenStore(str(tmp_path / "t")).verify()
