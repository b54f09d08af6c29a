"""Preemption: a signal ends a run with a complete checkpoint of the step it reached and exit status 75, every rank
agreeing; a rerun of the same command continues exactly; a second signal exits at once and never damages the newest
complete checkpoint.
"""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import DIST_ENV, REPO, launcher_cmd, numbers, read_log, run
from ds_mlm.signals import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
RUN_MLM = REPO / "ds_mlm" / "run_mlm.py"
STEPS = 40


def args(out, cache, corpus, tokenizer, *extra):
    return ["--tokenizer_name_or_path", tokenizer, "--train_dir", corpus[0], "--output_dir", out,
            "--datasets_cache_dir", cache, "--architecture", "roberta-tiny", "--max_seq_length", "64",
            "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--logging_steps", "1",
            "--save_steps", "1000", "--learning_rate", "2e-3", "--deepspeed_config", "zero0.json", *extra]


def start(cmd):
    import os

    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_step(out, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = out / "train_log.jsonl"
        if log.exists() and any(r.get("step", 0) >= step for r in read_log(out)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus, bpe_tokenizer_dir):
    root = tmp_path_factory.mktemp("preemption")
    run([sys.executable, RUN_MLM, *args(root / "straight", root / "cache", small_corpus, bpe_tokenizer_dir)])
    return root, numbers(root / "straight")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_mid_run_saves_the_step_reached_and_the_rerun_is_exact(reference, small_corpus, bpe_tokenizer_dir,
                                                                        signum):
    root, expected = reference
    out = root / f"signalled_{signum.name}"
    argv = [sys.executable, RUN_MLM, *args(out, root / "cache", small_corpus, bpe_tokenizer_dir)]
    proc = start(argv)
    wait_for_step(out, 3, proc)
    proc.send_signal(signum)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert time.monotonic() - sent < 30  # well inside the grace period of DeepSpeed's launcher and Slurm
    reached = max(r["step"] for r in read_log(out))
    assert 3 <= reached < STEPS
    assert (out / "latest_checkpoint").read_text() == f"checkpoint-{reached}\n"
    assert (out / f"checkpoint-{reached}" / "COMPLETE").is_file() and not (out / "roberta_thai").exists()
    assert f"ds-mlm: {signum.name}: finishing this step, saving a checkpoint" in err
    rerun = run(argv)
    assert f"resumed from {out / f'checkpoint-{reached}'} at step {reached}" in rerun.stdout
    assert numbers(out) == expected  # every loss, lr and grad norm of the uninterrupted run, bit for bit


def test_one_rank_signalled_stops_every_rank_at_the_same_step(reference, small_corpus, bpe_tokenizer_dir):
    root, _ = reference
    out = root / "two_ranks"
    argv = launcher_cmd(RUN_MLM, *args(out, root / "cache", small_corpus, bpe_tokenizer_dir), num_procs=2)
    proc = start(argv)
    wait_for_step(out, 3, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
    assert len(ranks) == 1
    ranks[0].send_signal(signal.SIGUSR1)  # rank 1 only: rank 0 learns it at the next step boundary
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "ds-mlm: SIGUSR1: finishing this step" in err
    reached = max(r["step"] for r in read_log(out))
    checkpoint = out / f"checkpoint-{reached}"
    assert (out / "latest_checkpoint").read_text() == f"checkpoint-{reached}\n" and (checkpoint / "COMPLETE").is_file()
    assert {p.name for p in checkpoint.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == reached


SIGNAL_DURING_SAVE = """
import os, runpy, signal, sys, time
sys.path.insert(0, {repo!r})
import torch
real_save, sent = torch.save, []
def save(obj, f, *args, **kwargs):
    if not sent and "checkpoint-{step}" in str(f):
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal arrives while the checkpoint is being written
        if {twice}:
            time.sleep(2.5)
            os.kill(os.getpid(), signal.SIGTERM)  # and a second one, later: out at once, mid-save
            time.sleep(30)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("twice", [False, True])
def test_a_signal_during_a_save(reference, tmp_path, small_corpus, bpe_tokenizer_dir, twice):
    root, expected = reference
    out = tmp_path / "out"
    wrapper = tmp_path / "signal_during_save.py"
    wrapper.write_text(SIGNAL_DURING_SAVE.format(repo=str(REPO), step=6, twice=twice, script=str(RUN_MLM)))
    argv = args(out, root / "cache", small_corpus, bpe_tokenizer_dir, "--save_steps", "3")
    proc = run([sys.executable, wrapper, *argv], check=False)
    if not twice:  # the save finishes, the run stops after it, with that checkpoint
        assert proc.returncode == EXIT_PREEMPTED
        assert (out / "latest_checkpoint").read_text() == "checkpoint-6\n"
        assert (out / "checkpoint-6" / "COMPLETE").is_file()
    else:  # the save is cut short: the previous complete checkpoint is untouched and named by the pointer
        assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM again: exiting now" in proc.stderr
        assert (out / "latest_checkpoint").read_text() == "checkpoint-3\n"
        assert (out / "checkpoint-3" / "COMPLETE").is_file() and not (out / "checkpoint-6" / "COMPLETE").exists()
    run([sys.executable, RUN_MLM, *argv])
    assert numbers(out) == expected
