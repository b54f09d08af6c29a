"""The ordered worker pool: results in order whatever the timing, errors come back, and no worker outlives an error,
a signal or the death of its parent."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ds_mlm.data.workers import OrderedPool, WorkerDied
from ds_mlm.errors import UserError

from conftest import REPO


def slow_square(x, delay):
    time.sleep(delay)
    return x * x


def fail(kind):
    if kind == "user":
        raise UserError("a message for the user")
    raise ValueError("a bug")


def gone(pids, within=5.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_results_come_in_submission_order():
    with OrderedPool(slow_square, 3) as pool:
        got = []
        for x in range(12):
            pool.submit((x, 0.05 * ((7 * x) % 4)))  # later tasks often finish first
            if pool.in_flight > 4:
                got.append(pool.next())
        while pool.in_flight:
            got.append(pool.next())
        pids = pool.pids
    assert got == [x * x for x in range(12)]
    assert gone(pids)


def test_errors_in_a_worker_come_back():
    with OrderedPool(fail, 2) as pool:
        pool.submit(("user",))
        with pytest.raises(UserError, match="a message for the user"):
            pool.next()
        pool.submit(("bug",))
        with pytest.raises(RuntimeError, match="(?s)a worker process failed.*ValueError: a bug"):
            pool.next()


def test_a_dead_worker_is_noticed_and_an_error_ends_the_others():
    with pytest.raises(WorkerDied, match="died, exit code -9"):
        with OrderedPool(slow_square, 2) as pool:
            pids = pool.pids
            pool.submit((1, 30))
            os.kill(pids[0], signal.SIGKILL)
            pool.submit((2, 30))
            pool.next()
    assert gone(pids)


def test_workers_ignore_sigint_and_end_with_the_parents_exception():
    with pytest.raises(KeyboardInterrupt):
        with OrderedPool(slow_square, 2) as pool:
            pids = pool.pids
            pool.submit((3, 0.0))
            time.sleep(0.3)
            for pid in pids:
                os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the whole process group
            time.sleep(0.3)
            assert pool.next() == 9 and all(psutil.pid_exists(p) for p in pids)
            raise KeyboardInterrupt
    assert gone(pids)


# A stop signal that reaches a worker before _serve sets its own handlers (a pool ended as it starts: CI saw it)
SIGNAL_AT_BIRTH = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from ds_mlm import errors
from ds_mlm.data import workers
errors.install_stop_handlers()
serve = workers._serve
def signalled_at_birth(*args):
    os.kill(os.getpid(), signal.SIGTERM)  # here the parent's handler is still the child's
    serve(*args)
workers._serve = signalled_at_birth
try:
    with workers.OrderedPool(pow, 1) as pool:
        pool.submit((2, 3))
        pool.next()
except workers.WorkerDied as e:
    print(e)
"""


def test_a_worker_signalled_before_its_handlers_are_set_ends_quietly():
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_BIRTH.format(repo=str(REPO))], capture_output=True,
                          text=True, timeout=60)
    assert "exit code -15" in proc.stdout and proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Terminated" not in proc.stderr, proc.stderr


PARENT = """
import sys, time
sys.path.insert(0, {repo!r})
from ds_mlm.data.workers import OrderedPool
pool = OrderedPool(time.sleep, 2)
pool.submit((60,))
print(" ".join(map(str, pool.pids)), flush=True)
time.sleep(60)
"""


def test_workers_die_with_a_parent_killed_by_sigkill_and_release_its_stdout():
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(repo=str(REPO))], stdout=subprocess.PIPE,
                              text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    parent.kill()
    parent.wait()
    started = time.monotonic()
    assert parent.stdout.read() == ""  # EOF: no worker holds the pipe (a `| tee` ends)
    assert time.monotonic() - started < 5
    assert gone(pids)
