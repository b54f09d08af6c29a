"""Stopping a job stops all of it, in every mode of launch.sh that runs here: the deepspeed runner on one machine,
two --no_ssh "nodes", torchrun, the demo. Each job (roberta-tiny, 64 ids per sample, 100,000 steps) is signalled once
it trains; then nothing of it may be left: no process whose command line names the test's directory (launch.sh,
the supervisor, the runner, deepspeed.launcher.launch, torchrun, the ranks), none of the pids seen before the signal;
the exit status is non-zero, train_log.jsonl stops growing, /dev/shm keeps no DeepSpeed buffer of the job's port.
"""

import os
import re
import signal
import time

import psutil
import pytest

from conftest import free_port
from ds_mlm.signals import EXIT_PREEMPTED
from test_distributed_launchers import no_shm_leak, start
from test_launch import LAUNCH, job_env, no_launch_variables  # noqa: F401 (an autouse fixture)
from test_supervise import job_processes, no_leftovers  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]
GRACE = 30  # STOP_GRACE_SECONDS: the default
TRAINING = dict(PROJECT_MAX_STEPS="100000", PROJECT_SAVE_STEPS="100000")  # still training when signalled
# What a training rank says when signalled: it finishes its step, saves, exits with EXIT_PREEMPTED (ds_mlm.signals)
RANK_STOPPED = {sig: f"ds-mlm: {sig.name}: finishing this step, saving a checkpoint, then exiting with status "
                     f"{EXIT_PREEMPTED}" for sig in (signal.SIGTERM, signal.SIGINT)}


def ranks_status(text: str) -> int:
    """The status deepspeed.launcher.launch saw its (first failing) rank exit with, from its log line."""
    found = re.findall(r"exits with return code = (-?\d+)", text)
    assert found, "deepspeed.launcher.launch reported no rank's exit status"
    return int(found[0])


def lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def logged_since(train_log, since: float) -> bool:
    return lines(train_log) > 0 and train_log.stat().st_mtime >= since


def wait_until_training(procs, logs, train_log, since: float, timeout=240):
    deadline = time.monotonic() + timeout
    while not logged_since(train_log, since):
        ended = [p.returncode for p in procs if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"no training step logged (ended: {ended})\n" +
                                 "\n".join(log.read_text()[-3000:] for log in logs))
        time.sleep(0.2)


