"""Slurm on the test cluster: real slurmctld, slurmd and munge (tests/cluster_slurm.py), real sbatch and srun.

The jobs are the README's: slurm/launcher-slurm.sbatch (the deepspeed launcher calling srun) and
slurm/pretrain.sbatch (one launch.sh per node through srun, preemption and requeue). Each trains roberta-tiny
without dropout in fp32 for STEPS steps of a global batch of 8 on 2 nodes, one rank each; the uninterrupted
launcher-slurm run is the reference for the others:
- a time limit with its signal: the job's limit is lowered mid-run (the test's stand-in for hours passing), Slurm
  sends the batch shell SIGUSR1 (--signal=B:USR1@60), the script passes it to the step, the ranks save and exit,
  the script requeues the job; it resumes and ends with the reference's losses, step for step, exactly.
- `scontrol requeuehold` mid-run (a preemption: SIGTERM to every process of the job), the held job moved to one node,
  released: it resumes on 1 rank (gradient accumulation 2, so the same global batch; the ZeRO-2 checkpoint of 2 ranks
  converted to a universal one) and follows the reference up to reduction order (rtol 1e-3, as tests/integration/test_elastic.py).
After every job no process of it is left on any host. The three jobs run side by side (each node offers 2 CPUs), so
the module costs about the time of the slowest: two starts and a conversion (~2 minutes on a quiet machine).
"""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
STEPS = 160  # at ~20 steps/s on a quiet machine: 8 s of training; the freeze, polled every 50 ms, lands by step ~5
FP32_NO_DROPOUT = ["--bf16", "false", "--learning_rate", "2e-3", "--warmup_steps", "2"]


@pytest.fixture(scope="module")
def slurm(cluster):
    from cluster_slurm import Slurm, unavailable

    why = unavailable()
    if why:
        if os.environ.get("DS_MLM_REQUIRE_CLUSTER") == "1":  # CI: the cluster tier must run
            pytest.fail(f"DS_MLM_REQUIRE_CLUSTER=1 but {why}")
        pytest.skip(why)
    made = Slurm(cluster)
    yield made
    made.close()


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory, small_corpus, bpe_tokenizer_dir, no_dropout_config):
    """The three jobs, submitted together: name -> (job id, output dir, Slurm output file)."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    submitted = {}
    for name, script, env in (
            ("reference", "slurm/launcher-slurm.sbatch", {}),
            ("time_limit", "slurm/pretrain.sbatch", {}),
            ("fewer_nodes", "slurm/pretrain.sbatch", {"PROJECT_GLOBAL_BATCH": "8"})):
        out, log = root / name, root / f"{name}.out"
        env = {"PROJECT_TRAIN_DIR": str(small_corpus[0]), "PROJECT_EVAL_DIR": str(small_corpus[1]),
               "PROJECT_TOKENIZER": str(bpe_tokenizer_dir), "PROJECT_OUTPUT_DIR": str(out),
               "PROJECT_CACHE_DIR": str(root / "cache"), "PROJECT_MAX_STEPS": str(STEPS),
               "PROJECT_MAX_SEQ_LENGTH": "64", "PROJECT_BATCH_SIZE": "4", "PROJECT_LOGGING_STEPS": "1",
               "PROJECT_SAVE_STEPS": "1000", "DS_CONFIG": "zero2.json", **env}
        # --time: far away; the time-limit test brings it near itself. @60: the README's @120 would cost a minute more
        options = ["--nodes=2", "--time=10", "--signal=B:USR1@60"]
        job = slurm.sbatch(REPO / script, out=log, env=env, options=options, cwd=REPO,
                           args=["--config_name", no_dropout_config, *FP32_NO_DROPOUT])
        submitted[name] = (job, out, log)
    drive(slurm, submitted)
    return submitted


def drive(slurm, jobs, bound: float = 900):
    """Preempt the two pretrain.sbatch jobs mid-run, each its way, while all three run; return once all have ended.

    Slurm looks at time limits every 30 s, so the time-limit signal comes up to 30 s after the limit is lowered: the
    job's ranks are frozen meanwhile (SIGSTOP, SIGCONT once the batch shell has the signal), so that it finds them
    mid-run however fast the machine trains."""
    from cluster_slurm import DONE

    done = {}  # the steps taken -> when
    deadline = time.monotonic() + bound
    # Each preempted job's ranks are frozen (SIGSTOP) once it has logged two steps, by a watcher of its own: this
    # loop's scontrol calls take seconds on a loaded machine, in which a quiet one trains the whole job.
    frozen = {name: freeze_after(slurm, *jobs[name][:2], steps=2) for name in ("time_limit", "fewer_nodes")}
    while True:
        state = {name: slurm.job(job) for name, (job, _, _) in jobs.items()}
        if all(r["JobState"] in DONE for r in state.values()):
            return
        assert time.monotonic() < deadline, f"the Slurm jobs did not end within {bound} s: {state}"
        job, out, log = jobs["time_limit"]
        r = state["time_limit"]
        if "lowered" not in done and frozen["time_limit"].is_set():
            # Bring the end near: 60-120 s left. Slurm sends SIGUSR1 once less than 60 s (--signal=B:USR1@60) + its
            # 30 s margin are left, at its next look, so within a minute, with at least 30 s for the save and requeue.
            slurm.scontrol("update", f"JobId={job}", f"TimeLimit={(seconds(r['RunTime']) + 120) // 60}")
            done["lowered"] = time.monotonic()
        if "lowered" in done and "thawed" not in done:
            if "pretrain.sbatch: SIGUSR1: passing it to the job step" in log.read_text(errors="replace"):
                signal_ranks(slurm, job, signal.SIGCONT)
                done["thawed"] = time.monotonic()
            assert time.monotonic() - done["lowered"] < 150, f"no SIGUSR1 150 s after the time limit came near: {r}"
        if "thawed" in done and "raised" not in done and r["Restarts"] == "1":
            # the requeued job must not find that limit again (it would be signalled at once): the time back
            slurm.scontrol("update", f"JobId={job}", "TimeLimit=10")
            done["raised"] = time.monotonic()
        job, out, _ = jobs["fewer_nodes"]
        r = state["fewer_nodes"]
        if "held" not in done and frozen["fewer_nodes"].is_set():  # frozen mid-run; Slurm's SIGCONT + SIGTERM wake it
            slurm.scontrol("requeuehold", job)  # SIGTERM to every process of the job: the ranks save; it waits, held
            done["held"] = time.monotonic()
        if "held" in done and "released" not in done and r["JobState"] == "PENDING" and r["Restarts"] == "1":
            slurm.scontrol("update", f"JobId={job}", "NumNodes=1", "NumTasks=1")
            slurm.scontrol("release", job)
            done["released"] = time.monotonic()
        time.sleep(0.5)


def freeze_after(slurm, job, out: Path, steps: int, bound: float = 600) -> threading.Event:
    """Watch the job's train log every 50 ms and SIGSTOP its ranks once `steps` steps are logged; the event is set
    then. A daemon thread: it gives up after `bound` seconds (the drive loop fails on its own deadline)."""
    frozen = threading.Event()

    def watch():
        end = time.monotonic() + bound
        while time.monotonic() < end:
            if len(losses(out)) >= steps:
                signal_ranks(slurm, job, signal.SIGSTOP)
                frozen.set()
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True, name=f"freeze-{job}").start()
    return frozen


def signal_ranks(slurm, job, sig):
    """Send `sig` to the job's run_mlm.py processes on every node."""
    for host in slurm.nodes:
        for pid in slurm.job_pids(host, job):
            try:
                if b"run_mlm.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, sig)
            except OSError:  # gone meanwhile
                pass


