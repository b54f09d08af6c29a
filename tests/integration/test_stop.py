"""Stopping a job stops all of it, whichever process of it is signalled: the deepspeed runner or torchrun started by
hand with the README's command, launch.sh in each of its modes (the deepspeed runner on one machine, two --no_ssh
"nodes", torchrun, the demo), a launcher inside launch.sh killed, the supervisor killed. Each job (roberta-tiny, 64 ids
per sample) is signalled once it trains; then nothing of it may be left: no process whose command line names the
test's directory (launch.sh, the supervisor, the runner, deepspeed.launcher.launch, torchrun, the ranks), none of the
pids seen before the signal; the exit status is the documented one (README, "Stop signals"), train_log.jsonl stops
growing, /dev/shm keeps no DeepSpeed buffer of the job's port, and the ranks saved a complete checkpoint of the step
they reached (the same command then goes on exactly as a run never stopped).
"""

import os
import signal
import sys
import time

import psutil
import pytest

from conftest import REPO, free_port, job_processes, numbers, read_log, run
from ds_mlm.signals import EXIT_PREEMPTED
from integration.test_distributed_launchers import no_shm_leak, start
from integration.test_launch import LAUNCH, job_env, no_launch_variables  # noqa: F401 (an autouse fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]
GRACE = 30  # STOP_GRACE_SECONDS: the default
TRAINING = dict(PROJECT_MAX_STEPS="100000", PROJECT_SAVE_STEPS="100000")  # still training when signalled
# What a training rank says when signalled: it finishes its step, saves, exits with EXIT_PREEMPTED (ds_mlm.signals)
RANK_STOPPED = {sig: f"ds-mlm: {sig.name}: finishing this step, saving a checkpoint, then exiting with status "
                     f"{EXIT_PREEMPTED}" for sig in (signal.SIGTERM, signal.SIGINT)}


def runs_module(argv, module) -> bool:
    """`python [-u] -m MODULE ...` (the first -m: the supervisor's command line names its launcher's module later)."""
    return "-m" in argv[:3] and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1] == module


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


def all_gone(marker: str, before, sent: float, within=60.0) -> float:
    """Seconds from `sent` until no process of the job is left (the ranks may outlive a killed launcher while they
    save); fails past `within`."""
    while job_processes(marker) or [p for p in before if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() - sent < within, "processes of the job survived it: " + ", ".join(
            " ".join(p.cmdline()[:4]) for p in job_processes(marker))
        time.sleep(0.2)
    return time.monotonic() - sent


def signalled(tmp_path, procs, logs, target, sig, since: float):
    """Send `sig` to `target` ("launch.sh": node 0's, or a launcher's module) once the job trains (has logged a step
    since `since`); check that nothing of the job is left soon after. Statuses and logs."""
    train_log = tmp_path / "out" / "train_log.jsonl"
    wait_until_training(procs, logs, train_log, since)
    before = job_processes(str(tmp_path))
    names = " ".join(" ".join(p.cmdline()) for p in before)
    assert "ds_mlm.supervise" in names and "run_mlm.py" in names
    pid = procs[0].pid if target == "launch.sh" else next(p.pid for p in before if runs_module(p.cmdline(), target))
    os.kill(pid, sig)
    sent = time.monotonic()
    statuses = [p.wait(timeout=GRACE + 30) for p in procs]
    took = all_gone(str(tmp_path), before, sent)
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


def saved_at_the_step_reached(out) -> int:
    reached = max(r["step"] for r in read_log(out))
    assert (out / "latest_checkpoint").read_text() == f"checkpoint-{reached}\n"
    assert (out / f"checkpoint-{reached}" / "COMPLETE").is_file() and not (out / "roberta_thai").exists()
    return reached


# -- by hand: the README's commands, each launcher signalled alone ------------------------------------------------------

STEPS = 150  # far from any scheduled save (--save_steps 1000); the signal comes at the first logged step, and the
# deepspeed runner's rank notices within its 1 s launcher watch: a quiet machine trains ~40 steps a second
VENV_BIN = REPO / ".venv" / "bin"


def mlm_args(out, cache, corpus, tokenizer) -> list:
    return ["--tokenizer_name_or_path", tokenizer, "--train_dir", corpus[0], "--output_dir", out,
            "--datasets_cache_dir", cache, "--architecture", "roberta-tiny", "--max_seq_length", "64",
            "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--logging_steps", "1",
            "--save_steps", "1000", "--learning_rate", "2e-3", "--deepspeed_config", "zero0.json"]


# one thread per process everywhere (launch.sh, the launchers and the reference would each pick their own count, and
# the losses would differ in their last bits); the rest of launch.sh's job comes from the arguments, which win
SAME_MATH = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_corpus, bpe_tokenizer_dir):
    root = tmp_path_factory.mktemp("uninterrupted")
    cache = root / "cache"
    run([sys.executable, REPO / "ds_mlm" / "run_mlm.py",
         *mlm_args(root / "out", cache, small_corpus, bpe_tokenizer_dir)], env=SAME_MATH)
    return cache, numbers(root / "out")


