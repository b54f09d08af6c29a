"""Input formats: the same text read from .txt, .jsonl, .parquet (and .gz/.zst) gives the same lines; bad records are
counted and named; UTF-16/32, control characters and odd directory entries are handled and reported."""

import gzip
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from ds_mlm.data.formats import file_format, list_input_files
from ds_mlm.data.text import LineReader
from ds_mlm.errors import UserError

# Records of several lines, CRLF and lone CR inside, blank lines, a BOM, Thai, spaces to strip.
RECORDS = ["\ufeffหัวข้อข่าว วันนี้\r\nบรรทัดที่สอง", "  English line one  \n\nline two\rline three",
           "a single line", "ภาษาไทย mixed with English\n   \n"]


def read(path, **kw):
    reader = LineReader(str(path), **kw)
    return [line for block, _ in reader for line in block], reader.stats


def write_all_formats(root, records):
    """The same records as every supported format; returns {name: path}."""
    text = "\n".join(records) + "\n"
    paths = {"txt": root / "a.txt", "txt.gz": root / "a.txt.gz", "txt.zst": root / "a.txt.zst",
             "jsonl": root / "a.jsonl", "json": root / "a.json", "jsonl.gz": root / "a.jsonl.gz",
             "jsonl.zst": root / "a.jsonl.zst", "parquet": root / "a.parquet"}
    paths["txt"].write_text(text, encoding="utf-8", newline="")
    paths["txt.gz"].write_bytes(gzip.compress(text.encode()))
    paths["txt.zst"].write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    jsonl = "".join(json.dumps({"id": i, "text": r}, ensure_ascii=i % 2 == 0) + "\n" for i, r in enumerate(records))
    for name in ("jsonl", "json"):
        paths[name].write_text(jsonl, encoding="utf-8")
    paths["jsonl.gz"].write_bytes(gzip.compress(jsonl.encode()))
    # several frames, as parallel compressors write them
    cctx = zstandard.ZstdCompressor()
    half = len(jsonl.encode()) // 2
    paths["jsonl.zst"].write_bytes(cctx.compress(jsonl.encode()[:half]) + cctx.compress(jsonl.encode()[half:]))
    pq.write_table(pa.table({"text": records, "n": list(range(len(records)))}), paths["parquet"], row_group_size=2)
    return paths


def test_every_format_gives_the_same_lines(tmp_path):
    paths = write_all_formats(tmp_path, RECORDS)
    expected, txt_stats = read(paths["txt"])
    assert expected == ["หัวข้อข่าว วันนี้", "บรรทัดที่สอง", "English line one", "line two", "line three",
                        "a single line", "ภาษาไทย mixed with English"]
    for name, path in paths.items():
        lines, stats = read(path, read_bytes=7)  # tiny reads: records and lines cross block boundaries
        assert lines == expected, name
        assert (stats.lines, stats.blank_lines, stats.boms) == (txt_stats.lines, txt_stats.blank_lines, 1), name
        assert stats.records == (0 if name.startswith("txt") else len(RECORDS)) and stats.bad_records == 0
    assert {file_format(str(p)) for p in paths.values()} == {
        ("text", None), ("text", ".gz"), ("text", ".zst"), ("jsonl", None), ("jsonl", ".gz"), ("jsonl", ".zst"),
        ("parquet", None)}


def test_progress_counts_every_byte_of_the_file(tmp_path):
    for path in write_all_formats(tmp_path, RECORDS * 50).values():
        assert sum(consumed for _, consumed in LineReader(str(path), read_bytes=64)) == path.stat().st_size, path


def test_bad_jsonl_records_are_counted_and_named(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "good one"}\n{"text": oops\n[1, 2]\n\n{"body": "x"}\n{"text": null}\n'
                     b'{"text": 7}\n{"text": "bad \xff byte"}\n{"text": "good two"}')  # no final newline
    with caplog.at_level(logging.WARNING):
        lines, stats = read(path)
    assert lines == ["good one", "bad \ufffd byte", "good two"]
    assert (stats.records, stats.bad_records, stats.replaced) == (3, 5, 1)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for where in (f"{path}:2: invalid JSON", f"{path}:3: a JSON list, not an object", f"{path}:5: no field 'text'",
                  f"{path}:6: field 'text' is null", f"{path}:7: field 'text' is int"):
        assert where in warning
    assert warning.startswith(f"{path}: 5 bad record(s) skipped, 3 read: ")


def test_a_file_without_one_usable_record_stops_with_one_line(tmp_path):
    (tmp_path / "array.json").write_text('[{"text": "a"},\n {"text": "b"}]\n')
    with pytest.raises(UserError, match=r"array.json: no usable record \(2 bad; .*array.json:1: invalid JSON\).*"
                                        r"JSON object per line"):
        read(tmp_path / "array.json")
    (tmp_path / "other.jsonl").write_text('{"content": "a"}\n')
    with pytest.raises(UserError, match="no field 'text'.*--text_field"):
        read(tmp_path / "other.jsonl")
    assert read(tmp_path / "other.jsonl", text_field="content")[0] == ["a"]
    (tmp_path / "empty.jsonl").write_text("\n\n")  # no record at all: like an empty text file, not an error
    assert read(tmp_path / "empty.jsonl")[0] == []


