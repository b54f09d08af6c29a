"""The slow tests of ds_mlm.data.formats (processes, large files, the command): the fast ones are in
tests/unit/data/test_formats.py."""

import json

import pytest
import zstandard

from unit.data.test_formats import LINES, compressed, tree, truncated_message  # noqa: F401 (fixtures among them)


@pytest.mark.slow
def test_the_build_stops_on_a_damaged_zst_and_leaves_the_cache_as_it_was(tmp_path, bpe_tokenizer_dir):
    """Each damage through the command users type: exit status 2, one error line naming the file and what is wrong,
    no traceback, the cache as it was. (In-process, an xdist worker's earlier tests left more lines on stderr: CI.)"""
    import sys

    from conftest import run

    train, evaluation = tmp_path / "train", tmp_path / "eval"
    train.mkdir()
    evaluation.mkdir()
    (evaluation / "e.txt").write_text("\n".join(LINES[:50]) + "\n")
    good = compressed(train / "a.txt.zst", ".zst", "\n".join(LINES) + "\n")
    cache = tmp_path / "cache"
    argv = ["--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir", train, "--eval_dir", evaluation, "--ext",
            "txt.zst", "jsonl.zst", "txt", "--output_dir", tmp_path / "out", "--datasets_cache_dir", cache,
            "--max_seq_length", "64", "--build_dataset_only"]
    run([sys.executable, "-m", "ds_mlm.run_mlm", *argv])
    before = tree(cache)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    jsonl = "".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in LINES).encode()
    for name, damaged in (("a.txt.zst", good[:len(good) // 2]), ("a.txt.zst", bytes(flipped)),
                          ("b.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl)[:-100])):
        (train / "a.txt.zst").write_bytes(good)
        (train / name).write_bytes(damaged)
        proc = run([sys.executable, "-m", "ds_mlm.run_mlm", *argv], check=False)
        code, err = proc.returncode, proc.stderr
        errors = [s for s in err.splitlines() if "error" in s.lower()]
        assert len(errors) == 1, err
        [line] = errors
        assert code == 2 and "Traceback" not in err
        if len(damaged) == len(good):  # the flipped one
            assert line.startswith(f"ds-mlm: error: {train / name}: corrupt zstd data near byte ")
        else:
            assert line == f"ds-mlm: error: {truncated_message(train / name)}"
        assert tree(cache) == before  # the good cache byte for byte; nothing built from the bad file
        (train / "b.jsonl.zst").unlink(missing_ok=True)


@pytest.mark.slow  # the CLI in-process: its imports take seconds on their own
def test_the_build_refuses_a_source_given_twice_through_a_symlink(tmp_path, bpe_tokenizer_dir, capsys):
    from ds_mlm.run_mlm import cli_main

    (tmp_path / "news").mkdir()
    (tmp_path / "news" / "a.txt").write_text("some news\n")
    (tmp_path / "again").symlink_to(tmp_path / "news")
    with pytest.raises(SystemExit) as exited:
        cli_main(["--tokenizer_name_or_path", str(bpe_tokenizer_dir), "--train_dir", str(tmp_path / "news"),
                  str(tmp_path / "again"), "--output_dir", str(tmp_path / "out"), "--build_dataset_only"])
    assert exited.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"ds-mlm: error: --train_dir {tmp_path / 'news'} and {tmp_path / 'again'} are the same directory "
        f"({tmp_path / 'news'}, reached through a symbolic link or ..): give each source once (use --train_weights "
        "to upweight it)"]
    assert not (tmp_path / "out").exists()  # nothing written
