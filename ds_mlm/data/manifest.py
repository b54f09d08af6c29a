"""A dataset on disk: its shards, the manifest that lists them, and `ShardedStore`, one zero-copy view over them.

    DATASET/                          one per split: CACHE_DIR/train, CACHE_DIR/validation
      manifest.json                   written last, atomically; names only complete shards
      index-<16 hex>.bin              int64 offsets of every sample over the shards' tokens laid end to end
      shards/<name>/data.bin,data.idx one token store per input file or piece (store.py; names: dataset_plan.py)
      .verified/<host>.json           shards this host has checked against their checksums (verify.py)

manifest.json: {"format": "ds-mlm dataset", "version": 2, "fingerprint" (the dataset's, dataset_plan.py), "options",
"tokenizer", "dtype", "samples", "tokens", "index", "index_crc32", "sources": [{"name", "files", "samples",
"tokens", "shards": [{"name", "file", "piece", "range", "fingerprint", "samples", "tokens", "data_crc32",
"identity"}]}]}. The index holds n_samples + 1 offsets: sample i is the tokens [index[i], index[i + 1]) of that
virtual concatenation, which lie in the shard whose cumulative token count brackets them. The shards are mapped
side by side into one array (region.py), so a batched read is the same few vectorised lookups and one slice per
sample as one store's, whatever the number of shards; opening reads the manifest and maps the index: no shard file
is opened before one of its samples is read.

Writing (`finalize`): the index first (a new name each time), then the manifest, atomically; then shards, index
files and format-1 files that no manifest names any more are removed. A reader of the previous manifest keeps its
open maps (on NFS, until it reopens).
"""

import os
import shutil
import socket
import zlib
from typing import List, Optional, Sequence

import numpy as np
import orjson
import psutil
import torch
from numba import njit

from ds_mlm import atomic
from ds_mlm.data.region import Region, page_aligned_places
from ds_mlm.data.store import (DATA, FORMAT_VERSION, HEADER_BYTES, INDEX, StaleCacheError, file_crc32,
                               map_array)
from ds_mlm.errors import UserError

MANIFEST, SHARDS, STAMPS = "manifest.json", "shards", ".verified"
_FORMAT = "ds-mlm dataset"
_FORMAT1_FILES = {DATA, INDEX, "arr.dat", "idx_arr.dat"}  # a format-1 store (one for all files), the ancestor's cache


def shard_path(dataset: str, name: str) -> str:
    return os.path.join(dataset, SHARDS, name)


