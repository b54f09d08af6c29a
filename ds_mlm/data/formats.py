"""Input files: which ones a directory holds, and their text as a stream of UTF-8 byte blocks, whatever the format.

    format (by file name)          read as
    *.txt, any other name          lines of text
    *.jsonl, *.json                one JSON object per line (orjson); its `--text_field` is the text
    *.parquet                      one row group at a time (pyarrow); the `--text_field` column is the text
    + .gz/.zst/.bz2/.xz            the line formats compressed: decompressed as a stream (gzip, zstandard, bz2, lzma)

A record's text goes on as lines, exactly like a text file's (text.py splits and cleans both the same way): the
texts of a file's records are joined by line breaks, so the same text gives byte-identical tokens in every format.
A text file that starts with a UTF-16 or UTF-32 byte-order mark is decoded from it (counted); other files are
UTF-8; a UTF-8 byte-order mark before a JSONL record is removed (counted), as text.py does for a line. A compressed
file is read to its end marker: one cut short, or damaged, is a UserError naming it, "truncated" or "corrupt" and
the byte, raised before its last (partial) block is handed on, so nothing is built from it. Records that cannot be
used (invalid JSON, not an object, the field missing, null or not a string) are skipped, counted and named
(file:line, file:row); a file with records but not one usable is a UserError.
Memory stays bounded by the read size (and the largest record), never the file.
"""

import bz2
import codecs
import glob
import gzip
import logging
import lzma
import os
import stat
import zlib
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

from ds_mlm.errors import UserError

log = logging.getLogger(__name__)
TEXT, JSONL, PARQUET = "text", "jsonl", "parquet"
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2", ".xz": "xz"}  # suffix -> name in messages
ZSTD_FEED = 8 << 10  # compressed bytes fed to zstd at once: a zstd block expands 32768x at most, so <= 256 MiB
UTF8_BOM = b"\xef\xbb\xbf"
PARQUET_ROWS = 8192  # rows of a row group turned into Python strings at once
SHOWN_BAD = 5  # bad records named per file (all are counted)
UNICODE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),  # longest first: FF FE 00 00
                 (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))                    # starts like UTF-16-LE's BOM


def file_format(path: str) -> Tuple[str, Optional[str]]:
    """(kind, compression) of a file, from its name: kind TEXT, JSONL or PARQUET; compression a COMPRESSIONS key or
    None."""
    name = os.path.basename(path).lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    base = name[:-len(compression)] if compression else name
    kind = JSONL if base.endswith((".jsonl", ".json")) else PARQUET if base.endswith(".parquet") else TEXT
    if kind == PARQUET and compression:
        raise UserError(f"{path}: a compressed Parquet file; Parquet compresses its pages itself: decompress it")
    return kind, compression


def list_input_files(directory: str, exts, flag: str = "the directory") -> List[str]:
    """Sorted paths of every *.{ext} file in `directory` for each of `exts` (one or several, with or without the
    dot); a UserError naming `flag` (e.g. --train_dir) when there is none. Entries named like an input that are not
    readable files (a broken symbolic link, a directory, a FIFO...) are skipped with a warning naming them."""
    exts = list(dict.fromkeys(e.lstrip(".") for e in ([exts] if isinstance(exts, str) else exts)))
    pattern = " ".join(f"*.{e}" for e in exts)
    where = f"{flag} {directory}"
    if not os.path.exists(directory):
        raise UserError(f"{where}: no such directory; give the directory of your {pattern} files")
    if not os.path.isdir(directory):
        raise UserError(f"{where} is a file, not a directory: give the directory that holds your {pattern} files")
    files = set()
    for ext in exts:
        for path in glob.glob(os.path.join(glob.escape(directory), f"*.{ext}")):
            if os.path.isfile(path):  # follows symbolic links: a link to a file is that file
                files.add(path)
            else:
                log.warning("%s: %s, named like an input (*.%s): skipped", path, _what_is(path), ext)
    if not files:
        raise UserError(f"{where} holds no {pattern} file: add text files there, or set --ext to their extension")
    for path in files:
        file_format(path)  # a name no reader accepts fails now, before anything is built
    return sorted(files)


def distinct_sources(sources: Sequence[Tuple[str, List[str]]], flag: str):
    """`sources` ((directory, its files) pairs) unchanged; a UserError when two of them are one directory, or two
    files one file, reached by other paths (a symbolic link, `..`): mixed in, it would be counted twice."""
    seen = {}
    for directory, files in sources:
        for path in [directory, *files]:
            real = os.path.realpath(path)
            if seen.setdefault(real, path) != path:
                what = "directory" if path == directory else "file"
                raise UserError(f"{flag} {seen[real]} and {path} are the same {what} ({real}, reached through a "
                                "symbolic link or ..): give each source once (use --train_weights to upweight it)")
    return sources


