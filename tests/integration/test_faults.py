"""Faults injected for real: training SIGKILLed while it saves a checkpoint, a disk that fills up, read-only
directories. Nothing half-written is ever taken for complete, and the run goes on from the newest complete checkpoint
with the same numbers as a run that was never interrupted.

Runs are worlds of one (`python -m ds_mlm.run_mlm`, ZeRO-0 fp32, tiny model); the multi-rank crash and resume is in
tests/integration/test_trainer.py. The disk tests mount small tmpfs file systems (the suite runs as root on CI); where mounting
is not permitted they are skipped, saying so.
"""

import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from conftest import REPO, numbers, run

pytestmark = pytest.mark.slow  # real runs: a launcher, a trained model, or several processes

KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from ds_mlm import checkpointer
from ds_mlm.checkpoint_files import MARKER

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
    real_write = checkpointer.atomic.write_text
    def write(path, text):
        if target in path and path.endswith(MARKER):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(path, text)
    checkpointer.atomic.write_text = write
from ds_mlm.run_mlm import cli_main
cli_main(sys.argv[1:])
"""


def train_args(tok, train, evaluation, out, cache, steps=6):
    return ["--tokenizer_name_or_path", tok, "--train_dir", train, "--eval_dir", evaluation, "--output_dir", out,
            "--datasets_cache_dir", cache, "--architecture", "roberta-tiny", "--max_seq_length", "64",
            "--per_device_train_batch_size", "4", "--max_steps", str(steps), "--save_steps", "2", "--logging_steps",
            "1", "--save_total_limit", "1", "--learning_rate", "2e-3", "--deepspeed_config", "zero0.json"]


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


FILL_BEFORE_EXPORT = """
import os, shutil, sys
sys.path.insert(0, {repo!r})
from ds_mlm import export
real = export.save_model_dir
def fill_then_save(model, tensors, tokenizer, output_dir, intact="nothing was changed", **kw):
    free = shutil.disk_usage(output_dir).free
    with open(os.path.join(output_dir, "someone-elses-file"), "wb") as f:  # the disk fills while the run trains
        f.truncate(0)
        f.write(b"x" * max(free - (1 << 20), 0))
    return real(model, tensors, tokenizer, output_dir, intact, **kw)
export.save_model_dir = fill_then_save
from ds_mlm.run_mlm import cli_main
cli_main(sys.argv[1:])
"""


def test_a_full_disk_at_the_final_export_is_one_line_and_the_checkpoint_exports_later(
        tmpfs, tmp_path, straight, small_corpus, bpe_tokenizer_dir):
    disk = tmpfs("256m")
    out = disk / "out"
    wrapper = tmp_path / "fill_before_export.py"
    wrapper.write_text(FILL_BEFORE_EXPORT.format(repo=str(REPO)))
    args = train_args(bpe_tokenizer_dir, *small_corpus, out, straight / "cache")
    line = one_line_error(run([sys.executable, wrapper, *args], check=False))
    assert "the exported model" in line and f"{out / 'checkpoint-6'} is intact: free some space, then export it " \
                                           f"with python -m ds_mlm.export --checkpoint {out / 'checkpoint-6'}" in line
    assert (out / "checkpoint-6" / "COMPLETE").is_file() and not (out / "roberta_thai").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no half-written export left
    (out / "someone-elses-file").unlink()
    run([sys.executable, "-m", "ds_mlm.export", "--checkpoint", out / "checkpoint-6", "--output_dir", out])
    assert (out / "roberta_thai" / "model.safetensors").is_file()


def test_master_port_in_use_is_one_line(tmp_path, small_corpus, bpe_tokenizer_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = train_args(bpe_tokenizer_dir, *small_corpus, tmp_path / "out", tmp_path / "cache")
        line = one_line_error(run([sys.executable, "-m", "ds_mlm.run_mlm", *args], env=env, check=False))
    assert line.startswith(f"ds-mlm: error: MASTER_PORT {port} on 127.0.0.1 is already in use") and "give another" in line
    assert not (tmp_path / "out").exists()


def test_a_second_job_in_the_same_output_dir_is_refused_and_a_dead_ones_lock_is_taken_over(
        tmp_path, straight, small_corpus, bpe_tokenizer_dir):
    import time

    out = tmp_path / "out"
    args = [*train_args(bpe_tokenizer_dir, *small_corpus, out, straight / "cache", steps=400), "--save_steps", "1000"]
    first = subprocess.Popen([sys.executable, "-m", "ds_mlm.run_mlm", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "train_log.jsonl").exists():  # training: it holds the lock
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        line = one_line_error(run([sys.executable, "-m", "ds_mlm.run_mlm", *args], check=False))
        assert f"--output_dir {out} is in use by another training run on" in line and f"pid {first.pid}" in line
        assert first.poll() is None  # the first job was not disturbed
    finally:
        first.kill()  # kill -9: no cleanup, its lock file stays behind
        first.wait()
    assert (out / ".ds-mlm.lock").exists()
    proc = run([sys.executable, "-m", "ds_mlm.run_mlm", *with_steps(args, 6)])
    assert f"took over the lock of {out} from a dead training run" in proc.stdout
    assert not (out / ".ds-mlm.lock").exists()  # released at the end


def with_steps(args, steps):
    args = list(args)
    args[args.index("--max_steps") + 1] = str(steps)
    return args