def read_manifest(dataset: str) -> Optional[dict]:
    """The manifest of the dataset at `dataset`, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(dataset, MANIFEST), "rb") as f:
            manifest = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == _FORMAT else None


def known_identities(manifest: Optional[dict]) -> dict:
    """{input path: identity} recorded by a manifest (dataset_plan.py reuses their content hashes)."""
    if not manifest:
        return {}
    return {s["identity"]["path"]: s["identity"] for src in manifest.get("sources", []) for s in src["shards"]
            if isinstance(s.get("identity"), dict) and "path" in s["identity"]}


def check_replaceable(dataset: str, flag: str = "--datasets_cache_dir") -> Optional[str]:
    """A UserError when `dataset` exists and holds something that is not ours; else what it holds, in words."""
    if not os.path.lexists(dataset):
        return None
    if not os.path.isdir(dataset):
        raise UserError(f"{dataset} exists and is not a token dataset: move it away or choose another {flag}")
    entries = set(os.listdir(dataset))
    ours = {MANIFEST, SHARDS, STAMPS} | _FORMAT1_FILES
    odd = sorted(e for e in entries if e not in ours and not e.startswith(("index-", f".{MANIFEST}.")))
    if odd:
        raise UserError(f"{dataset} holds {', '.join(odd[:3])}, not a ds-mlm token dataset: move it away or choose "
                        f"another {flag}")
    if entries & _FORMAT1_FILES and MANIFEST not in entries:
        return "a token store of an older ds-mlm (format 1, one store for all files)"
    return None


def finalize(plan, dataset: str, counts: dict) -> dict:
    """Write the index and the manifest of `plan` (every shard built), then remove what it no longer names.
    `counts`: {shard name: (samples, tokens, data_crc32)}. Returns the manifest."""
    sources, shard_names, base = [], [], 0
    index_tmp = os.path.join(dataset, f".index.{atomic.owner_tag()}.tmp")
    crc = 0
    try:
        with open(index_tmp, "wb") as out:
            out.write(np.zeros(1, dtype="<i8").tobytes())
            crc = zlib.crc32(np.zeros(1, dtype="<i8").tobytes())
            for source in plan.sources:
                entries = []
                for shard in source.shards:
                    samples, tokens, data_crc = counts[shard.name]
                    offsets = map_array(os.path.join(shard_path(dataset, shard.name), INDEX), HEADER_BYTES,
                                   np.dtype("<i8"), samples + 1)
                    chunk = (offsets[1:] + base).astype("<i8").tobytes()
                    out.write(chunk)
                    crc = zlib.crc32(chunk, crc)
                    base += tokens
                    shard_names.append(shard.name)
                    entries.append({"name": shard.name, "file": shard.file, "piece": shard.piece,
                                    "range": shard.byte_range, "fingerprint": shard.fingerprint, "samples": samples,
                                    "tokens": tokens, "data_crc32": data_crc, "identity": shard.identity})
                sources.append({"name": source.name, "files": source.files, "shards": entries,
                                "samples": sum(e["samples"] for e in entries),
                                "tokens": sum(e["tokens"] for e in entries)})
            out.flush()
            os.fsync(out.fileno())
        index_name = f"index-{plan.fingerprint[:16]}-{crc:08x}.bin"
        os.replace(index_tmp, os.path.join(dataset, index_name))
    except BaseException:
        if os.path.exists(index_tmp):
            os.remove(index_tmp)
        raise
    manifest = {"format": _FORMAT, "version": FORMAT_VERSION, "fingerprint": plan.fingerprint,
                "options": plan.options.identity(), "tokenizer": plan.tokenizer, "dtype": plan.dtype.str,
                "samples": sum(s["samples"] for s in sources), "tokens": base, "index": index_name,
                "index_crc32": crc, "sources": sources}
    atomic.write_text(os.path.join(dataset, MANIFEST), orjson.dumps(manifest).decode())
    _remove_unnamed(dataset, set(shard_names), index_name)
    return manifest


def _remove_unnamed(dataset: str, names: set, index_name: str) -> None:
    for entry in os.listdir(dataset):
        if (entry.startswith("index-") and entry != index_name) or entry in _FORMAT1_FILES:
            os.remove(os.path.join(dataset, entry))
    remove_leftovers(dataset, keep=names)


def remove_leftovers(dataset: str, keep: Optional[set] = None) -> None:
    """Remove the staging directories of this host's dead shard writers (kill -9) and, when `keep` is given, every
    shard not in it; a live writer's (here or on another host) are left alone. One listing, whatever the number."""
    shards = os.path.join(dataset, SHARDS)
    host = socket.gethostname()
    for name in os.listdir(shards) if os.path.isdir(shards) else ():
        staged = next((kind for kind in (atomic.TMP, atomic.OLD) if kind in name), None)
        if staged is None:
            if keep is not None and name not in keep:
                shutil.rmtree(os.path.join(shards, name), ignore_errors=True)
            continue
        owner_host, _, pid = name.split(staged, 1)[1].rpartition("-")
        if owner_host == host and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(os.path.join(shards, name), ignore_errors=True)


_OUT_OF_RANGE, _UNMAPPED = -1, 1