def records(out: Path) -> list:
    path = out / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Slurm signals every process of the step (a time limit's --signal, a requeue's SIGTERM): a rank that finds its killed
# launcher gone before its own signal is handled says so instead; either way it saves the step it reached
STOPPED = r"stopped by (?:{signal}|its launcher's end) at step (\d+), saved in checkpoint-\1"


def losses(out: Path) -> list:
    return [(r["step"], r["loss"]) for r in records(out) if "loss" in r]


def seconds(hms: str) -> int:
    """Slurm's [D-]HH:MM:SS as seconds."""
    days, _, rest = hms.rpartition("-")
    h, m, s = (int(x) for x in rest.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


@pytest.fixture(scope="module")
def reference(slurm, jobs):
    job, out, log = jobs["reference"]
    record = slurm.finish(job, log)
    text = log.read_text(errors="replace")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", text[-4000:]
    assert "--launcher slurm" in text and "srun -n 2" in text  # the deepspeed runner's srun, not pdsh
    got = losses(out)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    return got


def test_launcher_slurm_trains_on_both_nodes(slurm, jobs, reference):
    job, out, log = jobs["reference"]
    assert slurm.job(job)["NumNodes"] == "2"
    # both ranks (one per node) wrote their ZeRO partition of the final checkpoint
    parts = sorted(p.name for p in (out / f"checkpoint-{STEPS}").rglob("*zero_pp_rank_*_optim_states.pt"))
    assert [re.search(r"zero_pp_rank_(\d+)", p).group(1) for p in parts] == ["0", "1"]
    assert (out / "roberta_thai" / "config.json").exists()


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm, jobs, reference):
    job, out, log = jobs["time_limit"]
    record = slurm.finish(job, log)
    text = log.read_text(errors="replace")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", text[-4000:]
    assert "pretrain.sbatch: SIGUSR1: passing it to the job step" in text
    stopped = re.search(STOPPED.format(signal="SIGUSR1"), text)
    assert stopped, text[-4000:]
    assert f"requeueing job {job} to resume from its checkpoint" in text
    assert "start 2 (SLURM_RESTART_COUNT=1)" in text
    assert f"resumed from {out}/checkpoint-{stopped.group(1)}" in text
    assert 0 < int(stopped.group(1)) < STEPS
    assert losses(out) == reference  # every step, exactly: same world, same state


def test_requeued_job_resumes_on_fewer_nodes(slurm, jobs, reference):
    job, out, log = jobs["fewer_nodes"]
    record = slurm.finish(job, log)
    text = log.read_text(errors="replace")
    assert record["JobState"] == "COMPLETED" and record["NumNodes"] == "1", text[-4000:]
    stopped = re.search(STOPPED.format(signal="SIGTERM"), text)
    assert stopped, text[-4000:]
    k = int(stopped.group(1))
    assert "start 2 (SLURM_RESTART_COUNT=1), 1 node(s)" in text and "gradient accumulation 2" in text
    assert "resumed on 1 processes a checkpoint of 2 (through DeepSpeed's universal checkpoint)" in text
    got = losses(out)
    assert [s for s, _ in got] == [s for s, _ in reference]
    assert [v for _, v in got[:k]] == [v for _, v in reference[:k]]
    assert [v for _, v in got[k:]] == pytest.approx([v for _, v in reference[k:]], rel=1e-3)


def test_no_process_left(slurm, cluster, jobs):
    """After the jobs (each test already waited for its job's processes), the hosts hold only Slurm's daemons."""
    for job, _, log in jobs.values():
        slurm.finish(job, log)
    deadline = time.monotonic() + 30
    while any(slurm.job_pids(h) for h in cluster.hosts) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {h: slurm.job_pids(h) for h in cluster.hosts} == {h: [] for h in cluster.hosts}
