"""What a dataset is built from: its sources, their shards (one per input file, or per piece of a large plain text
file), each shard's fingerprint, and the dataset's own fingerprint. Pure data: nothing here tokenizes or writes.

A shard's fingerprint is a sha256 over what changes its bytes: the store format version, the dataset type, block
size, long-sentence policy, packing (best fit and its window; sequential adds nothing, so caches built before
packing was an option stay valid) and text field, the tokenizer's fingerprint, and its input: the file (absolute path,
size, mtime_ns and a content hash, spec.file_fingerprint) and the byte range of the piece. A shard is named
`<file name>.<piece>.<fingerprint[:16]>`, so a changed input gets a new shard beside the old one and a rebuild
knows from the names alone which shards it can keep. The dataset's fingerprint (the manifest's) is a sha256 of the
sources in order, each with its shards' fingerprints: it changes when any shard would, and only then.

Content hashes (sha256 of every byte) are reused from the previous manifest while a file's (size, mtime_ns, ctime_ns,
inode, device) are all unchanged (git's index does the same), so a rebuild of a large corpus costs a stat() per
file, not a read of it; when any of them differs the whole file is hashed again, and its shards are rebuilt only
if that hash (or its size or mtime) changed.

Pieces: a plain (uncompressed, UTF-8) text file larger than `piece_bytes` is cut right after the first line break
at or past every multiple of `piece_bytes`, so each piece holds whole lines and can be built by another process.
Compressed, JSONL and Parquet files are one shard each (a stream cannot be entered in the middle).
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ds_mlm.data.formats import TEXT, UNICODE_BOMS, file_format
from ds_mlm.data.packing import BEST_FIT_WINDOW, CONCAT, LINE_BY_LINE, PACKINGS, POLICIES
from ds_mlm.data.spec import file_fingerprint, special_ids, tokenizer_fingerprint
from ds_mlm.data.store import FORMAT_VERSION, store_dtype
from ds_mlm.errors import UserError

PIECE_BYTES = 1 << 30  # ~1 GiB of text per shard: minutes of tokenizing, a unit of work worth resuming
_SEEK_BYTES = 1 << 16
HASHED = "all"  # recorded with each identity: what its sha256 covers (before 2026-12 large files had windows only)


@dataclass
class BuildOptions:
    """How samples are made from text (everything of a build that is not an input)."""

    block_size: int
    """Ids per sample at most, <s> and </s> included (--max_seq_length)."""
    datasets_type: str = CONCAT
    """MemmapConcatFullSentenceTextDataset (sentences packed into blocks) or MemmapLineByLineTextDataset."""
    long_sentence: str = "split"
    """A sentence longer than a block: split (nothing lost), skip (the ancestor) or truncate."""
    text_field: str = "text"
    """The field of JSONL and Parquet records that holds the text."""
    piece_bytes: int = PIECE_BYTES
    """Plain text files larger than this are built as several shards (pieces of whole lines)."""
    packing: str = "best_fit"
    """How sentences fill blocks: best_fit (within a window of consecutive sentences) or sequential (the ancestor)."""

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 3:
            raise UserError(f"block size {self.block_size!r} cannot hold <s>, one token and </s>: use at least 3 "
                            "(typically 128 or 512)")
        if self.datasets_type not in (CONCAT, LINE_BY_LINE):
            raise UserError(f"unknown datasets type {self.datasets_type!r}: use {CONCAT} or {LINE_BY_LINE}")
        if self.long_sentence not in POLICIES:
            raise UserError(f"unknown long-sentence policy {self.long_sentence!r}: use one of {', '.join(POLICIES)}")
        if self.packing not in PACKINGS:
            raise UserError(f"unknown packing {self.packing!r}: use one of {', '.join(PACKINGS)}")
        if not self.text_field:
            raise UserError("--text_field is empty: give the field of your records that holds the text")
        if self.piece_bytes < _SEEK_BYTES:
            raise ValueError(f"piece_bytes {self.piece_bytes} is below {_SEEK_BYTES}")

    def identity(self) -> dict:
        """What of these options changes a shard's bytes (piece_bytes changes its input, not how it is packed)."""
        identity = {"datasets_type": self.datasets_type, "block_size": self.block_size,
                    "long_sentence": self.long_sentence, "text_field": self.text_field}
        if self.datasets_type == CONCAT and self.packing != "sequential":  # sequential: the fingerprints of before
            identity["packing"] = f"{self.packing}/{BEST_FIT_WINDOW}"  # a changed window changes the bytes too
        return identity


@dataclass
class ShardPlan:
    """One shard to build or reuse."""

    name: str
    """Its directory name under the dataset's shards/."""
    source: int
    """Index of its source in the dataset."""
    file: str
    """The input file (absolute path)."""
    piece: int
    """Which piece of the file (0 for a whole file)."""
    byte_range: Optional[Tuple[int, int]]
    """[start, end) bytes of the file for a piece, None for the whole file."""
    input_bytes: int
    """Bytes of input: how much work it is (for balancing builds between processes)."""
    fingerprint: str
    """sha256 hex of everything its bytes depend on (module docstring)."""
    identity: dict
    """The input file's stat and content hash, kept in the manifest so the next plan can skip re-hashing it."""


