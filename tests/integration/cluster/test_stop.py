"""A job over pdsh stops whole, with a checkpoint, when the deepspeed runner on the head host is signalled or killed:
launch.sh on the head, one rank on each of two other hosts (real sshd, real pdsh; tests/cluster.py). The remote ranks
are children of a remote sshd, outside the head's process tree: on SIGTERM the runner's pdsh mode signals their
launchers (pkill); on SIGKILL the supervisor ends pdsh and its ssh clients, the remote ssh sessions close, and each
rank sees its launcher chain end (ds_mlm.signals). Either way: a complete checkpoint of the step reached (both
ranks' files), nothing of the job left on any host within 60 s, and the same command goes on to the losses of a run
never stopped.
"""

import shlex
import signal
import time

import psutil
import pytest

from conftest import REPO, numbers, read_log

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
STEPS = 400  # the signal comes after a few logged steps: on a quiet machine 40 steps ended first (a CI-like run)


def launch(cluster, tmp, out, cache, corpus, tokenizer):
    """launch.sh on the head with HOSTFILE = n1, n2 (one rank each): the shell command."""
    hostfile = cluster.hostfile(cluster.hosts[:2], slots=1)
    env = {"HOSTFILE": hostfile, "PROJECT_TRAIN_DIR": corpus[0], "PROJECT_TOKENIZER": tokenizer,
           "PROJECT_OUTPUT_DIR": out, "PROJECT_CACHE_DIR": cache, "PROJECT_ARCHITECTURE": "roberta-tiny",
           "PROJECT_MAX_SEQ_LENGTH": "64", "PROJECT_BATCH_SIZE": "4", "PROJECT_MAX_STEPS": str(STEPS),
           "PROJECT_LOGGING_STEPS": "1", "PROJECT_SAVE_STEPS": "1000", "PROJECT_LEARNING_RATE": "2e-3",
           "DS_CONFIG": "zero0.json", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO,
           "MASTER_PORT": "29500", "STOP_GRACE_SECONDS": "30"}
    exports = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
    return f"{exports} bash {REPO / 'launch.sh'} > {tmp}/launch.log 2>&1"


def job_left(cluster) -> dict:
    return {h: [" ".join(psutil.Process(p).cmdline()[:4]) for p in cluster.pids(h) if psutil.pid_exists(p)]
            for h in cluster.all_hosts}


def wait_gone(cluster, head_proc, since: float, within=60.0) -> float:
    while head_proc.poll() is None or any(job_left(cluster).values()):
        assert time.monotonic() - since < within, f"left after {within:.0f} s: {job_left(cluster)}"
        time.sleep(0.3)
    return time.monotonic() - since


def wait_for_step(out, proc, log, step=1, timeout=300):
    deadline = time.monotonic() + timeout
    while not ((out / "train_log.jsonl").exists() and any(r.get("step", 0) >= step for r in read_log(out))):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:] if log.exists() else ""
        time.sleep(0.3)


def runner_on_head(cluster) -> psutil.Process:
    for pid in cluster.pids(cluster.head):
        try:
            argv = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        if argv[1:3] == ["-m", "deepspeed.launcher.runner"]:  # not the supervisor, whose command line names it too
            return psutil.Process(pid)
    raise AssertionError(f"no deepspeed runner on the head: {job_left(cluster)}")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, small_corpus, bpe_tokenizer_dir):
    root = tmp_path_factory.mktemp("cluster_stop")
    cmd = launch(cluster, root, root / "out", root / "cache", small_corpus, bpe_tokenizer_dir)
    res = cluster.run(cluster.head, cmd, timeout=900, cwd=REPO)
    assert res.returncode == 0, (root / "launch.log").read_text()[-4000:]
    return root / "cache", numbers(root / "out")


def stop_runner(cluster, cmd, out, log, sig, after_step: int) -> int:
    """Start the job, send `sig` to the runner on the head once a step past `after_step` is logged; check the stop;
    the step saved."""
    proc = cluster.popen(cluster.head, cmd, cwd=REPO)
    wait_for_step(out, proc, log, step=after_step + 1)
    assert all(job_left(cluster)[h] for h in cluster.hosts[:2]), job_left(cluster)  # a rank on each of n1, n2
    runner_on_head(cluster).send_signal(sig)
    took = wait_gone(cluster, proc, time.monotonic())  # nothing of the job on any host within 60 s
    text = log.read_text()
    assert proc.returncode not in (0, None) and took < 60, text[-4000:]
    reached = max(r["step"] for r in read_log(out))
    assert reached < STEPS and (out / "latest_checkpoint").read_text() == f"checkpoint-{reached}\n", text[-4000:]
    saved = out / f"checkpoint-{reached}"
    assert (saved / "COMPLETE").is_file()
    assert {p.name for p in saved.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    return reached


def test_the_runner_on_the_head_signalled_or_killed_stops_the_ranks_on_the_other_hosts_with_a_checkpoint(
        cluster, uninterrupted, tmp_path, small_corpus, bpe_tokenizer_dir):
    cache, expected = uninterrupted
    out, log = tmp_path / "out", tmp_path / "launch.log"
    cmd = launch(cluster, tmp_path, out, cache, small_corpus, bpe_tokenizer_dir)
    first = stop_runner(cluster, cmd, out, log, signal.SIGTERM, 0)  # its pdsh mode: pkill of the remote launchers
    second = stop_runner(cluster, cmd, out, log, signal.SIGKILL, first)  # the remote ssh sessions close
    assert f"resumed from {out / f'checkpoint-{first}'} at step {first}" in log.read_text()
    res = cluster.run(cluster.head, cmd, timeout=900, cwd=REPO)  # the same command goes on from there
    assert res.returncode == 0, log.read_text()[-4000:]
    assert f"resumed from {out / f'checkpoint-{second}'} at step {second}" in log.read_text()
    assert numbers(out) == expected  # the losses of a run never stopped
