"""Building a token store: read, tokenize in worker processes, pack, write; pipelined, in bounded memory.

    main process:  read chunk k+m ──► submit ─┐        ┌─► pack chunk k (numba) ──► append to data.bin/data.idx
    workers:                                  └─ tokenize chunks k..k+m (in parallel) ─┘

The main process reads files in binary blocks (text.py) and cuts them into chunks of `chunk_size` lines (or
CHUNK_CHARS characters of text, whichever comes first), submits each chunk to a pool of `num_workers` processes,
and consumes results in submission order, so the store is the same for any number of workers. At most
2 * num_workers + 2 chunks are in flight (`Pool.imap` would read the whole corpus ahead), so memory follows the
chunk size, not the corpus. Workers inherit the tokenizer through fork (a module global set before the pool
starts) and return ids as two flat numpy arrays. Packing is streaming-exact (packing.py), so chunk boundaries
never change the store either.
"""

import collections
import itertools
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ds_mlm.data.packing import CONCAT, Packer, PackStats
from ds_mlm.data.spec import DatasetSpec, encode_lines, separator_id, special_ids
from ds_mlm.data.store import StaleCacheError, StoreWriter, open_store, remove_dead_leftovers, store_dtype
from ds_mlm.data.text import LineReader, ReadStats
from ds_mlm.errors import UserError

log = logging.getLogger(__name__)
CHUNK_CHARS = 4 << 20  # a chunk also ends after this much text: 2500 lines of 1 MiB each would not fit in memory

_TOKENIZER = None  # set before the pool forks: workers inherit the tokenizer instead of unpickling it


@dataclass
class BuildReport:
    """What a build read, repaired, packed and wrote; `format()` is the summary logged after a build."""

    path: str
    """The store written."""
    files: List[str]
    """The text files read, in order."""
    read: ReadStats
    """Counts of reading and cleaning the text (text.py)."""
    pack: PackStats
    """Counts of packing (packing.py)."""
    block_size: int
    """Ids per sample at most."""
    workers: int
    """Tokenizer processes used."""
    seconds: float
    """Wall time of the build."""

    @property
    def tokens_per_second(self) -> float:
        return self.pack.tokens / max(self.seconds, 1e-9)

    @property
    def mean_fill(self) -> float:
        """Mean share of block_size a sample fills."""
        return self.pack.block_tokens / max(self.pack.blocks * self.block_size, 1)

    def format(self) -> str:
        r, p = self.read, self.pack
        return "\n".join([
            f"token store {self.path}: {r.files} file(s), {r.bytes / 2**20:,.1f} MiB in {self.seconds:.1f} s "
            f"({self.tokens_per_second:,.0f} tokens/s, {self.workers} worker(s))",
            f"  lines: {r.lines:,} kept, {r.blank_lines:,} blank dropped, {r.boms:,} byte-order marks removed, "
            f"{r.replaced:,} invalid UTF-8 sequences replaced, {r.long_lines:,} over-long lines cut",
            f"  sentences: {p.sentences:,} ({p.empty:,} empty after tokenization, ignored), tokens: {p.tokens:,}",
            f"  samples: {p.blocks:,} of at most {self.block_size} ids, mean fill {self.mean_fill:.1%}",
            f"  longer than a sample: {p.split:,} split, {p.skipped:,} skipped, {p.truncated:,} truncated "
            f"({p.dropped_tokens:,} tokens lost)",
        ])


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already: no Rust threads on top


def _tokenize(lines: List[str], vocab_size: int, dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
    """In a worker: the ids of `lines` as flat (tokens, offsets) arrays, checked against the vocabulary."""
    ids = encode_lines(_TOKENIZER, lines) if lines else []  # a file of blank lines sends an empty chunk
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(offsets[-1]))
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise UserError(f"the tokenizer gave id {int(tokens.max())}, outside its own {vocab_size} ids: the "
                        "tokenizer files are inconsistent; rebuild the tokenizer")
    return tokens.astype(dtype), offsets


def _chunks(files: List[str], chunk_size: int, totals: ReadStats) -> Iterator[Tuple[List[str], int]]:
    """(lines, bytes of file they came from) chunk after chunk; warns about dirty or empty files as it goes."""
    for path in files:
        reader = LineReader(path)
        buffer, buffered_chars, consumed = [], 0, 0
        for lines, block_bytes in _readable(reader):
            buffer.extend(lines)
            buffered_chars += sum(map(len, lines))
            consumed += block_bytes
            while len(buffer) >= chunk_size or (buffer and buffered_chars >= CHUNK_CHARS):
                chunk, buffer = buffer[:chunk_size], buffer[chunk_size:]
                buffered_chars = sum(map(len, buffer))
                yield chunk, consumed
                consumed = 0
        if buffer or consumed:
            yield buffer, consumed
        stats = reader.stats
        if stats.replaced:
            log.warning("%s: %d invalid UTF-8 sequence(s) replaced with U+FFFD (the file is not clean UTF-8)",
                        path, stats.replaced)
        if stats.lines == 0:
            log.warning("%s: no text (empty, or only blank lines): it adds no sample", path)
        totals += stats


