"""Reading text files as clean lines, in bounded memory, counting every repair made to dirty text.

A line is what the ancestor read (Python's text mode, then `strip()`), with each kind of dirt handled on purpose:

- line ends: `\\n`, `\\r\\n` and a lone `\\r` all end a line (universal newlines, as text mode);
- blank and whitespace-only lines are dropped (counted);
- a byte-order mark (U+FEFF) at the start of ANY line is removed (counted): concatenated files and corpora like
  thaigov carry one per article, and it is not text;
- invalid UTF-8 is replaced with U+FFFD (one per invalid sequence, counted; the caller warns naming the file),
  rather than failing the whole build on one bad byte or silently dropping the line;
- a line longer than `max_line_bytes` is cut into pieces of at most that many bytes, at the last space or tab of
  the second half of the window when there is one, else at a UTF-8 character boundary (counted once per line).
  Files are read in binary blocks, so a 100 MB line without a newline costs a few MB, not 100 MB.
"""

from dataclasses import dataclass, fields
from typing import Iterator, List, Tuple

READ_BYTES = 1 << 20  # one binary read; memory is a small multiple of READ_BYTES + max_line_bytes
MAX_LINE_BYTES = 1 << 20  # a longer line is cut: a 1 MiB line is far beyond any sentence, still cheap to tokenize
_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode()
_BOM = "\ufeff"


@dataclass
class ReadStats:
    """What reading found; `+=` adds another file's counts."""

    files: int = 0
    """Files read."""
    bytes: int = 0
    """Bytes read."""
    lines: int = 0
    """Lines kept (non-blank, after cutting long lines: each piece counts)."""
    blank_lines: int = 0
    """Empty or whitespace-only lines dropped."""
    boms: int = 0
    """Byte-order marks removed from line starts."""
    replaced: int = 0
    """Invalid UTF-8 sequences replaced with U+FFFD."""
    long_lines: int = 0
    """Lines longer than max_line_bytes that were cut into pieces."""

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


class LineReader:
    """Iterate over the clean lines of one file, a list per binary block read; `stats` counts as it goes."""

    def __init__(self, path: str, max_line_bytes: int = MAX_LINE_BYTES, read_bytes: int = READ_BYTES):
        if max_line_bytes < 4:
            raise ValueError("max_line_bytes must hold at least one UTF-8 character (4 bytes)")
        self.path, self.max_line_bytes, self.read_bytes = path, max_line_bytes, read_bytes
        self.stats = ReadStats(files=1)

    def __iter__(self) -> Iterator[Tuple[List[str], int]]:
        """Yields (lines, bytes consumed by this block)."""
        pending, cutting = b"", False  # the unfinished last line, and whether it has already been cut
        with open(self.path, "rb") as f:
            while True:
                block = f.read(self.read_bytes)
                self.stats.bytes += len(block)
                data = pending + block
                if block and data.endswith(b"\r"):  # may be the first half of \r\n: decide with the next block
                    data, held = data[:-1], b"\r"
                else:
                    held = b""
                data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                raw = data.split(b"\n")
                pending = raw.pop()
                pieces = []
                for i, line in enumerate(raw):
                    pieces.extend(self._cut_long(line, cutting if i == 0 else False, final=True)[0])
                    cutting = False
                if pending:
                    head, pending, was_cut = self._cut_long(pending, cutting, final=not block)
                    pieces.extend(head)
                    cutting = cutting or was_cut
                pending += held
                yield self._clean(pieces), len(block)
                if not block:
                    return

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