def signalled(tmp_path, procs, logs, target, sig, since: float):
    """Send `sig` to `target` ("launch.sh": node 0's, or a launcher's module) once the job trains (has logged a step
    since `since`); check that nothing of the job is left once every launch.sh has ended. Statuses and logs."""
    train_log = tmp_path / "out" / "train_log.jsonl"
    wait_until_training(procs, logs, train_log, since)
    before = job_processes(str(tmp_path))
    names = " ".join(" ".join(p.cmdline()) for p in before)
    assert "ds_mlm.supervise" in names and "run_mlm.py" in names
    pid = procs[0].pid if target == "launch.sh" else next(p.pid for p in before if p.cmdline()[1:3] == ["-m", target])
    os.kill(pid, sig)
    sent = time.monotonic()
    statuses = [p.wait(timeout=GRACE + 30) for p in procs]
    took = time.monotonic() - sent
    assert job_processes(str(tmp_path)) == [], "processes of the job survived it"
    assert not [p for p in before if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert took < GRACE, f"{took:.1f} s: the ranks should have stopped by themselves, long before the grace ended"
    count = lines(train_log)
    time.sleep(1.0)
    assert lines(train_log) == count
    return statuses, [log.read_text() for log in logs]


def stop_one(tmp_path, env, target, sig):
    log, since = tmp_path / f"launch-{sig.name}.log", time.time()
    [code], [text] = signalled(tmp_path, [start(["bash", LAUNCH], log, env)], [log], target, sig, since)
    return code, text


def assert_stopped_through_launch_sh(text, sig, launcher="deepspeed"):
    """The signal went to the ranks, not to the launchers: the ranks' own line, launch.sh's, and under DeepSpeed no
    traceback (torchrun prints one, ChildFailedError, whenever a worker exits non-zero)."""
    assert f"launch.sh: {sig.name}: stopping the job: {sig.name} to each rank" in text
    assert RANK_STOPPED[sig] in text
    assert f"launch.sh: stopped by {sig.name}" in text
    assert ("Traceback" in text) == (launcher == "torchrun" and "ChildFailedError" in text)


def test_sigterm_then_sigint_to_launch_sh_stop_two_ranks_and_the_directory_is_usable_again(
        tmp_path, bpe_tokenizer_dir, small_corpus):
    port = free_port()
    env = job_env(tmp_path, bpe_tokenizer_dir, small_corpus, **TRAINING, N_GPUS_PER_NODE="2",
                  MASTER_PORT=str(port), STOP_GRACE_SECONDS=str(GRACE))
    code, text = stop_one(tmp_path, env, "launch.sh", signal.SIGTERM)
    assert code == ranks_status(text) == EXIT_PREEMPTED, text[-3000:]  # the ranks' own status, passed on
    assert_stopped_through_launch_sh(text, signal.SIGTERM)
    assert text.count(RANK_STOPPED[signal.SIGTERM]) == 2  # both ranks: "[rank 0] ...", "[rank 1] ..."
    saved = (tmp_path / "out" / "latest_checkpoint").read_text().strip()  # the step the signal found
    assert (tmp_path / "out" / saved / "COMPLETE").is_file()
    assert no_shm_leak(port)

    # a second job in the same output directory (on 1 process now) goes on from there; Ctrl-C stops it likewise
    code, text = stop_one(tmp_path, {**env, "N_GPUS_PER_NODE": "1"}, "launch.sh", signal.SIGINT)
    assert code == ranks_status(text) == EXIT_PREEMPTED, text[-3000:]
    assert_stopped_through_launch_sh(text, signal.SIGINT)
    assert "ds-mlm: error" not in text and f"resumed from {tmp_path / 'out' / saved}" in text


@pytest.mark.parametrize("launcher, processes, target, sig, status", [
    ("deepspeed", 1, "deepspeed.launcher.runner", signal.SIGTERM, 143),  # the runner dies; its orphans are stopped
    ("torchrun", 2, "launch.sh", signal.SIGINT, 130),  # torchrun says 1 for any failed worker: 128 + SIGINT instead
    ("torchrun", 1, "torch.distributed.run", signal.SIGTERM, 1),  # torchrun's own handling: its traceback, status 1
], ids=["runner-TERM", "torchrun-launch.sh-INT", "torchrun-itself-TERM"])
def test_a_signal_to_the_launcher_or_through_torchrun_stops_every_rank(launcher, processes, target, sig, status,
                                                                       tmp_path, bpe_tokenizer_dir, small_corpus):
    port = free_port()
    env = job_env(tmp_path, bpe_tokenizer_dir, small_corpus, **TRAINING, LAUNCHER=launcher,
                  N_GPUS_PER_NODE=str(processes), MASTER_PORT=str(port), STOP_GRACE_SECONDS=str(GRACE))
    code, text = stop_one(tmp_path, env, target, sig)
    assert code == status, text[-3000:]
    if target == "launch.sh":
        assert_stopped_through_launch_sh(text, sig, launcher)
    if target == "deepspeed.launcher.runner":
        assert "launch.sh: the launcher ended (killed by SIGTERM) but 2 processes of its job are still running" in text
    assert no_shm_leak(port)


def test_stopping_one_node_of_two_stops_the_other_too(tmp_path, bpe_tokenizer_dir, small_corpus):
    port = free_port()
    env = job_env(tmp_path, bpe_tokenizer_dir, small_corpus, **TRAINING, N_NODES="2", N_GPUS_PER_NODE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logs, since = [tmp_path / f"node{n}.log" for n in (0, 1)], time.time()
    procs = [start(["bash", LAUNCH], logs[n], {**env, "NODE_RANK": str(n)}) for n in (0, 1)]
    statuses, texts = signalled(tmp_path, procs, logs, "launch.sh", signal.SIGTERM, since)  # node 0's only
    # the ranks agree at the next step boundary: node 1's rank saves with node 0's and stops with it, no error
    assert statuses == [EXIT_PREEMPTED, EXIT_PREEMPTED], texts[1][-3000:]
    assert "ds-mlm: error" not in texts[1] and RANK_STOPPED[signal.SIGTERM] in texts[0]
    saved = (tmp_path / "out" / "latest_checkpoint").read_text().strip()
    assert {p.name for p in (tmp_path / "out" / saved).glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    assert no_shm_leak(port)


def test_the_demo_chain_stops_in_its_first_command_and_starts_no_other(tmp_path, small_corpus):
    env = {"PROJECT_DEMO_DIR": str(tmp_path / "demo"), "PROJECT_EVAL_DIR": str(small_corpus[1]),
           "PROJECT_DEMO_VOCAB_SIZE": "1000", "PROJECT_MAX_SEQ_LENGTH": "64", "MASTER_PORT": str(free_port())}
    log = tmp_path / "launch.log"
    proc = start(["bash", LAUNCH], log, env)
    wait_for = time.monotonic() + 120
    while "training a spm tokenizer" not in log.read_text():  # started, past Python's own start-up
        assert proc.poll() is None and time.monotonic() < wait_for, log.read_text()[-3000:]
        time.sleep(0.1)
    before = job_processes(str(tmp_path))
    proc.send_signal(signal.SIGINT)  # Ctrl-C while the tokenizer trains: the launcher and fill-mask never start
    code = proc.wait(timeout=GRACE + 30)
    text = log.read_text()
    # 130, or 2 where the interrupt lands in SentencePiece's reading of the corpus (train_tokenizer then reports it
    # as "SentencePiece could not train ...: KeyboardInterrupt")
    assert code != 0, text[-3000:]
    assert job_processes(str(tmp_path)) == [] and not [p for p in before if p.is_running()]
    assert "-m ds_mlm.train_tokenizer" in text and "deepspeed.launcher" not in text and "fill_mask" not in text
    assert f"launch.sh: stopped by SIGINT (exit status {code})" in text and "Traceback" not in text
    assert not (tmp_path / "demo" / "tokenizer").exists()  # only a complete tokenizer is moved into place


def test_a_torchrun_node_waiting_for_the_others_stops_at_once(tmp_path, bpe_tokenizer_dir, small_corpus):
    env = job_env(tmp_path, bpe_tokenizer_dir, small_corpus, **TRAINING, LAUNCHER="torchrun", N_NODES="2",
                  NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # node 1 never comes
    log = tmp_path / "launch.log"
    proc = start(["bash", LAUNCH], log, env)
    deadline = time.monotonic() + 120
    while not [p for p in job_processes(str(tmp_path)) if p.cmdline()[1:3] == ["-m", "torch.distributed.run"]]:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(3.0)  # in its rendezvous: no rank exists to pass the signal to
    before = job_processes(str(tmp_path))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=GRACE + 30)
    took, text = time.monotonic() - sent, log.read_text()
    assert code == 143, text[-3000:]
    assert took < 15, f"{took:.1f} s: torchrun itself gets the signal once it has had no rank for 5 s"
    assert job_processes(str(tmp_path)) == [] and not [p for p in before if p.is_running()]
    assert "SIGTERM sent to" in text and "(torch.distributed.run)" in text