def _what_is(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link"
    except OSError as e:
        return f"an unreadable entry ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    return "a socket or a device"


class _ZstdStream:
    """A zstd file as a binary stream that knows where its frames end: `zstandard`'s stream reader ends silently at
    the end of its input, inside a frame or not, so a file cut short would read as a shorter text. Frames are
    decompressed one after another (a file may hold several, as `cat a.zst b.zst` makes); input that ends inside one
    raises EOFError."""

    def __init__(self, raw):
        import zstandard

        self.raw, self.new = raw, zstandard.ZstdDecompressor().decompressobj
        self.frame, self.fed = self.new(), 0  # fed: bytes of the current frame so far
        self.out, self.have = [], 0  # decompressed pieces not handed on yet (a list: no copy per piece)

    def read(self, n: int) -> bytes:
        while self.have < n:
            data = self.raw.read(ZSTD_FEED)
            if not data:
                if self.fed and not self.frame.eof:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                break
            while data:
                if self.frame.eof:  # the previous frame ended: what follows starts a new one
                    self.frame, self.fed = self.new(), 0
                self.fed += len(data)
                piece = self.frame.decompress(data)
                if piece:
                    self.out.append(piece)
                    self.have += len(piece)
                data = self.frame.unused_data if self.frame.eof else b""
        joined = b"".join(self.out)
        rest = joined[n:]
        self.out, self.have = [rest] if rest else [], len(rest)
        return joined[:n]


@contextmanager
def _raw_stream(path: str, compression: Optional[str]):
    """(decompressed binary stream, the underlying file, for progress) of a file."""
    with open(path, "rb") as f:
        if compression == ".gz":
            with gzip.GzipFile(fileobj=f) as z:
                yield z, f
        elif compression == ".bz2":
            with bz2.BZ2File(f) as z:
                yield z, f
        elif compression == ".xz":
            with lzma.LZMAFile(f) as z:
                yield z, f
        elif compression == ".zst":
            yield _ZstdStream(f), f
        else:
            yield f, f


def _decompress_errors():
    """What the decompressors raise for damaged data (zlib.error, LZMAError and ZstdError are not OSErrors)."""
    try:
        from zstandard import ZstdError
    except ImportError:  # no zstandard: no .zst file is read (text_blocks says which package to install)
        ZstdError = zlib.error
    return EOFError, OSError, zlib.error, lzma.LZMAError, ZstdError


def _damaged(path: str, compression: str, raw, e: Exception) -> UserError:
    """The one-line error of a compressed stream that cannot be read to its end marker."""
    name, size = COMPRESSIONS[compression], os.fstat(raw.fileno()).st_size
    if isinstance(e, EOFError):
        return UserError(f"{path}: truncated: its {name} data end at byte {size:,} before the end-of-stream marker "
                         "(the file was cut short): nothing was built from it; re-download or re-compress it")
    detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    return UserError(f"{path}: corrupt {name} data near byte {raw.tell():,} of {size:,} ({detail}): nothing was "
                     "built from it; re-download or re-compress it")


class _Counted:
    """A codec error handler that replaces an undecodable sequence with U+FFFD and counts it."""

    count = 0

    @classmethod
    def handler(cls, error):
        cls.count += 1
        return "\ufffd", error.end


codecs.register_error("ds_mlm.count_and_replace", _Counted.handler)


def _blocks(path: str, stats, read_bytes: int, byte_range=None) -> Iterator[Tuple[bytes, int]]:
    """(UTF-8 bytes, file bytes consumed) of a line-format file, decompressed, decoded from UTF-16/32 if need be."""
    _, compression = file_format(path)
    damaged = _decompress_errors() if compression else ()
    with _raw_stream(path, compression) as (stream, raw):
        def read(n: int) -> bytes:
            try:
                return stream.read(n)
            except damaged as e:
                if isinstance(e, OSError) and e.errno is not None:  # an I/O error, not the data
                    raise
                raise _damaged(path, compression, raw, e) from None

        if byte_range is not None:  # a piece of a large plain file: starts and ends right after a b"\n"
            raw.seek(byte_range[0])
        left = None if byte_range is None else byte_range[1] - byte_range[0]
        at, decoder = raw.tell(), None
        while True:
            block = raw_block = read(read_bytes if left is None else min(read_bytes, left))
            if left is not None:
                left -= len(block)
            if decoder is None and (byte_range is None or byte_range[0] == 0):  # a UTF-16/32 byte-order mark?
                while len(block) < 4 and (more := read(4 - len(block))):
                    block += more
                encoding = next((enc for bom, enc in UNICODE_BOMS if block.startswith(bom)), None)
                decoder = codecs.getincrementaldecoder(encoding)("ds_mlm.count_and_replace") if encoding else False
                if decoder:
                    stats.transcoded += 1
                    log.warning("%s: decoded from %s (its byte-order mark says so)", path, encoding.upper())
            if decoder:
                before = _Counted.count
                block = decoder.decode(block, final=not block).encode("utf-8")
                stats.replaced += _Counted.count - before
            now = raw.tell()
            yield block, now - at
            at = now
            if not raw_block or left == 0:
                return


def text_blocks(path: str, stats, read_bytes: int, text_field: str = "text",
                byte_range=None) -> Iterator[Tuple[bytes, int]]:
    """The text of any input file as (UTF-8 bytes, file bytes consumed) blocks; `stats` counts records."""
    kind, _ = file_format(path)
    try:
        if kind == TEXT:
            yield from _blocks(path, stats, read_bytes, byte_range)
        elif kind == JSONL:
            yield from _jsonl_blocks(path, stats, read_bytes, text_field)
        else:
            yield from _parquet_blocks(path, stats, text_field)
    except (OSError, EOFError) as e:  # unreadable, removed, or a damaged compressed stream
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise UserError(f"{path}: cannot read it ({reason}): check the file and its permissions") from None
    except ImportError as e:
        raise UserError(f"{path}: reading it needs the {e.name} package: pip install {e.name}") from None


class _BadRecords:
    """Counts the records of one file that cannot be used, and names the first few."""

    def __init__(self, path: str, stats):
        self.path, self.stats, self.shown = path, stats, []

    def add(self, where: str, why: str) -> None:
        self.stats.bad_records += 1
        if len(self.shown) < SHOWN_BAD:
            self.shown.append(f"{self.path}:{where}: {why}")

    def report(self, records: int, field: str) -> None:
        bad = self.stats.bad_records
        if bad and not records:
            raise UserError(f"{self.path}: no usable record ({bad:,} bad; {self.shown[0]}): each record must be a "
                            f"JSON object per line (or Parquet row) with a string field {field!r}; fix the file or "
                            "set --text_field")
        if bad:
            log.warning("%s: %d bad record(s) skipped, %d read: %s%s", self.path, bad, records,
                        "; ".join(self.shown), " ..." if bad > len(self.shown) else "")


def _record_text(line: bytes, field: str, stats):
    """(text, None) of one JSON line, or (None, why it cannot be used)."""
    import orjson

    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        fixed = line.decode("utf-8", errors="replace")  # invalid UTF-8 is repaired (and counted), as in a text file
        repaired = fixed.count("\ufffd") - line.count("\ufffd".encode())
        try:
            obj = orjson.loads(fixed) if repaired else None
        except orjson.JSONDecodeError:
            obj = None
        if obj is None:
            return None, "invalid JSON"
        stats.replaced += repaired
    if not isinstance(obj, dict):
        return None, f"a JSON {type(obj).__name__}, not an object"
    if field not in obj:
        return None, f"no field {field!r}"
    text = obj[field]
    if not isinstance(text, str):
        return None, f"field {field!r} is {'null' if text is None else type(text).__name__}, not a string"
    return text, None


def _joined(texts: Sequence[str]) -> bytes:
    # surrogatepass: a lone surrogate escape (\ud800) becomes invalid UTF-8, which the splitter replaces and counts
    return ("\n".join(texts) + "\n").encode("utf-8", "surrogatepass") if texts else b""


def _jsonl_blocks(path: str, stats, read_bytes: int, field: str):
    bad, records, number, pending = _BadRecords(path, stats), 0, 0, b""
    for block, consumed in _blocks(path, stats, read_bytes):
        lines = (pending + block).split(b"\n")
        pending = lines.pop() if block else b""
        texts = []
        for line in lines:
            number += 1
            if line.startswith(UTF8_BOM):  # removed and counted, as text.py does for a text file's lines
                stats.boms += 1
                line = line[len(UTF8_BOM):]
            if not line.strip():
                continue
            text, why = _record_text(line, field, stats)
            if why:
                bad.add(str(number), why)
            else:
                texts.append(text)
        records += len(texts)
        yield _joined(texts), consumed
    stats.records += records
    bad.report(records, field)


def _parquet_blocks(path: str, stats, field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise UserError(f"{path}: no column {field!r} (it has {', '.join(schema.names[:8])}): set --text_field")
    kind = schema.field(field).type
    strings = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", lambda t: False))
    # a dictionary-encoded column (pandas categoricals, some writers) holds strings too: to_pylist gives str
    if not any(is_(kind.value_type if pa.types.is_dictionary(kind) else kind) for is_ in strings):
        raise UserError(f"{path}: column {field!r} holds {kind}, not strings: set --text_field to the text column")
    bad, records, row = _BadRecords(path, stats), 0, 0
    size, rows = os.path.getsize(path), max(pf.metadata.num_rows, 1)
    for group in range(pf.num_row_groups):
        column = pf.read_row_group(group, columns=[field]).column(0)  # one row group in memory at a time
        for start in range(0, len(column), PARQUET_ROWS):
            texts, first = [], row
            for value in column.slice(start, PARQUET_ROWS).to_pylist():
                row += 1
                if value is None:
                    bad.add(f"row {row}", f"field {field!r} is null")
                else:
                    texts.append(value)
            records += len(texts)
            yield _joined(texts), size * row // rows - size * first // rows  # progress: the file's share read
    stats.records += records
    bad.report(records, field)