def test_parquet_nulls_columns_and_row_groups(tmp_path, caplog, monkeypatch):
    import ds_mlm.data.formats as formats

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b", "c", None], "score": [1, 2, 3, 4, 5]}), path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    groups = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: groups.append(i) or real(self, i, **kw))
    with caplog.at_level(logging.WARNING):
        lines, stats = read(path)
    assert lines == ["a", "b", "c"] and (stats.records, stats.bad_records) == (3, 2) and groups == [0, 1, 2]
    assert f"{path}:row 2: field 'text' is null" in caplog.text and f"{path}:row 5:" in caplog.text
    monkeypatch.setattr(formats, "PARQUET_ROWS", 1)
    assert read(path)[0] == lines
    with pytest.raises(UserError, match="no column 'body' .*text, score.*--text_field"):
        read(path, text_field="body")
    with pytest.raises(UserError, match="column 'score' holds int64, not strings"):
        read(path, text_field="score")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="fake.parquet: not a readable Parquet file"):
        read(tmp_path / "fake.parquet")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_utf16_and_utf32_files_are_decoded_by_their_byte_order_mark(tmp_path, encoding, caplog):
    text = "สวัสดี ครับ\r\nsecond line 🙂\n\n  third\n"
    (tmp_path / "u8.txt").write_text(text, encoding="utf-8", newline="")
    (tmp_path / "wide.txt").write_bytes(("\ufeff" + text).encode(encoding))
    with caplog.at_level(logging.WARNING):
        lines, stats = read(tmp_path / "wide.txt", read_bytes=3)  # reads that cut characters in half
    assert lines == read(tmp_path / "u8.txt")[0] == ["สวัสดี ครับ", "second line 🙂", "third"]
    assert stats.transcoded == 1 and stats.replaced == 0 and stats.nuls == 0
    assert f"wide.txt: decoded from {encoding[:6].upper()}" in caplog.text


def test_a_broken_utf16_sequence_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes("\ufeffok\n".encode("utf-16-le") + b"\x00\xd8" + "\nend\n".encode("utf-16-le"))
    lines, stats = read(tmp_path / "bad.txt")
    assert lines == ["ok", "\ufffd", "end"] and stats.replaced == 1


def test_nul_and_control_characters_are_counted(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"nul\x00here\tand tab\nbell\x07 esc\x1b del\x7f\n\x00\x00\n")
    lines, stats = read(tmp_path / "c.txt")
    assert lines == ["nul\x00here\tand tab", "bell\x07 esc\x1b del\x7f", "\x00\x00"]  # kept, as the ancestor did
    assert (stats.controls, stats.nuls) == (6, 3)


def test_pieces_of_a_file_give_the_lines_of_the_whole(tmp_path):
    data = "".join(f"line {i} {'x' * (i % 13)}\r\n" if i % 3 else f"ไทย {i}\n" for i in range(500)).encode()
    (tmp_path / "f.txt").write_bytes(data)
    whole = read(tmp_path / "f.txt")[0]
    bounds = [0]
    for target in (1000, 2500, 6000):
        bounds.append(data.index(b"\n", target) + 1)
    bounds.append(len(data))
    pieces = [line for a, b in zip(bounds[:-1], bounds[1:])
              for line in read(tmp_path / "f.txt", byte_range=(a, b), read_bytes=100)[0]]
    assert pieces == whole


