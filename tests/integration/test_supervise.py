"""ds_mlm/supervise.py on stand-in process trees, a second or two each (launch.sh's real launchers: test_stop.py).

The stand-ins mimic what was measured of the real launchers: a "runner" without a signal handler that starts an
"agent" (`python -m fake_agent`, like deepspeed.launcher.launch), which starts the "ranks", stops the others when one
ends badly and exits with that rank's status. Each process appends what it receives to a file of its own.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO
from ds_mlm.signals import EXIT_PREEMPTED

# stand-in jobs with waits of 20 s and timing windows: run by themselves (tests/run.sh), not beside an xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.alone]
PYTHON = sys.executable
RANK = r'''"""A rank: records its pid, then each stop signal it gets; MODE=handles exits 128+N half a second
later, saves exits 75 (a checkpoint saved) likewise, ignores keeps running; with CHILD=1 it first starts a child of
its own that ignores every stop signal."""
import os, signal, subprocess, sys, time
log = os.path.join(sys.argv[1], f"rank-{os.getpid()}")
mode = os.environ["MODE"]


def got(signum, frame):
    with open(log, "a") as f:
        print(signal.Signals(signum).name, file=f)
    if mode in ("handles", "saves"):
        time.sleep(0.5)  # a checkpoint being saved
        sys.exit(75 if mode == "saves" else 128 + signum)


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(sig, got)
if os.environ.get("CHILD"):
    deaf = "import signal, time\nfor s in (1, 2, 10, 15): signal.signal(s, signal.SIG_IGN)\ntime.sleep(600)"
    subprocess.Popen([sys.executable, "-c", deaf])
open(log, "a").close()
while True:
    time.sleep(0.05)
'''
AGENT = r'''"""Like deepspeed.launcher.launch: starts N ranks; when one ends non-zero, SIGTERM to the others, their
end awaited, its status passed on. Records any signal it gets itself. With N = 0, like torchrun waiting for its
rendezvous: no rank starts, a signal ends it (status 1)."""
import os, signal, subprocess, sys, time
folder, n = sys.argv[1], int(sys.argv[2])
ranks = []


def got(signum, frame):
    with open(os.path.join(folder, "agent-signalled"), "a") as f:
        print(signum, file=f)
    if not ranks:  # still waiting for the other nodes (n = 0: forever), like torchrun: the signal ends the wait
        sys.exit(1)


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(sig, got)
if n == 0:
    time.sleep(600)
ranks += [subprocess.Popen([sys.executable, os.path.join(folder, "rank.py"), folder]) for _ in range(n)]
while True:
    codes = [r.poll() for r in ranks]
    bad = [c for c in codes if c not in (None, 0)]
    if bad or all(c == 0 for c in codes):
        for r in ranks:
            if r.poll() is None:
                r.terminate()
        for r in ranks:
            r.wait()
        sys.exit(bad[0] if bad else 0)
    time.sleep(0.05)
'''
RUNNER = r'''"""Like deepspeed.launcher.runner without pdsh: no signal handler; starts the agent (after DELAY s),
waits for it, passes on a positive status only (an agent killed by a signal: 0)."""
import os, subprocess, sys, time
time.sleep(float(os.environ.get("DELAY", "0")))
agent = subprocess.Popen([sys.executable, "-m", "fake_agent", *sys.argv[1:]], cwd=sys.argv[1])
sys.exit(max(agent.wait(), 0))
'''


@pytest.fixture
def stand_in(no_leftovers):
    for name, text in (("rank.py", RANK), ("fake_agent.py", AGENT), ("runner.py", RUNNER)):
        (no_leftovers / name).write_text(text)
    return no_leftovers


def rank_logs(folder: Path) -> dict:
    return {int(p.name.split("-")[1]): p.read_text().split() for p in folder.glob("rank-*")}


def supervised(folder, ranks=2, mode="handles", grace=20, ranks_of=True, **env):
    cmd = [PYTHON, "-m", "ds_mlm.supervise", "--grace", grace, *(["--ranks-of", "fake_agent"] if ranks_of else []),
           "--", PYTHON, folder / "runner.py", folder, ranks]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "MODE": mode, **env}
    return subprocess.Popen([str(c) for c in cmd], cwd=folder, env=full_env, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=30.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def job_pids(root: int) -> list:
    try:
        return [p.pid for p in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def watch(proc, timeout=20.0):
    """(exit status, every pid seen below `proc` until it ended)."""
    seen, deadline = set(), time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the supervisor did not end"
        seen.update(job_pids(proc.pid))
        time.sleep(0.05)
    return proc.returncode, seen


def gone(pids) -> bool:
    return not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_the_signal_reaches_each_rank_once_and_their_status_comes_back(stand_in):
    proc = supervised(stand_in)
    wait_for(lambda: len(rank_logs(stand_in)) == 2, what="two ranks")
    pids = job_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # a repeated delivery (the scheduler and the launcher): the same request
    assert proc.wait(20) == 143  # the rank's own status, through the agent and the runner
    assert list(rank_logs(stand_in).values()) == [["SIGTERM"], ["SIGTERM"]]
    assert not (stand_in / "agent-signalled").exists()  # the agent was left to wind down by its own rules
    assert gone(pids)
    assert "SIGTERM: stopping the job: SIGTERM to each rank" in proc.stderr.read()


def test_what_ignores_the_signal_is_killed_after_the_grace_period(stand_in):
    proc = supervised(stand_in, mode="ignores", grace=1, CHILD="1")
    wait_for(lambda: len(rank_logs(stand_in)) == 2, what="two ranks")
    wait_for(lambda: len(job_pids(proc.pid)) == 6, what="the ranks' children")  # runner, agent, 2 ranks, 2 children
    pids = job_pids(proc.pid)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 128 + signal.SIGKILL
    assert 1.0 <= time.monotonic() - started < 4.0
    assert gone(pids)
    err = proc.stderr.read()
    assert "6 processes of the job still running 1 s after SIGINT: killing them" in err
    assert "Traceback" not in err


def test_a_killed_launcher_does_not_leave_its_ranks_running(stand_in):
    proc = supervised(stand_in)
    wait_for(lambda: len(rank_logs(stand_in)) == 2, what="two ranks")
    pids = job_pids(proc.pid)
    runner = psutil.Process(proc.pid).children()[0]
    runner.send_signal(signal.SIGTERM)  # dies without passing it on: the agent and the ranks are orphaned
    assert proc.wait(20) == 143
    assert list(rank_logs(stand_in).values()) == [["SIGTERM"], ["SIGTERM"]]
    assert gone(pids)
    assert "the launcher ended (killed by SIGTERM) but 3 processes of its job are still running" in proc.stderr.read()


@pytest.mark.parametrize("mode, status", [("saves", EXIT_PREEMPTED), ("handles", 143)])
def test_a_killed_agent_whose_runner_says_0_is_still_a_stop(stand_in, mode, status):
    proc = supervised(stand_in, mode=mode)
    wait_for(lambda: len(rank_logs(stand_in)) == 2, what="two ranks")
    pids = job_pids(proc.pid)
    agent = next(p for p in psutil.Process(proc.pid).children(recursive=True) if "fake_agent" in p.cmdline())
    agent.kill()  # the runner exits 0, as DeepSpeed's does; the ranks, orphaned here, get SIGTERM
    assert proc.wait(20) == status  # 75 when a rank saved; else 128 + SIGTERM: never the runner's 0
    assert list(rank_logs(stand_in).values()) == [["SIGTERM"], ["SIGTERM"]]
    assert gone(pids)
    assert "the launcher ended (exit status 0) but 2 processes of its job are still running" in proc.stderr.read()


def test_ranks_started_after_the_signal_get_it_too(stand_in):
    proc = supervised(stand_in, DELAY="1.5")  # the signal comes while the launcher is still starting
    wait_for(lambda: job_pids(proc.pid), what="the runner")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    status, seen = watch(proc)
    assert status != 0 and gone(seen)
    assert len(seen) == 4  # runner, agent and both ranks were started, and ended
    assert "SIGTERM sent to" in proc.stderr.read()


def test_an_agent_that_starts_no_rank_gets_the_signal_itself(stand_in):
    proc = supervised(stand_in, ranks=0)
    wait_for(lambda: len(job_pids(proc.pid)) == 2, what="the runner and the agent")
    time.sleep(0.5)  # past the agent's start-up
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 143  # the agent's generic 1 after a stop: 128 + SIGTERM
    assert 5.0 <= time.monotonic() - started < 10.0  # AGENT_IDLE_SECONDS: first it might still start its ranks
    assert (stand_in / "agent-signalled").read_text().split() == [str(int(signal.SIGTERM))]


def test_without_ranks_of_the_command_gets_the_signal_then_what_it_leaves(stand_in):
    proc = supervised(stand_in, ranks_of=False, grace=2)
    wait_for(lambda: len(rank_logs(stand_in)) == 2, what="two ranks")
    pids = job_pids(proc.pid)
    proc.send_signal(signal.SIGHUP)  # the runner has no handler: it dies, and the agent it leaves gets SIGHUP next
    assert proc.wait(20) == 128 + signal.SIGHUP
    assert (stand_in / "agent-signalled").read_text().split() == [str(int(signal.SIGHUP))]
    assert list(rank_logs(stand_in).values()) == [[], []]  # the stand-in agent passes nothing on: killed at the end
    assert gone(pids)


def test_the_job_stops_when_its_parent_is_killed(stand_in):
    parent = subprocess.Popen(["bash", "-c", f"{PYTHON} -m ds_mlm.supervise --ranks-of fake_agent -- {PYTHON} "
                                             f"{stand_in / 'runner.py'} {stand_in} 1 & wait"],
                              cwd=stand_in, env={**os.environ, "PYTHONPATH": str(REPO), "MODE": "handles"})
    wait_for(lambda: len(rank_logs(stand_in)) == 1, what="the rank")
    pids = job_pids(parent.pid)
    parent.kill()  # kill -9 launch.sh: nobody is left to pass a signal on
    parent.wait()
    wait_for(lambda: gone(pids), timeout=10, what="the job to end")
    assert list(rank_logs(stand_in).values()) == [["SIGTERM"]]


def test_a_reader_gone_does_not_stop_the_stopping(stand_in):
    proc = supervised(stand_in)  # its stderr is a pipe: closed below, as when `| tee` dies with the Ctrl-C
    wait_for(lambda: len(rank_logs(stand_in)) == 2, what="two ranks")
    pids = job_pids(proc.pid)
    proc.stderr.close()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130
    assert list(rank_logs(stand_in).values()) == [["SIGINT"], ["SIGINT"]]
    assert gone(pids)
