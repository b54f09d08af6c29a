"""Losing a node on the test cluster (tests/cluster.py), bounded: launch.sh from the head on three real hosts over
ssh/pdsh, then one host killed (kill -9) or cut off (its link down: no reset ever reaches its peers).

- kill -9 of one host's processes mid-run: every process on every host is gone within 60 s, the launch exits
  non-zero, and its last error line names the lost host's rank; the same command without that host resumes from the
  newest complete checkpoint on fewer ranks.
- a link cut after the first checkpoint, MAX_RESTARTS=1: the survivors give up within --distributed_timeout_minutes
  (set low here) with one line naming the peer that stopped answering, pdsh's ssh to the cut host ends
  (SSH_ALIVE_SECONDS), launch.sh leaves out the host that does not answer and the job resumes by itself.
"""

import re
import time
from pathlib import Path

import pytest

from conftest import REPO, read_log

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TIMEOUT_MINUTES = "0.5"  # the survivors' bound on a silent peer: low here, 10 by default


def job(cluster, root: Path, corpus, tokenizer, config, hosts, **variables) -> tuple[str, Path]:
    """launch.sh's command line (run in the head) and its log file."""
    values = {"HOSTFILE": cluster.hostfile(hosts), "PROJECT_TRAIN_DIR": corpus, "PROJECT_TOKENIZER": tokenizer,
              "PROJECT_OUTPUT_DIR": root / "out", "PROJECT_CACHE_DIR": root / "cache", "PROJECT_MAX_SEQ_LENGTH": 64,
              "PROJECT_BATCH_SIZE": 2, "PROJECT_MAX_STEPS": 40, "PROJECT_LOGGING_STEPS": 1,
              "PROJECT_SAVE_STEPS": 3, "PROJECT_LEARNING_RATE": "2e-3", "DS_CONFIG": "zero1.json", **variables}
    command = " ".join(f"{k}={v}" for k, v in values.items())
    return (f"{command} bash {REPO}/launch.sh --config_name {config} --bf16 false "
            f"--distributed_timeout_minutes {TIMEOUT_MINUTES}"), root / "launch.log"


def wait_for(what: str, ready, bound: float):
    deadline = time.monotonic() + bound
    while not ready():
        assert time.monotonic() < deadline, f"no {what} within {bound} s"
        time.sleep(0.2)


def first_checkpoint(out: Path) -> bool:
    return any((c / "COMPLETE").exists() for c in out.glob("checkpoint-*"))


def start(cluster, command: str, log: Path):
    with open(log, "w") as f:
        return cluster.popen(cluster.head, command, cwd=log.parent, stdout=f, stderr=f)


def errors(text: str) -> list:
    return [line for line in text.splitlines() if "ds-mlm: error:" in line]


def test_a_killed_host_ends_the_job_within_60_s_and_the_job_resumes_without_it(cluster, tmp_path, small_corpus,
                                                                                bpe_tokenizer_dir, no_dropout_config):
    command, log = job(cluster, tmp_path, small_corpus[0], bpe_tokenizer_dir, no_dropout_config, cluster.hosts)
    launch = start(cluster, command, log)
    try:
        wait_for("first checkpoint", lambda: first_checkpoint(tmp_path / "out"), 400)
        cluster.kill(cluster.hosts[1])  # rank 1's host: its processes die, its sshd lives
        killed = time.monotonic()
        wait_for("end of every process on every host", lambda: launch.poll() is not None and not any(
            cluster.pids(h) for h in [cluster.head, *cluster.hosts]), 60)
        print(f"kill -9 to the last process gone: {time.monotonic() - killed:.1f} s")
    finally:
        if launch.poll() is None:
            launch.kill()
    text = log.read_text()
    assert launch.returncode != 0, text[-3000:]
    lines = errors(text)
    # Every survivor names the killed host's rank, also one that learns of the loss only when rank 0 (the store's
    # host) leaves: rank 0 publishes who was lost and keeps the store up until the others have read it (peers.py)
    named = [line for line in lines if f"lost contact with rank 1 on {cluster.hosts[1]}" in line]
    assert named and named == lines, text[-3000:]
    assert re.fullmatch(rf"launch\.sh: the job ended with status {launch.returncode}: rank [02] lost contact with "
                        rf"rank 1 on {cluster.hosts[1]}", text.strip().splitlines()[-1]), text[-2000:]
    assert "Traceback" not in text
    logged = [r["step"] for r in read_log(tmp_path / "out") if "loss" in r]

    # the same command without that host: the newest complete checkpoint, on two ranks
    newest = max(int(c.name.split("-")[1]) for c in (tmp_path / "out").glob("checkpoint-*")
                 if (c / "COMPLETE").exists())
    survivors = [cluster.hosts[0], cluster.hosts[2]]
    command, log = job(cluster, tmp_path, small_corpus[0], bpe_tokenizer_dir, no_dropout_config, survivors,
                       PROJECT_MAX_STEPS=newest + 2)
    proc = cluster.run(cluster.head, command, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {tmp_path / 'out' / f'checkpoint-{newest}'} at step {newest}" in proc.stdout
    assert "resumed on 2 processes a checkpoint of 3" in proc.stdout
    assert len(logged) >= newest and (tmp_path / "out" / "roberta_thai").is_dir()


def test_a_cut_host_is_named_within_the_bound_and_the_job_restarts_without_it(cluster, tmp_path, small_corpus,
                                                                              bpe_tokenizer_dir, no_dropout_config):
    out, cut = tmp_path / "out", cluster.hosts[2]
    command, log = job(cluster, tmp_path, small_corpus[0], bpe_tokenizer_dir, no_dropout_config, cluster.hosts,
                       MAX_RESTARTS=1, SSH_ALIVE_SECONDS=3, SSH_CHECK_SECONDS=3, PROJECT_MAX_STEPS=24)
    launch = start(cluster, command, log)
    try:
        wait_for("first checkpoint", lambda: first_checkpoint(out), 400)
        cluster.cut(cut)
        lost = time.monotonic()
        wait_for("restart", lambda: "restart 1 of 1 on" in log.read_text(), 300)
        print(f"link cut to the restart: {time.monotonic() - lost:.1f} s")
        wait_for("resumed training", lambda: "resumed from" in log.read_text(), 300)
        print(f"link cut to resumed training: {time.monotonic() - lost:.1f} s")
        status = launch.wait(timeout=400)
    finally:
        if launch.poll() is None:
            launch.kill()
        cluster.restore(cut)
        cluster.kill(cut)  # its rank, cut off, never learned that the job ended
    text = log.read_text()
    assert status == 0, text[-4000:]
    before, after = text.split("restart 1 of 1 on", 1)
    survivors = [line for line in errors(before) if re.match(r"n[12]: \[rank [01]\] ", line)]  # pdsh's prefix
    assert survivors and all(f"lost contact with rank 2 on {cut}" in line for line in survivors), before[-4000:]
    assert f"launch.sh: {cut} does not answer over ssh (within 3 s): leaving it out" in before
    assert after.startswith(f" {cluster.hosts[0]} {cluster.hosts[1]}, from the newest complete checkpoint")
    assert (out / "launch" / "hostfile").read_text() == "".join(f"{h} slots=1\n" for h in cluster.hosts[:2])
    assert cut in (out / "launch" / "hostfile.before-restart-1").read_text()
    resumed = re.search(r"resumed from .*checkpoint-(\d+) at step", after)
    assert resumed and "resumed on 2 processes a checkpoint of 3" in after
    assert [r["step"] for r in read_log(out) if "loss" in r][-1] == 24 and (out / "roberta_thai").is_dir()
    assert "Traceback" not in text