def by_hand(how, args, port, tmp_path) -> tuple:
    """(command, environment, status after SIGTERM to its first process): the README's command for `how`."""
    script = REPO / "ds_mlm" / "run_mlm.py"
    if how == "deepspeed":  # no handler: dies of it (143); the ranks see their launcher end, save, exit 75
        return [VENV_BIN / "deepspeed", "--num_gpus", "1", "--master_port", port, script, *args], SAME_MATH, -15
    if how == "torchrun":  # passes it to the ranks, which save; then its traceback and status 1
        return [VENV_BIN / "torchrun", "--nproc_per_node", "1", "--master_port", port, script, *args], SAME_MATH, 1
    env = {**SAME_MATH, "MASTER_PORT": str(port), "PROJECT_TRAIN_DIR": str(args[3]), "PROJECT_TOKENIZER": str(args[1]),
           "PROJECT_OUTPUT_DIR": str(args[5])}
    return ["bash", LAUNCH, *args], env, EXIT_PREEMPTED  # the ranks' own status, passed on


@pytest.mark.parametrize("how", ["deepspeed", "torchrun", "launch.sh"])
def test_sigterm_to_the_launcher_alone_saves_the_step_reached_and_the_same_command_goes_on_exactly(
        how, uninterrupted, tmp_path, small_corpus, bpe_tokenizer_dir):
    cache, expected = uninterrupted
    port = free_port()
    out = tmp_path / "out"
    cmd, env, status = by_hand(how, mlm_args(out, cache, small_corpus, bpe_tokenizer_dir), port, tmp_path)
    log, since = tmp_path / "stopped.log", time.time()
    proc = start(cmd, log, env)
    wait_until_training([proc], [log], out / "train_log.jsonl", since)
    before = job_processes(str(tmp_path))
    proc.send_signal(signal.SIGTERM)  # the launcher's process only, as `kill PID` or a container runtime does
    sent = time.monotonic()
    code = proc.wait(timeout=60)
    all_gone(str(tmp_path), before, sent, within=60)
    text = log.read_text()
    assert code == status, text[-3000:]
    reached = saved_at_the_step_reached(out)
    assert reached < STEPS, "the run ended before the stop: the test proves nothing"
    assert no_shm_leak(port)
    if how == "deepspeed":
        assert "ds-mlm: its launcher is gone: " in text and f"exits with return code = {EXIT_PREEMPTED}" in text
    else:
        assert RANK_STOPPED[signal.SIGTERM] in text

    rerun_log = tmp_path / "rerun.log"
    assert start(cmd, rerun_log, env).wait(timeout=600) == 0, rerun_log.read_text()[-3000:]
    assert f"resumed from {out / f'checkpoint-{reached}'} at step {reached}" in rerun_log.read_text()
    assert numbers(out) == expected  # every loss, lr and grad norm of the uninterrupted run, bit for bit


# -- inside launch.sh: a launcher signalled or killed, the supervisor killed --------------------------------------------

@pytest.mark.parametrize("launcher, processes, target, sig, status", [
    # torchrun says 1 for any failed worker: 128 + SIGINT instead
    ("torchrun", 2, "launch.sh", signal.SIGINT, 130),
    # its runner then exits 0 (DeepSpeed passes on only a positive status); the ranks saved: 75, never 0
    ("deepspeed", 1, "deepspeed.launcher.launch", signal.SIGKILL, EXIT_PREEMPTED),
    # kill -9 or the OOM killer: the runner gets SIGTERM (parent-death signal), the ranks see their chain change
    ("deepspeed", 1, "ds_mlm.supervise", signal.SIGKILL, 128 + signal.SIGKILL),
], ids=["torchrun-launch.sh-INT", "launch.py-KILL", "supervise-KILL"])
def test_a_launcher_signalled_or_killed_inside_launch_sh_stops_every_rank_with_a_checkpoint(
        launcher, processes, target, sig, status, tmp_path, bpe_tokenizer_dir, small_corpus):
    port = free_port()
    env = job_env(tmp_path, bpe_tokenizer_dir, small_corpus, **TRAINING, LAUNCHER=launcher,
                  N_GPUS_PER_NODE=str(processes), MASTER_PORT=str(port), STOP_GRACE_SECONDS=str(GRACE))
    code, text = stop_one(tmp_path, env, target, sig)
    assert code == status, text[-3000:]
    if target == "launch.sh":
        assert_stopped_through_launch_sh(text, sig, launcher)
        assert text.count(RANK_STOPPED[sig]) == 2  # both ranks: "[rank 0] ...", "[rank 1] ..."
    else:  # whichever comes first: the rank's own watch of its launchers, or the supervisor's SIGTERM to an orphan
        assert "ds-mlm: its launcher is gone: " in text or RANK_STOPPED[signal.SIGTERM] in text, text[-3000:]
    saved_at_the_step_reached(tmp_path / "out")
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


@pytest.mark.alone  # a bound of 15 s on a 5 s wait: not beside another xdist worker (tests/run.sh)
def test_a_torchrun_node_waiting_for_the_others_stops_at_once(tmp_path, bpe_tokenizer_dir, small_corpus):
    env = job_env(tmp_path, bpe_tokenizer_dir, small_corpus, **TRAINING, LAUNCHER="torchrun", N_NODES="2",
                  NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # node 1 never comes
    log = tmp_path / "launch.log"
    proc = start(["bash", LAUNCH], log, env)
    deadline = time.monotonic() + 120
    while not [p for p in job_processes(str(tmp_path)) if runs_module(p.cmdline(), "torch.distributed.run")]:
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