def test_listing_several_extensions_and_odd_entries(tmp_path, caplog):
    for name in ("b.txt", "a.jsonl.gz", "c.parquet", "notes.md"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.txt").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "broken.txt")
    os.symlink(tmp_path / "b.txt", tmp_path / "link.txt")
    os.mkfifo(tmp_path / "pipe.txt")
    with caplog.at_level(logging.WARNING):
        files = list_input_files(str(tmp_path), ["txt", ".jsonl.gz", "parquet", "txt"])
    assert files == [str(tmp_path / n) for n in ("a.jsonl.gz", "b.txt", "c.parquet", "link.txt")]
    warnings = sorted(r.getMessage() for r in caplog.records)
    assert warnings == [f"{tmp_path / 'broken.txt'}: a broken symbolic link, named like an input (*.txt): skipped",
                        f"{tmp_path / 'dir.txt'}: a directory, named like an input (*.txt): skipped",
                        f"{tmp_path / 'pipe.txt'}: a FIFO (named pipe), named like an input (*.txt): skipped"]
    with pytest.raises(UserError, match=r"holds no \*.rst \*.tsv file"):
        list_input_files(str(tmp_path), ["rst", "tsv"], "--train_dir")
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(UserError, match="compressed Parquet"):
        list_input_files(str(tmp_path), "parquet.gz")


# -- compressed files are read to their end marker, or not at all ------------------------------------------------

LINES = [f"บรรทัดที่ {i}: the quick brown fox jumps over the lazy dog {i * 7919 % 1000}" for i in range(6000)]
COMPRESS = {".gz": gzip.compress, ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
            ".bz2": __import__("bz2").compress, ".xz": __import__("lzma").compress}
NAMES = {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2", ".xz": "xz"}


def compressed(path, suffix, text):
    data = COMPRESS[suffix](text.encode())
    path.write_bytes(data)
    return data


def truncated_message(path):
    return (f"{path}: truncated: its {NAMES[path.suffix]} data end at byte {path.stat().st_size:,} before the "
            "end-of-stream marker (the file was cut short): nothing was built from it; re-download or re-compress it")


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".bz2", ".xz"])
def test_a_compressed_file_cut_in_half_is_truncated_and_a_flipped_one_corrupt(tmp_path, suffix):
    text = "\n".join(LINES) + "\n"
    whole = compressed(tmp_path / f"whole.txt{suffix}", suffix, text)
    assert read(tmp_path / f"whole.txt{suffix}")[0] == LINES
    half = tmp_path / f"half.txt{suffix}"
    half.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UserError) as cut:
        read(half)
    assert str(cut.value) == truncated_message(half)
    flipped = bytearray(whole)
    for i in range(len(whole) // 2, len(whole) // 2 + 16):
        flipped[i] ^= 0xFF
    bad = tmp_path / f"flipped.txt{suffix}"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(UserError) as corrupt:
        read(bad)
    assert str(corrupt.value).startswith(f"{bad}: corrupt {NAMES[suffix]} data near byte ")
    assert str(corrupt.value).endswith(f" of {len(whole):,} ({str(corrupt.value).split(' (', 1)[1].split(')')[0]}): "
                                       "nothing was built from it; re-download or re-compress it")
    noise = tmp_path / f"noise.txt{suffix}"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match=f"noise.txt{suffix}: corrupt {NAMES[suffix]} data near byte"):
        read(noise)


def test_a_truncated_jsonl_zst_says_truncated_not_invalid_json(tmp_path, caplog):
    jsonl = "".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in LINES)
    cctx = zstandard.ZstdCompressor()
    data = cctx.compress(jsonl[:len(jsonl) // 2].encode()) + cctx.compress(jsonl[len(jsonl) // 2:].encode())
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(data[:len(data) * 3 // 4])  # the second frame cut: the first one is whole
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as error:
        read(cut)
    assert str(error.value) == truncated_message(cut) and "invalid JSON" not in caplog.text
    tiny = tmp_path / "tiny.jsonl.zst"
    tiny.write_bytes(data[:40])  # nothing decodes: truncated, not "no text"
    with pytest.raises(UserError) as error:
        read(tiny)
    assert str(error.value) == truncated_message(tiny)


def test_a_utf8_bom_before_a_jsonl_record_is_removed_and_counted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first record"}\n{"text": "second"}\n')
    lines, stats = read(path)
    assert lines == ["first record", "second"] and (stats.records, stats.bad_records, stats.boms) == (2, 0, 1)


def test_dictionary_encoded_and_large_string_parquet_columns_are_text(tmp_path):
    texts = ["หนึ่ง", "two", "หนึ่ง", None, "three"]
    for name, column in (("dict", pa.array(texts).dictionary_encode()), ("large", pa.array(texts, pa.large_string()))):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"text": column}), path, use_dictionary=True)
        lines, stats = read(path)
        assert lines == ["หนึ่ง", "two", "หนึ่ง", "three"] and (stats.records, stats.bad_records) == (4, 1), name
    assert pa.types.is_dictionary(pq.ParquetFile(tmp_path / "dict.parquet").schema_arrow.field("text").type)


def test_a_source_reached_twice_by_another_path_is_refused(tmp_path):
    from ds_mlm.data.formats import distinct_sources

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x\n")
    (tmp_path / "b" / "y.txt").write_text("y\n")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    ok = [(str(tmp_path / "a"), [str(tmp_path / "a" / "x.txt")]),
          (str(tmp_path / "b"), [str(tmp_path / "b" / "y.txt")])]
    assert distinct_sources(ok, "--train_dir") == ok
    for other in (tmp_path / "link", tmp_path / "b" / ".." / "a"):
        twice = [ok[0], (str(other), list_input_files(str(other), "txt"))]
        with pytest.raises(UserError) as error:
            distinct_sources(twice, "--train_dir")
        assert str(error.value) == (f"--train_dir {tmp_path / 'a'} and {other} are the same directory "
                                    f"({tmp_path / 'a'}, reached through a symbolic link or ..): give each source "
                                    "once (use --train_weights to upweight it)")
    (tmp_path / "b" / "z.txt").symlink_to(tmp_path / "a" / "x.txt")  # one file in two sources
    files = [(str(tmp_path / "a"), list_input_files(str(tmp_path / "a"), "txt")),
             (str(tmp_path / "b"), list_input_files(str(tmp_path / "b"), "txt"))]
    with pytest.raises(UserError, match=f"{tmp_path / 'b' / 'z.txt'} are the same file"):
        distinct_sources(files, "--train_dir")


def tree(root) -> dict:
    """relative path -> bytes of every file under root: what 'the cache untouched' means."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}
