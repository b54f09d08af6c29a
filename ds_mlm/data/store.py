"""One token store (a shard of a dataset): samples of token ids on disk, read through a memory map without copying.

A store is a directory with two files (the layout of Megatron-core's indexed dataset, reduced to what MLM needs):

    data.bin   the ids of every sample back to back, little-endian uint16 (when len(tokenizer) <= 65536) or uint32;
               no header, so sample i is one contiguous slice
    data.idx   a 128-byte header, then int64 offsets (n_samples + 1 of them, the first 0, the last n_tokens):
               sample i = data.bin[offsets[i]:offsets[i + 1]]

    header (little-endian)        offset  size
      magic  b"DSMLMTOK"               0     8
      format version (uint32)          8     4    FORMAT_VERSION; another version is rebuilt, never guessed at
      bytes per id (uint32)           12     4    2 (uint16) or 4 (uint32)
      n_samples (uint64)              16     8
      n_tokens (uint64)               24     8
      fingerprint (ASCII)             32    64    sha256 hex of what the store was built from (dataset_plan.py)
      crc32 of data.bin (uint32)      96     4    the token data's checksum (verify.py checks it)
      crc32 of the offsets (uint32)  100     4    of the int64 offsets that follow the header
      crc32 of bytes 0..103 (uint32) 104     4    a damaged header is detected at every open
      zeros                          108    20    so the offsets start 8-byte aligned

Version 2 added the two data checksums (version 1 stores, one per dataset, are rebuilt as shards). A store is
written into a temporary directory beside its final path (`<path>.tmp-<host>-<pid>`), fsynced, then renamed into
place (ds_mlm.atomic), so a build that dies at any moment never leaves something that looks complete: opening
checks the header and both file sizes, and raises `StaleCacheError` for anything missing, partial, damaged, of
another format version or of another fingerprint. Opening maps the files; a 10 GB store costs no RAM up front.
Checking the data checksums reads the whole store, so it is done where it is cheap enough (verify.py).
"""

import errno
import mmap
import os
import shutil
import struct
import zlib
from typing import List, Optional, Sequence

import numpy as np
import torch

from ds_mlm import atomic
from ds_mlm.atomic import remove_dead_leftovers  # noqa: F401 (the store's leftovers are the atomic helper's)
from ds_mlm.errors import UserError

MAGIC = b"DSMLMTOK"
FORMAT_VERSION = 2
DATA, INDEX = "data.bin", "data.idx"
_HEADER = struct.Struct("<8sIIQQ64sIII20x")
HEADER_BYTES = _HEADER.size  # 128
_CHECKED = 104  # the header checksum covers bytes 0..103
CHECK_BLOCK = 16 << 20  # checksums are computed over reads of this size
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
# Files a store directory may hold, ours and the ancestor's cache (arr.dat, idx_arr.dat): replaced without asking.
_REPLACEABLE = {DATA, INDEX, "arr.dat", "idx_arr.dat"}


class StaleCacheError(Exception):
    """The store at this path cannot be used as it is (missing, partial, damaged, another version or fingerprint)."""


class DamagedStore(StaleCacheError):
    """The store's data do not match their checksum (bytes changed on disk after it was written)."""