@njit(cache=True)
def _locate(idx, n, lo, index, shards, table, step, out) -> int:
    """out[0], out[1]: where samples `idx` (of n, negative ones from the end; lo: the view's first) start and end in
    the region's array. Returns _OUT_OF_RANGE, _UNMAPPED (one of their shards is not mapped yet) or 0.
    shards: rows (samples before the end of each shard, shift from the index's coordinates to the region's,
    mapped?); table[t]: the shard of sample t * step, from which a short walk finds any sample's shard (a binary
    search over 10,000 shards costs 4x more here: its cache misses and mispredictions)."""
    status = 0
    for i in range(idx.size):
        j = idx[i]
        if j < -n or j >= n:
            return _OUT_OF_RANGE
        j = (j + n if j < 0 else j) + lo
        k = table[j // step]
        while shards[0, k] <= j:  # past the end of shard k (empty shards are walked over)
            k += 1
        if shards[2, k] == 0:
            status = _UNMAPPED
        out[0, i], out[1, i] = index[j] + shards[1, k], index[j + 1] + shards[1, k]
    return status


class ShardedStore(torch.utils.data.Dataset):
    """The samples of a dataset (or of one of its sources, `source=k`): `len`, `store[i]` (a LongTensor),
    `store.__getitems__(indices)` (zero-copy uint16/uint32 views), `sizes()`; see the module docstring."""

    def __init__(self, path: str, expect_fingerprint: Optional[str] = None, source: Optional[int] = None):
        self.path, self.source = path, source
        manifest = read_manifest(path)
        if manifest is None:
            raise StaleCacheError(f"{path}: no complete token dataset there (no readable {MANIFEST})")
        if manifest.get("version") != FORMAT_VERSION:
            raise StaleCacheError(f"{path}: token dataset format version {manifest.get('version')}, this ds-mlm "
                                  f"reads {FORMAT_VERSION}")
        self.fingerprint, self.manifest = manifest["fingerprint"], manifest
        if expect_fingerprint is not None and self.fingerprint != expect_fingerprint:
            raise StaleCacheError(f"{path}: built from other inputs (fingerprint {self.fingerprint[:12]}, "
                                  f"expected {expect_fingerprint[:12]})")
        self.dtype = np.dtype(manifest["dtype"])
        shards = [s for src in manifest["sources"] for s in src["shards"]]
        self.shard_names = [s["name"] for s in shards]
        self._token_base = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s["tokens"] for s in shards], out=self._token_base[1:])
        self.source_names = [src["name"] for src in manifest["sources"]]
        bounds = np.cumsum([0] + [src["samples"] for src in manifest["sources"]])
        self._lo, self._hi = (0, int(bounds[-1])) if source is None else (int(bounds[source]), int(bounds[source + 1]))
        index = os.path.join(path, manifest["index"])
        if not os.path.isfile(index) or os.path.getsize(index) != 8 * (manifest["samples"] + 1):
            raise StaleCacheError(f"{path}: its index {manifest['index']} is missing or incomplete")
        self._index = map_array(index, 0, np.dtype("<i8"), manifest["samples"] + 1)
        self.num_tokens = int(self._index[self._hi] - self._index[self._lo])
        # The shards side by side in one array (region.py); a sample's place there is its offset in the index
        # shifted by its shard's: places (page-aligned) minus the tokens of the shards before it.
        places = page_aligned_places(np.diff(self._token_base) * self.dtype.itemsize, self.dtype.itemsize)
        self._region = Region(places, self.dtype)
        ends = np.cumsum([s["samples"] for s in shards], dtype=np.int64)
        self._shards = np.stack([ends, places[:-1] - self._token_base[:-1],
                                 np.zeros(len(shards), dtype=np.int64)])  # one array: one argument for _locate
        self._step = max(1, manifest["samples"] // (4 * max(len(shards), 1)))  # ~4 table entries per shard
        self._table = np.searchsorted(ends, np.arange(0, manifest["samples"] + self._step, self._step),
                                      side="right").astype(np.int64)

    @property
    def files(self) -> List[str]:
        """The input files of this view (its source's, or every source's)."""
        sources = self.manifest["sources"] if self.source is None else [self.manifest["sources"][self.source]]
        return [f for src in sources for f in src["files"]]

    def _open(self, k: int) -> None:
        """Map shard k's tokens, on the first read of one of its samples (opening 10,000 shards opens none)."""
        data = os.path.join(shard_path(self.path, self.shard_names[k]), DATA)
        count = int(self._token_base[k + 1] - self._token_base[k])
        try:
            if os.path.getsize(data) != count * self.dtype.itemsize:
                raise FileNotFoundError
            self._region.map(k, data, count)
            self._shards[2, k] = 1
        except FileNotFoundError:
            raise StaleCacheError(f"{self.path}: shard {self.shard_names[k]} is missing or incomplete (removed or "
                                  "rebuilt by another job?): run again to rebuild it") from None

    def __len__(self) -> int:
        return self._hi - self._lo

    def __getitems__(self, indices: Sequence[int]) -> List[np.ndarray]:
        n = self._hi - self._lo
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((2, idx.size), dtype=np.int64)
        status = _locate(idx, n, self._lo, self._index, self._shards, self._table, self._step, out)
        if status == _OUT_OF_RANGE:
            raise IndexError(f"sample index out of range for a dataset of {n} samples")
        if status == _UNMAPPED:  # the first read of some shards: map them
            shards = np.searchsorted(self._token_base, self._index[idx % n + self._lo], side="right") - 1
            for k in np.unique(shards[self._shards[2, shards] == 0]).tolist():
                self._open(k)
        tokens = self._region.array
        starts, ends = out.tolist()
        return [tokens[a:b] for a, b in zip(starts, ends)]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)} samples")
        return torch.from_numpy(self.__getitems__([i])[0].astype(np.int64))

    def sizes(self) -> np.ndarray:
        """The length of every sample (int64)."""
        return np.diff(self._index[self._lo:self._hi + 1])

    def verify_index(self) -> None:
        """Compare the index file with its checksum (the shards have their own: verify.py)."""
        got = file_crc32(os.path.join(self.path, self.manifest["index"]))
        if got != self.manifest["index_crc32"]:
            raise StaleCacheError(f"{os.path.join(self.path, self.manifest['index'])}: damaged (crc32 {got:08x}, "
                                  f"written as {self.manifest['index_crc32']:08x})")

    # A DataLoader with worker processes pickles the dataset: send the path, map the files again on arrival.
    def __getstate__(self):
        return {"path": self.path, "fingerprint": self.fingerprint, "source": self.source}

    def __setstate__(self, state):
        ShardedStore.__init__(self, state["path"], expect_fingerprint=state["fingerprint"], source=state["source"])


def open_store(path: str, expect_fingerprint: Optional[str] = None) -> ShardedStore:
    """The complete dataset at `path`, every source; StaleCacheError when it cannot be used (see ShardedStore).
    One shard of it alone is a store.TokenStore."""
    return ShardedStore(path, expect_fingerprint)
