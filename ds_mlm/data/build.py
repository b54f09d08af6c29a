"""Building shards: read, tokenize in worker processes, pack, write; pipelined, in bounded memory, resumable.

    main process:  read chunk k+m ──► submit ─┐        ┌─► pack chunk k (numba) ──► append to its shard's store
    workers:                                  └─ tokenize chunks k..k+m (in parallel) ─┘

`build_shards` builds a list of shards in one pipeline: the main process reads their files in binary blocks
(text.py, formats.py) and cuts them into chunks of `chunk_size` lines (or CHUNK_CHARS characters, or a share of a
small shard, whichever comes first), worker processes tokenize them (workers.py: results in submission order, so a shard is the same for any
number of workers), and each shard is packed on its own (blocks never straddle two input files or pieces; packing
is streaming-exact, so chunk boundaries never change a byte) and published atomically the moment its last chunk is
packed. At most 2 * num_workers + 2 chunks are in flight, so memory follows the chunk size, not the corpus. A build
that is killed keeps every shard it finished: the next one builds only the others.

Which shards to build, by which process, and the manifest written after them: ensure.py (the one build policy).
"""

import collections
import contextlib
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ds_mlm.data import manifest as layout
from ds_mlm.data.dataset_plan import DatasetPlan, ShardPlan
from ds_mlm.data.packing import CONCAT, Packer, PackStats
from ds_mlm.data.spec import encode_lines, separator_id, special_ids
from ds_mlm.data.store import StoreWriter
from ds_mlm.data.text import LineReader, ReadStats
from ds_mlm.data.workers import OrderedPool, WorkerDied
from ds_mlm.errors import UserError

log = logging.getLogger(__name__)
CHUNK_CHARS = 4 << 20  # a chunk also ends after this much text: 2500 lines of 1 MiB each would not fit in memory
MIN_CHUNK_CHARS = 64 << 10  # ... or after ~1/(8 x workers) of a small shard (bytes / chars), so every worker gets parts

_TOKENIZER = None  # set before the pool forks: workers inherit the tokenizer instead of unpickling it
SHARD_LINES = 20  # a report lists at most this many shards (the least full): a corpus of 10,000 files stays readable


def fill(stats: PackStats, block_size: int) -> float:
    """Ids stored / positions of the samples at block_size: the share of a full-length batch that is not padding."""
    return stats.block_tokens / max(stats.blocks * block_size, 1)


@dataclass
class BuildReport:
    """What a build read, repaired, packed and wrote; `format()` is the summary logged after a build."""

    path: str
    """The dataset written."""
    files: List[str]
    """The input files read, in order."""
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
    built: List[str] = field(default_factory=list)
    """Names of the shards built."""
    reused: int = 0
    """Shards that were already there and sound."""
    packing: str = "best_fit"
    """How sentences filled the blocks (packing.py)."""
    shard_stats: Dict[str, PackStats] = field(default_factory=dict)
    """Counts of packing of each shard built, by name (its fill: `fill(stats, block_size)`)."""

    @property
    def tokens_per_second(self) -> float:
        return self.pack.tokens / max(self.seconds, 1e-9)

    @property
    def mean_fill(self) -> float:
        """Mean share of block_size a sample fills: ids stored / positions of the samples at block_size."""
        return fill(self.pack, self.block_size)

    def shard_lines(self, most: int = SHARD_LINES) -> List[str]:
        """One line per shard built (the `most` least full of them when there are more)."""
        order = sorted(self.shard_stats.items(), key=lambda kv: (fill(kv[1], self.block_size), kv[0]))
        lines = [f"    {name}: {s.blocks:,} samples, fill {fill(s, self.block_size):.1%}" for name, s in order[:most]]
        if len(order) > most:
            lines.append(f"    ... and {len(order) - most:,} more shard(s), fuller")
        return lines

    def format(self) -> str:
        r, p = self.read, self.pack
        return "\n".join([
            f"token dataset {self.path}: {len(self.built)} shard(s) built from {r.files} file(s), {self.reused} "
            f"reused; {r.bytes / 2**20:,.1f} MiB of text in {self.seconds:.1f} s ({self.tokens_per_second:,.0f} "
            f"tokens/s, {self.workers} worker(s))",
            f"  lines: {r.lines:,} kept, {r.blank_lines:,} blank dropped, {r.boms:,} byte-order marks removed, "
            f"{r.replaced:,} invalid UTF-8 sequences replaced, {r.long_lines:,} over-long lines cut, "
            f"{r.controls:,} control characters ({r.nuls:,} NUL) kept, {r.transcoded:,} file(s) decoded from "
            f"UTF-16/32",
            f"  records (JSONL/Parquet): {r.records:,} read, {r.bad_records:,} bad skipped",
            f"  sentences: {p.sentences:,} ({p.empty:,} empty after tokenization, ignored), tokens: {p.tokens:,}",
            f"  samples: {p.blocks:,} of at most {self.block_size} ids, mean fill {self.mean_fill:.1%} (ids / "
            f"positions at {self.block_size}; {self.packing} packing), per shard built:",
            *self.shard_lines(),
            f"  longer than a sample: {p.split:,} split, {p.skipped:,} skipped, {p.truncated:,} truncated "
            f"({p.dropped_tokens:,} tokens lost)",
        ])


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


