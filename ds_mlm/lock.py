"""An exclusive lock on a directory for as long as a job uses it: one training run per `--output_dir`, one builder
per dataset cache. Valid on local disks, NFS and Lustre.

    with DirLock(output_dir, "training run") as lock:    # raises LockHeld (a one-line UserError) if held
        ...
    with DirLock(cache_dir, "dataset build", wait=True):  # waits while another job holds it, then takes it
                                                          # (at most wait_limit seconds: LockHeld after that)

The lock is a file, DIR/.ds-mlm.lock, created with O_CREAT | O_EXCL (atomic on local file systems, on NFSv3 and
later, and on Lustre), holding who took it: host, pid, the process's start time and the wall time. While held, a
thread touches it every HEARTBEAT_SECONDS. A lock is stale, and taken over, when its holder is on this host and that
process is gone (kill -9 included: the pid is dead or now belongs to a process started later), or when its
heartbeat is older than STALE_SECONDS (a holder on another host that died or lost the file system, or a stopped one).
A holder whose heartbeat thread beats while its work hangs is never stale: a waiter gives up after wait_limit
seconds (LOCK_WAIT_SECONDS), naming the holder, and says every SAY_WAITING_EVERY seconds that it still waits.
Taking over renames the stale file to a unique name first, so of several jobs racing for a stale lock exactly one wins.

Why not fcntl/flock: Lustre mounted without `-o flock` refuses them or keeps them node-local (`localflock`), NFS
lock recovery after a client crash takes the server's grace period, and a POSIX lock silently vanishes when any
other file descriptor of the same file is closed in the process. A file with a heartbeat behaves the same on all.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid

import psutil

from ds_mlm.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".ds-mlm.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # 10 missed heartbeats: generous against clock skew between nodes and slow file systems
POLL_SECONDS = 1.0
LOCK_WAIT_SECONDS = 6 * 3600.0  # a dataset build of a large corpus by another job may take hours: then it hangs
SAY_WAITING_EVERY = 300.0


class LockHeld(UserError):
    """The directory is locked by a live job."""


def _process_started(pid: int):
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # alive, not ours to inspect


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"{holder.get('purpose', 'a job')} on {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {started}"


class DirLock:
    """See the module docstring. `acquire()` / `release()`, or use it as a context manager."""

    def __init__(self, directory: str, purpose: str, wait: bool = False, flag: str = "the directory",
                 wait_limit: float = LOCK_WAIT_SECONDS, idle=None):
        self.directory, self.purpose, self.wait, self.flag = directory, purpose, wait, flag
        self.wait_limit, self.idle = wait_limit, idle  # idle(): called while waiting (a heartbeat to a build group)
        self.path = os.path.join(directory, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None

    # -- taking it --------------------------------------------------------------------------------------------------

    def acquire(self) -> "DirLock":
        started = said = None
        while True:
            if self._try_create():
                break
            holder = self.holder()
            if holder is None or self._stale(holder):
                self._take_over(holder)
                continue
            if not self.wait:
                raise LockHeld(f"{self.flag} {self.directory} is in use by another {_describe(holder)}: wait for it "
                               f"to finish, stop it, or give another {self.flag}")
            now = time.monotonic()
            started = started or now
            if now - started > self.wait_limit:
                raise LockHeld(f"waited {self.wait_limit:.0f} s for {self.flag} {self.directory}, still in use by "
                               f"{_describe(holder)}: if that job hangs, stop it; or give another {self.flag}")
            if said is None or now - said > SAY_WAITING_EVERY:
                log.warning("waiting for %s: in use by %s (for %.0f s, giving up after %.0f s)", self.directory,
                            _describe(holder), now - started, self.wait_limit)
                said = now
            if self.idle is not None:
                self.idle()
            time.sleep(POLL_SECONDS)
        self._thread = threading.Thread(target=self._heartbeat, name="ds-mlm-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _try_create(self) -> bool:
        me = {"purpose": self.purpose, "host": socket.gethostname(), "pid": os.getpid(),
              "pid_started": _process_started(os.getpid()), "time": time.time(), "token": self.token}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise UserError(f"cannot lock {self.flag} {self.directory} ({e.strerror}): give a writable directory") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(me) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def holder(self):
        """Who holds the lock (the file's JSON, plus its heartbeat age in seconds), or None when it is free."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:  # a holder that died between creating and writing it
            holder = {}
        return {**holder, "age": age} if isinstance(holder, dict) else {"age": age}

    def _stale(self, holder: dict) -> bool:
        if "pid" not in holder:  # empty or unreadable: stale once it has had time to be written
            return holder["age"] > 10 * POLL_SECONDS
        if holder["age"] > STALE_SECONDS:  # no heartbeat: dead, stopped, or cut off from the file system
            return True
        if holder.get("host") == socket.gethostname():
            started = _process_started(int(holder["pid"]))
            return started is None or (started > 0 and holder.get("pid_started") not in (None, -1.0)
                                       and abs(started - holder["pid_started"]) > 1.0)
        return False

    def _take_over(self, holder) -> None:
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)  # exactly one racer moves it
        except FileNotFoundError:
            return
        os.remove(aside)
        if holder:
            log.warning("took over the lock of %s from a dead %s", self.directory, _describe(holder))

    # -- holding it -------------------------------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the file system is away for a moment: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        holder = self.holder()
        if holder is not None and holder.get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