def store_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def map_array(path: str, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only array over `count` items of a file from byte `offset`, without reading them."""
    if count == 0:
        return np.zeros(0, dtype=dtype)  # mmap cannot map an empty range
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset)


class TokenStore(torch.utils.data.Dataset):
    """A read-only store: `len(store)`, `store[i]` (a LongTensor), `store.__getitems__(indices)` (uint arrays)."""

    def __init__(self, path: str, expect_fingerprint: Optional[str] = None):
        self.path = path
        index_path, data_path = os.path.join(path, INDEX), os.path.join(path, DATA)
        try:
            with open(index_path, "rb") as f:
                header = f.read(HEADER_BYTES)
            index_size, data_size = os.path.getsize(index_path), os.path.getsize(data_path)
        except (FileNotFoundError, NotADirectoryError):
            raise StaleCacheError(f"{path}: no complete token store there") from None
        if len(header) < HEADER_BYTES or header[:8] != MAGIC:
            raise StaleCacheError(f"{index_path}: not a ds-mlm token store index (bad magic)")
        if len(header) >= 12 and struct.unpack_from("<I", header, 8)[0] != FORMAT_VERSION:
            version = struct.unpack_from("<I", header, 8)[0]
            raise StaleCacheError(f"{path}: token store format version {version}, this ds-mlm reads {FORMAT_VERSION}")
        magic, version, itemsize, n_samples, n_tokens, fingerprint, data_crc, offsets_crc, crc = _HEADER.unpack(header)
        if crc != zlib.crc32(header[:_CHECKED]):
            raise StaleCacheError(f"{index_path}: the header is damaged (checksum mismatch)")
        if itemsize not in _DTYPES:
            raise StaleCacheError(f"{index_path}: unknown id width {itemsize} bytes")
        if index_size != HEADER_BYTES + 8 * (n_samples + 1) or data_size != itemsize * n_tokens:
            raise StaleCacheError(f"{path}: file sizes do not match the header (an incomplete or damaged store)")
        self.fingerprint = fingerprint.decode("ascii", errors="replace")
        self.data_crc32, self.offsets_crc32 = data_crc, offsets_crc
        if expect_fingerprint is not None and self.fingerprint != expect_fingerprint:
            raise StaleCacheError(f"{path}: built from other inputs (fingerprint {self.fingerprint[:12]}, "
                                  f"expected {expect_fingerprint[:12]})")
        self.dtype = _DTYPES[itemsize]
        self.num_tokens = n_tokens
        self._offsets = map_array(index_path, HEADER_BYTES, np.dtype("<i8"), n_samples + 1)
        self._tokens = map_array(data_path, 0, self.dtype, n_tokens)
        if self._offsets[0] != 0 or self._offsets[-1] != n_tokens:
            raise StaleCacheError(f"{index_path}: offsets do not span data.bin (a damaged store)")

    def __len__(self) -> int:
        return self._offsets.size - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a store of {len(self)} samples")
        i %= len(self)  # a negative i counts from the end, as for a list
        start, end = self._offsets[i], self._offsets[i + 1]
        return torch.from_numpy(self._tokens[start:end].astype(np.int64))

    def __getitems__(self, indices: Sequence[int]) -> List[np.ndarray]:
        """Samples `indices` as zero-copy views of the map (what torch's DataLoader asks a batch sampler for)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range for a store of {len(self)} samples")
        idx %= max(len(self), 1)
        tokens = self._tokens
        return [tokens[s:e] for s, e in zip(self._offsets[idx].tolist(), self._offsets[idx + 1].tolist())]

    def sizes(self) -> np.ndarray:
        """The length of every sample (int64)."""
        return np.diff(self._offsets)

    def verify(self) -> None:
        """Read both files and compare their checksums with the header's; DamagedStore names what differs."""
        for name, offset, expected in ((DATA, 0, self.data_crc32), (INDEX, HEADER_BYTES, self.offsets_crc32)):
            got = file_crc32(os.path.join(self.path, name), offset)
            if got != expected:
                raise DamagedStore(f"{os.path.join(self.path, name)}: the token data are damaged (crc32 {got:08x}, "
                                   f"written as {expected:08x})")

    # A DataLoader with worker processes pickles the dataset: send the path, map the files again on arrival.
    def __getstate__(self):
        return {"path": self.path, "fingerprint": self.fingerprint}

    def __setstate__(self, state):
        TokenStore.__init__(self, state["path"], expect_fingerprint=state["fingerprint"])  # not a subclass's builder


def file_crc32(path: str, offset: int = 0) -> int:
    """crc32 of a file from byte `offset` to its end (zlib's, ~2 GB/s here: cheaper than sha256's ~0.9)."""
    crc, buffer = 0, bytearray(CHECK_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


class StoreWriter:
    """Append blocks to a new store in a temporary directory; `commit()` puts it in place, `abort()` removes it.

    Used as a context manager: leaving the `with` block by an exception aborts. A full disk (or any write error)
    becomes a UserError naming the directory, with nothing left behind.
    """

    def __init__(self, path: str, dtype, fingerprint: str):
        self.path = os.path.abspath(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.itemsize not in _DTYPES or len(fingerprint) != 64:
            raise ValueError("a store holds uint16 or uint32 ids and a 64-character fingerprint")
        self.fingerprint = fingerprint
        self.tmp = f"{self.path}{atomic.TMP}{atomic.owner_tag()}"
        self.num_samples = self.num_tokens = 0
        first = np.zeros(1, dtype="<i8").tobytes()
        self.data_crc32, self.offsets_crc32 = 0, zlib.crc32(first)  # computed from the bytes as they are written
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._guard(os.makedirs, self.tmp)
        self._data = self._guard(open, os.path.join(self.tmp, DATA), "wb")
        self._index = self._guard(open, os.path.join(self.tmp, INDEX), "wb")
        self._guard(self._index.write, bytes(HEADER_BYTES) + first)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            self.abort()
            hint = "free some space or" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the directory, or"
            raise UserError(f"cannot write the token store {self.tmp}: {e.strerror}; {hint} choose another "
                            "--datasets_cache_dir") from None

    def append(self, block_tokens: np.ndarray, block_offsets: np.ndarray) -> None:
        """Append blocks given flat (block_offsets starting at 0, as the packers return them)."""
        if block_offsets.size <= 1:
            return
        data = np.ascontiguousarray(block_tokens, dtype=self.dtype).data
        offsets = (block_offsets[1:].astype("<i8") + self.num_tokens).data
        self._guard(self._data.write, data)
        self._guard(self._index.write, offsets)
        self.data_crc32 = zlib.crc32(data, self.data_crc32)
        self.offsets_crc32 = zlib.crc32(offsets, self.offsets_crc32)
        self.num_samples += block_offsets.size - 1
        self.num_tokens += int(block_offsets[-1])

    def commit(self) -> None:
        """Write the header, fsync, and rename the directory into place (replacing an older store)."""
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.num_samples, self.num_tokens,
                              self.fingerprint.encode("ascii"), self.data_crc32, self.offsets_crc32, 0)
        header = header[:_CHECKED] + struct.pack("<I", zlib.crc32(header[:_CHECKED])) + header[_CHECKED + 4:]
        self._guard(self._finish_files, header)
        if os.path.lexists(self.path):
            self._check_replaceable()
        self._guard(atomic.publish, self.tmp, self.path)

    def _finish_files(self, header: bytes) -> None:
        for f in (self._data, self._index):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        with open(os.path.join(self.tmp, INDEX), "r+b") as f:
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        atomic.fsync_dir(self.tmp)

    def _check_replaceable(self) -> None:
        if not os.path.isdir(self.path) or not set(os.listdir(self.path)) <= _REPLACEABLE:
            self.abort()
            raise UserError(f"{self.path} exists and is not a token store: move it away or choose another "
                            "--datasets_cache_dir")

    def abort(self) -> None:
        for f in (getattr(self, "_data", None), getattr(self, "_index", None)):
            if f is not None and not f.closed:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