def _warn_dirt(path: str, stats: ReadStats) -> None:
    if stats.replaced:
        log.warning("%s: %d invalid UTF-8 sequence(s) replaced with U+FFFD (the file is not clean UTF-8)",
                    path, stats.replaced)
    if stats.controls:
        hint = " (UTF-16 without a byte-order mark?)" if stats.nuls * 8 > stats.bytes else ""
        log.warning("%s: %d control character(s), %d of them NUL, kept in the text%s", path, stats.controls,
                    stats.nuls, hint)
    if stats.lines == 0:
        log.warning("%s: no text (empty, or only blank lines): it adds no sample", path)


def _chunks(shards: Sequence[ShardPlan], chunk_size: int, text_field: str, totals: ReadStats, workers: int):
    """("chunk", k, lines, file bytes) for shard k's chunks, then ("end", k, None, 0), shard after shard."""
    for k, shard in enumerate(shards):
        reader = LineReader(shard.file, text_field=text_field, byte_range=shard.byte_range)
        buffer, buffered_chars, consumed = [], 0, 0
        most = max(MIN_CHUNK_CHARS, min(CHUNK_CHARS, shard.input_bytes // (8 * workers)))  # never changes a byte
        for lines, block_bytes in reader:
            buffer.extend(lines)
            buffered_chars += sum(map(len, lines))
            consumed += block_bytes
            while len(buffer) >= chunk_size or (buffer and buffered_chars >= most):
                chunk, buffer = buffer[:chunk_size], buffer[chunk_size:]
                buffered_chars = sum(map(len, buffer))
                yield "chunk", k, chunk, consumed
                consumed = 0
        if buffer or consumed:
            yield "chunk", k, buffer, consumed
        if shard.piece == 0 or shard.byte_range is None:
            reader.stats.files = 1
        else:
            reader.stats.files = 0  # a later piece of a file already counted
        _warn_dirt(shard.file if shard.byte_range is None else f"{shard.file} (piece {shard.piece})", reader.stats)
        totals += reader.stats
        yield "end", k, None, 0


def build_shards(plan: DatasetPlan, dataset: str, shards: Sequence[ShardPlan], tokenizer,
                 num_workers: Optional[int] = None, chunk_size: int = 2500,
                 beat: Optional[Callable[[], None]] = None) -> BuildReport:
    """Build `shards` (of `plan`) into `dataset`/shards/, each published as soon as it is complete."""
    global _TOKENIZER
    options, started = plan.options, time.perf_counter()
    workers = num_workers or len(os.sched_getaffinity(0))
    bos, eos = special_ids(tokenizer)
    sep = separator_id(tokenizer) if options.datasets_type == CONCAT else eos
    read, pack, built, shard_stats = ReadStats(), PackStats(), [], {}
    progress = tqdm(total=sum(s.input_bytes for s in shards), unit="B", unit_scale=True, file=sys.stderr,
                    desc=f"tokenizing {os.path.basename(dataset)}", mininterval=1.0, disable=not shards)
    state: Dict[str, object] = {"k": None, "packer": None, "writer": None}
    _TOKENIZER = tokenizer
    try:
        with OrderedPool(_tokenize, workers) if shards else contextlib.nullcontext() as pool:  # none: no worker
            in_flight = collections.deque()

            def open_shard(k):
                if state["k"] != k:
                    state["k"] = k
                    state["packer"] = Packer(options.datasets_type, options.block_size, bos, eos, sep,
                                             options.long_sentence, plan.dtype, options.packing)
                    state["writer"] = StoreWriter(layout.shard_path(dataset, shards[k].name), plan.dtype,
                                                  shards[k].fingerprint)
                return state["packer"], state["writer"]

            def write_oldest():
                kind, k, nbytes = in_flight.popleft()
                packer, writer = open_shard(k)
                if kind == "end":
                    writer.append(*packer.finish())
                    writer.commit()
                    built.append(shards[k].name)
                    shard_stats[shards[k].name] = packer.stats
                    for f in pack.__dataclass_fields__:
                        setattr(pack, f, getattr(pack, f) + getattr(packer.stats, f))
                    state["writer"] = None
                    return
                try:
                    ids = pool.next(idle=beat)
                except WorkerDied as e:
                    raise UserError(f"a tokenizer process died or hangs while building {dataset} ({e}): lower "
                                    "--preprocessing_num_workers or --tokenize_chunksize and run again; the "
                                    f"{len(built)} shard(s) finished are kept") from None
                writer.append(*packer.feed(*ids))
                progress.update(nbytes)
                progress.set_postfix_str(f"{pack.tokens + packer.stats.tokens:,} tokens", refresh=False)
                if beat is not None:
                    beat()

            for kind, k, lines, nbytes in _chunks(shards, chunk_size, options.text_field, read, workers):
                if kind == "chunk":
                    pool.submit((lines, plan.vocab_size, plan.dtype))
                in_flight.append((kind, k, nbytes))
                while pool.in_flight >= 2 * workers + 2:
                    write_oldest()
            while in_flight:
                write_oldest()
    finally:
        _TOKENIZER = None
        progress.close()
        if state["writer"] is not None:  # an error, a signal: the unfinished shard goes, the finished ones stay
            state["writer"].abort()
    if pack.skipped:
        log.warning("%d sentence(s) longer than %d ids skipped (%d tokens lost): --long_sentence split keeps them",
                    pack.skipped, options.block_size - 2, pack.dropped_tokens)
    return BuildReport(path=dataset, files=sorted({s.file for s in shards}), read=read, pack=pack,
                       block_size=options.block_size, workers=workers, seconds=time.perf_counter() - started,
                       built=built, packing=options.packing if options.datasets_type == CONCAT else "line-by-line",
                       shard_stats=shard_stats)
