"""Faults injected for real: training SIGKILLed while it saves a checkpoint, a disk that fills up, read-only
directories. Nothing half-written is ever taken for complete, and the run goes on from the newest complete checkpoint
with the same numbers as a run that was never interrupted.

Runs are worlds of one (`python -m ds_mlm.run_mlm`, ZeRO-0 fp32, tiny model); the multi-rank crash and resume is in
tests/test_trainer.py. The disk tests mount small tmpfs file systems (the suite runs as root on CI); where mounting
is not permitted they are skipped, saying so.
"""

import json
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from conftest import REPO, TIMING, run

KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from ds_mlm import checkpoint

target = os.sep + "checkpoint-{step}" + os.sep
where = {where!r}
if where == "inside DeepSpeed's save":  # part of a state file written, then SIGKILL
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and target in str(f):
            with open(f, "wb") as half:
                half.write(b"PK" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
else:  # every file written, SIGKILL just before the COMPLETE marker
    real_write = checkpoint.atomic_write_text
    def write(path, text):
        if target in path and path.endswith(checkpoint.MARKER):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, text)
    checkpoint.atomic_write_text = write
from ds_mlm.run_mlm import cli_main
cli_main(sys.argv[1:])
"""


def train_args(tok, train, evaluation, out, cache, steps=6):
    return ["--tokenizer_name_or_path", tok, "--train_dir", train, "--eval_dir", evaluation, "--output_dir", out,
            "--datasets_cache_dir", cache, "--architecture", "roberta-tiny", "--max_seq_length", "64",
            "--per_device_train_batch_size", "4", "--max_steps", str(steps), "--save_steps", "2", "--logging_steps",
            "1", "--save_total_limit", "1", "--learning_rate", "2e-3", "--deepspeed_config", "zero0.json"]


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def numbers(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_log(out)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_corpus, bpe_tokenizer_dir):
    """An uninterrupted run: the numbers every interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    run([sys.executable, "-m", "ds_mlm.run_mlm",
         *train_args(bpe_tokenizer_dir, *small_corpus, root / "out", root / "cache")])
    return root


@pytest.mark.parametrize("where", ["inside DeepSpeed's save", "before the COMPLETE marker"])
def test_sigkill_during_a_checkpoint_save(where, tmp_path, straight, small_corpus, bpe_tokenizer_dir):
    out = tmp_path / "out"
    args = train_args(bpe_tokenizer_dir, *small_corpus, out, straight / "cache")
    wrapper = tmp_path / "kill_during_save.py"
    wrapper.write_text(KILL_DURING_SAVE.format(repo=str(REPO), step=4, where=where))
    proc = run([sys.executable, wrapper, *args], check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "latest_checkpoint").read_text() == "checkpoint-2\n"
    assert (out / "checkpoint-2" / "COMPLETE").is_file()  # rotation (limit 1) never got to delete it
    assert not (out / "checkpoint-4" / "COMPLETE").exists()

    proc = run([sys.executable, "-m", "ds_mlm.run_mlm", *args])  # the same command again
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stdout
    assert numbers(out) == numbers(straight / "out")  # equal, not close: the interrupted steps were redone exactly
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (out / "roberta_thai" / "config.json").is_file()


# -- disks ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh directory on its own tmpfs; unmounted afterwards."""
    mounted = []

    def mount(size: str, read_only: bool = False):
        point = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): disk-full tests need root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ds-mlm: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_output_dir_too_small_fails_before_training(tmpfs, tmp_path, small_corpus, bpe_tokenizer_dir):
    disk = tmpfs("1m")
    args = train_args(bpe_tokenizer_dir, *small_corpus, disk / "out", tmp_path / "cache")
    line = one_line_error(run([sys.executable, "-m", "ds_mlm.run_mlm", *args], check=False))
    assert f"--output_dir {disk / 'out'} has" in line and "one checkpoint and the final model needs about" in line
    assert not (tmp_path / "cache").exists()  # it stopped before building anything


@pytest.mark.parametrize("flag", ["--output_dir", "--datasets_cache_dir"])
def test_read_only_directories_fail_before_training(flag, tmpfs, tmp_path, small_corpus, bpe_tokenizer_dir):
    disk = tmpfs("64m", read_only=True)
    out, cache = (disk, tmp_path / "cache") if flag == "--output_dir" else (tmp_path / "out", disk)
    args = train_args(bpe_tokenizer_dir, *small_corpus, out, cache)
    line = one_line_error(run([sys.executable, "-m", "ds_mlm.run_mlm", *args], check=False))
    assert f"{flag} {disk}" in line and "Read-only file system" in line


def test_disk_full_at_a_later_checkpoint_keeps_the_last_good_one(tmpfs, straight, small_corpus, bpe_tokenizer_dir):
    size = sum(f.stat().st_size for f in (straight / "out" / "checkpoint-6").rglob("*") if f.is_file())
    disk = tmpfs(f"{int(size * 1.6) // 1024}k")  # room for the first checkpoint (and the estimate), not a second
    out = disk / "out"
    args = train_args(bpe_tokenizer_dir, *small_corpus, out, straight / "cache")
    line = one_line_error(run([sys.executable, "-m", "ds_mlm.run_mlm", *args], check=False))
    assert "could not save checkpoint-4" in line and "the last complete checkpoint, checkpoint-2, is intact" in line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "COMPLETE").is_file()

    subprocess.run(["mount", "-o", f"remount,size={size * 4 // 1024}k", str(disk)], check=True)  # space freed
    proc = run([sys.executable, "-m", "ds_mlm.run_mlm", *args])
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stdout
    assert numbers(out) == numbers(straight / "out")
    shutil.rmtree(out)
