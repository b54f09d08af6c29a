"""Clean lines out of a stream of UTF-8 bytes, in bounded memory, counting every repair made to dirty text.

A line is what the ancestor read (Python's text mode, then `strip()`), with each kind of dirt handled on purpose:

- line ends: `\\n`, `\\r\\n` and a lone `\\r` all end a line (universal newlines, as text mode);
- blank and whitespace-only lines are dropped (counted);
- a byte-order mark (U+FEFF) at the start of ANY line is removed (counted): concatenated files and corpora like
  thaigov carry one per article, and it is not text;
- invalid UTF-8 is replaced with U+FFFD (one per invalid sequence, counted; the caller warns naming the file),
  rather than failing the whole build on one bad byte or silently dropping the line;
- NUL and the other control characters (C0 except tab and line ends, and DEL) are kept, as the ancestor kept them,
  but counted: the build warns naming the file (many NULs usually mean UTF-16 without a byte-order mark);
- a line longer than `max_line_bytes` is cut into pieces of at most that many bytes, at the last space or tab of
  the second half of the window when there is one, else at a UTF-8 character boundary (counted once per line).

`LineSplitter` does this for any stream of byte blocks: a text file's blocks, or the texts of JSONL and Parquet
records joined by line breaks (formats.py), so the same text gives the same lines whatever its format.
`LineReader(path)` is the splitter over one input file of any supported format.
"""

from dataclasses import dataclass, fields
from typing import Iterator, List, Tuple

READ_BYTES = 1 << 20  # one binary read; memory is a small multiple of READ_BYTES + max_line_bytes
MAX_LINE_BYTES = 1 << 20  # a longer line is cut: a 1 MiB line is far beyond any sentence, still cheap to tokenize
_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode()
_BOM = "\ufeff"
# In UTF-8 these bytes only ever stand for themselves (never inside a multi-byte character): counting bytes is exact.
_CONTROL_BYTES = bytes([*range(0, 9), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


@dataclass
class ReadStats:
    """What reading found; `+=` adds another file's counts."""

    files: int = 0
    """Files read."""
    bytes: int = 0
    """Bytes of text read (after decompression and decoding to UTF-8; JSONL/Parquet: the records' texts)."""
    lines: int = 0
    """Lines kept (non-blank, after cutting long lines: each piece counts)."""
    blank_lines: int = 0
    """Empty or whitespace-only lines dropped."""
    boms: int = 0
    """Byte-order marks removed from line starts."""
    replaced: int = 0
    """Invalid UTF-8 (or UTF-16/32) sequences replaced with U+FFFD."""
    long_lines: int = 0
    """Lines longer than max_line_bytes that were cut into pieces."""
    controls: int = 0
    """Control characters in the text (NUL and C0 except tab and line ends, DEL), kept as they are."""
    nuls: int = 0
    """Of the control characters, NULs."""
    transcoded: int = 0
    """Files decoded from UTF-16 or UTF-32 (told by their byte-order mark)."""
    records: int = 0
    """JSONL/Parquet records whose text was read."""
    bad_records: int = 0
    """JSONL/Parquet records skipped: invalid JSON, not an object, the text field missing, null or not a string."""

    def __iadd__(self, other: "ReadStats") -> "ReadStats":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


def _cut(data: bytes, limit: int) -> Tuple[bytes, bytes]:
    """(head, rest) with len(head) <= limit: at the last space/tab of head's second half, else a character start."""
    window = data[:limit + 1]
    at = max(window.rfind(b" ", limit // 2), window.rfind(b"\t", limit // 2))
    if at > 0:
        return data[:at], data[at + 1:]
    at = limit
    while at > 0 and (data[at] & 0xC0) == 0x80:  # a UTF-8 continuation byte: not a character start
        at -= 1
    return data[:at or limit], data[at or limit:]


class LineSplitter:
    """Feed UTF-8 byte blocks in order (`feed`), then `finish()`; each returns the clean lines completed so far.
    Block boundaries never change the lines."""

    def __init__(self, stats: ReadStats, max_line_bytes: int = MAX_LINE_BYTES):
        if max_line_bytes < 4:
            raise ValueError("max_line_bytes must hold at least one UTF-8 character (4 bytes)")
        self.stats, self.max_line_bytes = stats, max_line_bytes
        self._pending, self._cutting = b"", False  # the unfinished last line, and whether it has already been cut

    def feed(self, block: bytes, final: bool = False) -> List[str]:
        self.stats.bytes += len(block)
        if block:
            self.stats.controls += len(block) - len(block.translate(None, _CONTROL_BYTES))
            self.stats.nuls += block.count(b"\0")
        data = self._pending + block
        if not final and data.endswith(b"\r"):  # may be the first half of \r\n: decide with the next block
            data, held = data[:-1], b"\r"
        else:
            held = b""
        raw = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        pending = raw.pop()
        pieces = []
        for i, line in enumerate(raw):
            pieces.extend(self._cut_long(line, self._cutting if i == 0 else False, final=True)[0])
            self._cutting = False
        if pending:
            head, pending, was_cut = self._cut_long(pending, self._cutting, final=final)
            pieces.extend(head)
            self._cutting = self._cutting or was_cut
        self._pending = pending + held
        return self._clean(pieces)

    def finish(self) -> List[str]:
        return self.feed(b"", final=True)

    def _cut_long(self, line: bytes, already_cut: bool, final: bool):
        """(pieces, rest, cut?) of a line: pieces of at most max_line_bytes; rest is unfinished unless final."""
        pieces, cut = [], False
        while len(line) > self.max_line_bytes:
            head, line = _cut(line, self.max_line_bytes)
            pieces.append(head)
            cut = True
        if cut and not already_cut:
            self.stats.long_lines += 1
        if final:
            return pieces + [line], b"", cut
        return pieces, line, cut

    def _clean(self, raw_lines: List[bytes]) -> List[str]:
        stats, lines = self.stats, []
        for raw in raw_lines:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                stats.replaced += line.count(_REPLACEMENT) - raw.count(_REPLACEMENT_UTF8)
            line = line.strip()
            if line.startswith(_BOM):
                stats.boms += 1
                line = line.lstrip(_BOM).strip()
            if line:
                lines.append(line)
            else:
                stats.blank_lines += 1
        stats.lines += len(lines)
        return lines


class LineReader:
    """Iterate over the clean lines of one input file (any format of formats.py), a list per block read, with the
    bytes of the file each block consumed; `stats` counts as it goes."""

    def __init__(self, path: str, max_line_bytes: int = MAX_LINE_BYTES, read_bytes: int = READ_BYTES,
                 text_field: str = "text", byte_range=None):
        self.path, self.read_bytes, self.text_field, self.byte_range = path, read_bytes, text_field, byte_range
        self.stats = ReadStats(files=1)
        self._splitter = LineSplitter(self.stats, max_line_bytes)

    def __iter__(self) -> Iterator[Tuple[List[str], int]]:
        from ds_mlm.data.formats import text_blocks  # formats.py reads files; this module only splits bytes

        for block, consumed in text_blocks(self.path, self.stats, self.read_bytes, self.text_field, self.byte_range):
            yield self._splitter.feed(block), consumed
        yield self._splitter.finish(), 0