@dataclass
class SourcePlan:
    """One source directory of a dataset."""

    name: str
    """The directory as given on the command line (the key of samples_by_source and per-source evaluation)."""
    files: List[str]
    """Its input files, sorted."""
    shards: List[ShardPlan] = field(default_factory=list)
    """Its shards, in file then piece order."""


@dataclass
class DatasetPlan:
    """Everything one dataset (a split: train or validation) is built from, and its fingerprint."""

    sources: List[SourcePlan]
    """The sources, in the order given."""
    options: BuildOptions
    """How samples are made."""
    tokenizer: str
    """The tokenizer's fingerprint."""
    vocab_size: int
    """len(tokenizer): picks uint16 or uint32 ids."""
    fingerprint: str = ""
    """sha256 hex of the sources' shard fingerprints and the options (set in __post_init__)."""

    def __post_init__(self):
        parts = {"format_version": FORMAT_VERSION, "options": self.options.identity(), "tokenizer": self.tokenizer,
                 "sources": [[s.name, [shard.fingerprint for shard in s.shards]] for s in self.sources]}
        self.fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    @property
    def shards(self) -> List[ShardPlan]:
        return [shard for source in self.sources for shard in source.shards]

    @property
    def dtype(self):
        return store_dtype(self.vocab_size)


def _identity(path: str, known: Dict[str, dict]) -> dict:
    """The file's fingerprint (spec.file_fingerprint) and stat: the recorded one while every stat signal agrees
    with it, else a fresh hash of all its bytes (an edit keeps the size, and `touch -r` puts the mtime back, but
    not the ctime; a copy or a `mv` over it changes the inode)."""
    st = os.stat(path)
    stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    previous = known.get(os.path.abspath(path))
    if previous and previous.get("stat") == stat and previous.get("hashed") == HASHED:
        return previous
    return {**file_fingerprint(path), "stat": stat, "hashed": HASHED}


def _piece_ranges(path: str, size: int, piece_bytes: int) -> List[Optional[Tuple[int, int]]]:
    """[None] for one whole-file shard, else the [start, end) of each piece, cut right after a line break."""
    kind, compression = file_format(path)
    if kind != TEXT or compression or size <= piece_bytes:
        return [None]
    cuts = [0]
    with open(path, "rb") as f:
        if any(f.read(4).startswith(bom) for bom, _ in UNICODE_BOMS):
            return [None]  # a UTF-16/32 line break is not one b"\n"
        while cuts[-1] + piece_bytes < size:
            f.seek(cuts[-1] + piece_bytes)
            while (block := f.read(_SEEK_BYTES)) and (at := block.find(b"\n")) < 0:
                pass
            if not block:
                break
            cut = f.tell() - len(block) + at + 1
            if cut >= size:
                break
            cuts.append(cut)
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [size])] if len(cuts) > 1 else [None]


def _shard_name(path: str, piece: int, fingerprint: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path))[:80]
    return f"{base}.{piece}.{fingerprint[:16]}"


def plan_dataset(sources: Sequence[Tuple[str, Sequence[str]]], tokenizer, options: BuildOptions,
                 known: Optional[Dict[str, dict]] = None, tokenizer_id: Optional[str] = None) -> DatasetPlan:
    """The plan of a dataset from (source name, its files) pairs; `known`: identities of a previous manifest;
    `tokenizer_id`: the tokenizer's fingerprint where the caller has it (it serialises the whole tokenizer)."""
    special_ids(tokenizer)  # a tokenizer without <s> and </s> fails now, before anything is hashed
    tok = tokenizer_id or tokenizer_fingerprint(tokenizer)
    base = {"format_version": FORMAT_VERSION, "options": options.identity(), "tokenizer": tok}
    plans = []
    for k, (name, files) in enumerate(sources):
        source = SourcePlan(name=os.fspath(name), files=[os.path.abspath(f) for f in files])
        for path in source.files:
            try:
                identity = _identity(path, known or {})
                ranges = _piece_ranges(path, identity["size"], options.piece_bytes)
            except OSError as e:
                raise UserError(f"{path}: cannot read it ({e.strerror}): check the file and its permissions") from None
            content = {key: identity[key] for key in ("path", "size", "mtime_ns", "sha256")}
            for piece, byte_range in enumerate(ranges):
                parts = {**base, "input": content, "range": byte_range}
                fp = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
                size = identity["size"] if byte_range is None else byte_range[1] - byte_range[0]
                source.shards.append(ShardPlan(name=_shard_name(path, piece, fp), source=k, file=path, piece=piece,
                                               byte_range=byte_range, input_bytes=size, fingerprint=fp,
                                               identity=identity))
        plans.append(source)
    return DatasetPlan(sources=plans, options=options, tokenizer=tok, vocab_size=len(tokenizer))


def balance(shards: Sequence[ShardPlan], workers: Sequence[int]) -> Dict[int, List[str]]:
    """Shard names for each of `workers` (ranks), disjoint, with about equal input bytes each: the largest first,
    each to the least loaded (LPT scheduling); each worker's share keeps the plan's order."""
    load = {w: 0 for w in workers}
    share = {w: [] for w in workers}
    order = {s.name: i for i, s in enumerate(shards)}
    for shard in sorted(shards, key=lambda s: (-s.input_bytes, order[s.name])):
        w = min(workers, key=lambda w: (load[w], w))
        load[w] += shard.input_bytes
        share[w].append(shard.name)
    return {w: sorted(names, key=order.get) for w, names in share.items()}
