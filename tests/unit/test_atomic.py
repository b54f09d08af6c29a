"""Atomic publishing: a finished directory replaces the old one whole; a failed or killed writer leaves nothing."""

import os
import signal
import subprocess
import sys

import pytest

from ds_mlm import atomic

KILLED_WRITER = "import os, signal, sys; sys.path.insert(0, {repo!r}); from ds_mlm import atomic\n" \
                "with atomic.staging_dir({final!r}) as tmp:\n" \
                "    open(os.path.join(tmp, 'half'), 'w').write('x')\n" \
                "    os.kill(os.getpid(), signal.SIGKILL)\n"


def test_staging_dir_replaces_the_old_version_whole(tmp_path):
    final = tmp_path / "model"
    for version in ("one", "two"):
        with atomic.staging_dir(str(final)) as tmp:
            (open(os.path.join(tmp, "weights"), "w")).write(version)
            assert not (final / "weights").exists() or (final / "weights").read_text() != version
        assert (final / "weights").read_text() == version
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_an_error_inside_leaves_the_old_version(tmp_path):
    final = tmp_path / "model"
    with atomic.staging_dir(str(final)) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("good")
    with pytest.raises(RuntimeError):
        with atomic.staging_dir(str(final)) as tmp:
            open(os.path.join(tmp, "weights"), "w").write("bad")
            raise RuntimeError("disk full")
    assert (final / "weights").read_text() == "good"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_killed_writer_is_cleaned_up_by_the_next_one(tmp_path):
    final = tmp_path / "model"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(atomic.__file__)))
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(repo=repo, final=str(final))])
    assert proc.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith("model.tmp-")
    assert atomic.remove_dead_leftovers(str(final)) == left
    assert os.listdir(tmp_path) == []


def test_write_text_replaces_atomically(tmp_path):
    path = tmp_path / "pointer"
    atomic.write_text(str(path), "checkpoint-1\n")
    atomic.write_text(str(path), "checkpoint-2\n")
    assert path.read_text() == "checkpoint-2\n" and os.listdir(tmp_path) == ["pointer"]