def _readable(reader: LineReader):
    """The reader's blocks, with a file that cannot be read (removed, unreadable) as a UserError naming it."""
    try:
        yield from reader
    except OSError as e:
        raise UserError(f"{reader.path}: cannot read it ({e.strerror}): check the file and its permissions") from None


def build_store(spec: DatasetSpec, path: str, num_workers: Optional[int] = None, chunk_size: int = 2500,
                fingerprint: Optional[str] = None) -> BuildReport:
    """Build the store of `spec` at `path` (replacing whatever is there once complete); see the module docstring."""
    global _TOKENIZER
    tokenizer, started = spec.tokenizer, time.perf_counter()
    workers = num_workers or len(os.sched_getaffinity(0))
    dtype = store_dtype(len(tokenizer))
    bos, eos = special_ids(tokenizer)
    sep = separator_id(tokenizer) if spec.datasets_type == CONCAT else eos
    packer = Packer(spec.datasets_type, spec.block_size, bos, eos, sep, spec.long_sentence, dtype)
    read = ReadStats()
    progress = tqdm(total=sum(os.path.getsize(p) for p in spec.files), unit="B", unit_scale=True, file=sys.stderr,
                    desc=f"tokenizing {os.path.basename(path)}", mininterval=1.0)
    _TOKENIZER = tokenizer
    try:
        # An executor, not a Pool: a worker that dies (the OOM killer) breaks it, where a Pool would wait forever
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_init_worker) as pool, \
                StoreWriter(path, dtype, fingerprint or spec.fingerprint()) as writer:
            in_flight = collections.deque()

            def write_oldest():
                result, nbytes = in_flight.popleft()
                try:
                    ids = result.result()
                except BrokenProcessPool:
                    raise UserError(f"a tokenizer process died while building {path} (killed, or out of memory?): "
                                    "lower --preprocessing_num_workers or --tokenize_chunksize and run again; "
                                    "nothing was kept") from None
                writer.append(*packer.feed(*ids))
                progress.update(nbytes)
                progress.set_postfix_str(f"{packer.stats.tokens / (time.perf_counter() - started):,.0f} tokens/s",
                                         refresh=False)

            for lines, nbytes in _chunks(spec.files, chunk_size, read):
                in_flight.append((pool.submit(_tokenize, lines, len(tokenizer), dtype), nbytes))
                if len(in_flight) >= 2 * workers + 2:
                    write_oldest()
            while in_flight:
                write_oldest()
            writer.append(*packer.finish())
            stats = packer.stats
            if stats.blocks == 0:
                raise UserError(f"no sample from {_describe(spec.files)} (no text, or every line longer than a "
                                f"sample with --long_sentence {spec.long_sentence}): add text to them")
            writer.commit()
    finally:
        _TOKENIZER = None
        progress.close()
    if stats.skipped:
        log.warning("%d sentence(s) longer than %d ids skipped (%d tokens lost): --long_sentence split keeps them",
                    stats.skipped, spec.block_size - 2, stats.dropped_tokens)
    return BuildReport(path=path, files=list(spec.files), read=read, pack=stats, block_size=spec.block_size,
                       workers=workers, seconds=time.perf_counter() - started)


def _describe(files: List[str]) -> str:
    return files[0] if len(files) == 1 else f"the {len(files)} files {files[0]} ... {files[-1]}"


def ensure_store(spec: DatasetSpec, path: str, num_workers: Optional[int] = None, chunk_size: int = 2500,
                 overwrite: bool = False, fingerprint: Optional[str] = None) -> Optional[BuildReport]:
    """Build the store at `path` when it is missing, stale or `overwrite`; None when the existing one matched.

    `fingerprint`: spec.fingerprint() when the caller has it already (hashing the inputs twice costs time, and a file
    changing in between would give the store another fingerprint than the caller checks for)."""
    if chunk_size < 1:
        raise UserError(f"chunk size {chunk_size} must be at least 1 line (--tokenize_chunksize)")
    if num_workers is not None and num_workers < 1:
        raise UserError(f"{num_workers} workers: use at least 1 (--preprocessing_num_workers)")
    remove_dead_leftovers(path)
    fingerprint = fingerprint or spec.fingerprint()
    if overwrite:
        log.info("%s: rebuilding the token store (overwrite asked)", path)
    else:
        try:
            open_store(path, expect_fingerprint=fingerprint)
            return None
        except StaleCacheError as e:
            log.info("%s; building it", e)
    return build_store(spec, path, num_workers, chunk_size, fingerprint)
