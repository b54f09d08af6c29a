"""Input fingerprints (data/dataset_plan.py, data/spec.py): a file whose bytes changed is never taken as unchanged. An edit
in place that keeps the size, with the file's times put back (os.utime, as `touch -r` does), changes the ctime: the
whole file is hashed again, and its shard gets a new fingerprint; while every stat signal agrees nothing is read."""

import os

from ds_mlm.data import dataset_plan as plan_module
from ds_mlm.data.dataset_plan import BuildOptions, plan_dataset
from ds_mlm.tokenization import load_tokenizer

MiB = 1 << 20
TEXT = ("ข่าวรัฐบาลวันนี้ นายกรัฐมนตรีกล่าวว่า the economy grew by three percent this quarter.\n" * 200).encode()


def write_big(path, pad_lines=70):
    """~70 MiB: 1 MiB lines of spaces (blank once stripped: nothing to tokenize) around real text that starts at
    2.5 MiB, between the 1 MiB windows at 0 and ~4.6 MiB that the old 16-window hash read."""
    pad = b" " * (MiB - 1) + b"\n"
    with open(path, "wb") as f:
        f.write(pad * 2 + b" " * (MiB // 2 - 1) + b"\n" + TEXT + pad * (pad_lines - 2))
    return 2 * MiB + MiB // 2


def edit_in_place(path, at):
    """Overwrite a few bytes at `at` with others of the same length; put atime and mtime back."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(40)
        f.seek(at)
        f.write(b"X" * len(old))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_an_edit_inside_a_70_mib_file_with_its_times_put_back_changes_its_fingerprint(tmp_path, bpe_tokenizer_dir,
                                                                                       monkeypatch):
    path = tmp_path / "big.txt"
    at = write_big(path)
    assert os.path.getsize(path) > 64 * MiB
    tokenizer = load_tokenizer(str(bpe_tokenizer_dir), "auto")
    options = BuildOptions(block_size=64)
    first = plan_dataset([("src", [str(path)])], tokenizer, options)
    known = {s.identity["path"]: s.identity for s in first.shards}  # what the manifest records

    hashed = []
    real = plan_module.file_fingerprint
    monkeypatch.setattr(plan_module, "file_fingerprint", lambda p: hashed.append(p) or real(p))
    again = plan_dataset([("src", [str(path)])], tokenizer, options, known)
    assert again.fingerprint == first.fingerprint and hashed == []  # every signal agrees: a stat, no read

    edit_in_place(path, at + 100)
    edited = plan_dataset([("src", [str(path)])], tokenizer, options, known)
    assert hashed == [str(path)]  # the ctime moved: the whole file was hashed again
    assert edited.shards[0].fingerprint != first.shards[0].fingerprint
    assert edited.shards[0].name != first.shards[0].name and edited.fingerprint != first.fingerprint


def test_an_identity_recorded_before_whole_file_hashes_is_hashed_again(tmp_path, bpe_tokenizer_dir, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_bytes(TEXT)
    tokenizer = load_tokenizer(str(bpe_tokenizer_dir), "auto")
    first = plan_dataset([("src", [str(path)])], tokenizer, BuildOptions(block_size=64))
    old = {k: v for k, v in first.shards[0].identity.items() if k != "hashed"}  # an older manifest's record
    hashed = []
    real = plan_module.file_fingerprint
    monkeypatch.setattr(plan_module, "file_fingerprint", lambda p: hashed.append(p) or real(p))
    again = plan_dataset([("src", [str(path)])], tokenizer, BuildOptions(block_size=64), {old["path"]: old})
    assert hashed == [str(path)] and again.fingerprint == first.fingerprint  # same bytes, same (whole) hash
