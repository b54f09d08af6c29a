"""Reading dirty text: BOMs, line ends, invalid UTF-8, blank lines and huge lines, each handled and counted."""

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from ds_mlm.data.text import LineReader


def read(path, **kw):
    reader = LineReader(str(path), **kw)
    lines = [line for block, _ in reader for line in block]
    return lines, reader.stats


def test_bom_line_ends_blank_lines_and_invalid_utf8_are_handled_and_counted(tmp_path):
    path = tmp_path / "dirty.txt"
    path.write_bytes(b"\xef\xbb\xbfhead line\r\nbody\r\rthird\n   \t \n\xef\xbb\xbf second article \n"
                     b"bad \xff byte and \xe0\xb8 cut Thai\n\xef\xbf\xbd is a real U+FFFD\nno newline at the end")
    lines, stats = read(path)
    assert lines == ["head line", "body", "third", "second article", "bad \ufffd byte and \ufffd cut Thai",
                     "\ufffd is a real U+FFFD", "no newline at the end"]
    assert (stats.boms, stats.blank_lines, stats.replaced, stats.long_lines) == (2, 2, 2, 0)
    assert stats.lines == len(lines) and stats.bytes == path.stat().st_size and stats.files == 1


@settings(max_examples=150, deadline=None)
@given(data=st.lists(st.sampled_from([b"a", b"\xe0\xb8\x81", b" ", b"\r", b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xff",
                                      b"word "]), max_size=80),
       read_bytes=st.integers(1, 7), max_line_bytes=st.integers(4, 12))
def test_block_boundaries_never_change_the_lines(tmp_path_factory, data, read_bytes, max_line_bytes):
    path = tmp_path_factory.mktemp("blocks") / "f.txt"
    path.write_bytes(b"".join(data))
    small = read(path, read_bytes=read_bytes, max_line_bytes=max_line_bytes)
    large = read(path, read_bytes=1 << 16, max_line_bytes=max_line_bytes)
    assert small == large
    # the limit is in bytes of the file: each U+FFFD (3 bytes in UTF-8) stands for 1 invalid byte of it
    assert all(len(line.encode()) - 2 * line.count("\ufffd") <= max_line_bytes for line in small[0])


def test_a_20_mb_line_is_cut_at_spaces_in_bounded_memory(tmp_path):
    words = [f"word{i % 9973}" for i in range(2_300_000)]
    path = tmp_path / "one_line.txt"
    path.write_text("short line\n" + " ".join(words), encoding="utf-8")  # ~20 MB, no final newline
    assert path.stat().st_size > 20_000_000
    tracemalloc.start()
    try:
        lines, stats = read(path, max_line_bytes=1 << 20)  # pieces are counted, not kept here: stream them
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert lines[0] == "short line" and stats.long_lines == 1
    assert all(len(line.encode()) <= 1 << 20 for line in lines)
    assert " ".join(lines[1:]).split(" ") == words  # cut only at spaces: nothing lost, no word broken
    # The lines themselves (20 MB) are in `lines`; what reading needs beyond them stays a few MB.
    assert peak - sum(len(line) + 49 for line in lines) < 12 << 20, peak


def test_streaming_a_long_line_holds_only_a_few_blocks(tmp_path):
    path = tmp_path / "thai.txt"
    path.write_bytes("ก".encode() * 7_000_000)  # 21 MB of Thai without any space or newline
    tracemalloc.start()
    try:
        reader, total, pieces = LineReader(str(path), max_line_bytes=100_000), 0, 0
        for lines, _ in reader:
            for line in lines:
                assert line.count("ก") == len(line)  # cut at character boundaries: no replacement character
                total += len(line)
                pieces += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 7_000_000 and pieces >= 210 and reader.stats.long_lines == 1 and reader.stats.replaced == 0
    assert peak < 16 << 20, peak  # a copy of the line would be 21 MB (as bytes) or more
