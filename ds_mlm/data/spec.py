"""Fingerprints of what token data are built from (an input file, a tokenizer), and how a tokenizer is asked for ids.

An input file's fingerprint: absolute path, size, mtime_ns, and a sha256 of its whole content. A tokenizer's:
class, vocabulary, special and added tokens, the Rust backend's full definition when it has one, and the ids it
gives for a probe text mixing Thai, English, spaces and line breaks. dataset_plan.py combines them with the build
options into each shard's fingerprint; a shard whose recorded fingerprint differs is rebuilt.

The tokenizer protocol: `len(tokenizer)`, `get_vocab()`, `bos_token_id`, `eos_token_id`, and one way to encode a
batch of lines without special tokens, tried in this order: `batch_encode_ids(lines)` (ds-mlm's own tokenizers),
the Rust backend of a fast HF tokenizer (`backend_tokenizer.encode_batch_fast`), `tokenizer(lines)["input_ids"]`.
"""

import hashlib
import json
import logging
import os
from typing import List

from ds_mlm.data.formats import list_input_files
from ds_mlm.errors import UserError

log = logging.getLogger(__name__)

# An input file's content hash is a sha256 of ALL its bytes: a hash of windows of a large file (as before) missed an
# in-place edit between them, once the file's times were put back. It is computed only when the file's stat
# signals (size, mtime, ctime, inode, device) differ from those recorded with the hash (dataset_plan.py), so an
# unchanged corpus costs a stat per file. sha256 read ~1.4 GB/s on a quiet core here (bench/fingerprint.py measures it).
HASH_READ_BYTES = 1 << 20
PROBE_LINES = ["สวัสดีครับ ประเทศไทย  2567", "Hello, world!  Tabs\tand  spaces.",
               "ภาษาไทย mixed with English\nnext line", "  leading and trailing  ",
               "ข่าวรัฐบาล: นายกรัฐมนตรี 12.5% (ทดสอบ) — “quotes” ‘and’ emoji 🙂"]


def list_text_files(directory: str, ext, flag: str = "the directory") -> List[str]:
    """Sorted paths of every input file of `directory` with extension(s) `ext`: formats.list_input_files."""
    return list_input_files(directory, ext, flag)


def encode_lines(tokenizer, lines: List[str]) -> List[List[int]]:
    """The ids of each line, without special tokens, by the fastest way the tokenizer offers (module docstring)."""
    if hasattr(tokenizer, "batch_encode_ids"):
        return tokenizer.batch_encode_ids(lines)
    if getattr(tokenizer, "is_fast", False):
        backend = tokenizer.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast skips char offsets
        return [e.ids for e in encode(lines, add_special_tokens=False)]
    return tokenizer(lines, add_special_tokens=False)["input_ids"]


def separator_id(tokenizer) -> int:
    """The id between two sentences of a block: the vocabulary's '▁' (the ancestor's line-break piece), else its
    '\\n' token, else </s> (byte-level BPE has neither; the ancestor crashed there)."""
    vocab = tokenizer.get_vocab()
    for token in ("▁", "\n"):
        if token in vocab:
            return vocab[token]
    log.info("the vocabulary has neither '▁' nor '\\n': sentences packed in one block are separated by %s",
             getattr(tokenizer, "eos_token", None) or "the end-of-sentence token")
    return tokenizer.eos_token_id


def special_ids(tokenizer):
    """(bos, eos) ids; UserError when the tokenizer lacks them."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if bos is None or eos is None:
        raise UserError("the tokenizer has no <s> or </s> token, which every sample starts and ends with: use a "
                        "RoBERTa-style tokenizer (e.g. one written by ds-mlm-train-tokenizer)")
    return int(bos), int(eos)


def file_fingerprint(path: str) -> dict:
    """Path, size, mtime_ns and the sha256 of every byte; an unreadable file is a UserError."""
    try:
        st = os.stat(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(HASH_READ_BYTES), b""):
                digest.update(block)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}): check the file and its permissions") from None
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": digest.hexdigest()}


def tokenizer_fingerprint(tokenizer) -> str:
    """A sha256 of everything about the tokenizer that changes ids (see the module docstring)."""
    kind = type(tokenizer)
    parts = {
        "class": f"{kind.__module__}.{kind.__qualname__}",
        "len": len(tokenizer),
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": getattr(tokenizer, "special_tokens_map", None),
        "added": sorted((int(i), repr(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()),
        "backend": tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else None,
        "probe": [list(map(int, ids)) for ids in encode_lines(tokenizer, PROBE_LINES)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
