"""The directory lock: exclusive while held, a live holder named in one line, a dead holder's lock taken over."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from ds_mlm import lock as lockmod
from ds_mlm.lock import LOCK_FILE, DirLock, LockHeld

HOLD = "import sys, time; sys.path.insert(0, {repo!r}); from ds_mlm.lock import DirLock; " \
       "l = DirLock({d!r}, 'training run').acquire(); print('held', flush=True); time.sleep(60)"


def test_second_holder_is_refused_with_the_first_named(tmp_path):
    with DirLock(str(tmp_path), "training run", flag="--output_dir"):
        with pytest.raises(LockHeld) as e:
            DirLock(str(tmp_path), "training run", flag="--output_dir").acquire()
    message = str(e.value)
    assert "--output_dir" in message and f"pid {os.getpid()}" in message and "since" in message
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit
    DirLock(str(tmp_path), "training run").acquire().release()  # and free again


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(lockmod.__file__)))
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=repo, d=str(tmp_path))], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld):
        DirLock(str(tmp_path), "training run").acquire()
    proc.kill()
    proc.wait()
    with DirLock(str(tmp_path), "training run") as mine:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == mine.token


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    # the holder's pid is alive (ours) but that process started later than the lock says: a dead job's lock
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(),
                                                  "pid_started": 1.0, "time": 1.0, "purpose": "old"}))
    DirLock(str(tmp_path), "training run").acquire().release()


def test_other_host_lock_goes_stale_by_its_heartbeat(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "pid_started": 1.0, "time": time.time()}))
    with pytest.raises(LockHeld):
        DirLock(str(tmp_path), "training run").acquire()
    old = time.time() - lockmod.STALE_SECONDS - 5
    os.utime(path, (old, old))
    DirLock(str(tmp_path), "training run").acquire().release()


def test_waiting_lock_takes_over_when_the_holder_leaves(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "POLL_SECONDS", 0.05)
    first = DirLock(str(tmp_path), "dataset build").acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(DirLock(str(tmp_path), "dataset build", wait=True).acquire()))
    waiter.start()
    time.sleep(0.3)
    assert not got  # still waiting
    first.release()
    waiter.join(5)
    assert got and got[0].holder()["token"] == got[0].token
    got[0].release()


def test_heartbeat_keeps_the_file_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "HEARTBEAT_SECONDS", 0.05)
    with DirLock(str(tmp_path), "training run") as held:
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_FILE, (old, old))
        time.sleep(0.3)
        assert held.holder()["age"] < 10


def test_a_wait_on_a_live_holder_gives_up_at_its_bound_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(lockmod, "HEARTBEAT_SECONDS", 0.05)  # the holder beats: never stale, perhaps hung
    beats = []
    with DirLock(str(tmp_path), "dataset build"):
        waiter = DirLock(str(tmp_path), "dataset build", wait=True, flag="--datasets_cache_dir", wait_limit=0.5,
                         idle=lambda: beats.append(1))
        with pytest.raises(LockHeld, match=r"waited 0 s for --datasets_cache_dir .*, still in use by dataset build on "
                                           r".*, pid \d+, since .*: if that job hangs, stop it"):
            waiter.acquire()
    assert beats  # the waiter's group heard from it meanwhile


def test_a_stopped_holder_on_this_host_goes_stale_by_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "STALE_SECONDS", 1.0)
    first = DirLock(str(tmp_path), "dataset build").acquire()
    first._stop.set()  # its process lives on, its heartbeat no longer beats (SIGSTOP stops every thread)
    old = time.time() - 5
    os.utime(tmp_path / LOCK_FILE, (old, old))
    second = DirLock(str(tmp_path), "dataset build").acquire()
    assert second.holder()["token"] == second.token
    second.release()
