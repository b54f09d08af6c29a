"""Save on signal: a preempted run ends with a checkpoint of the step it reached, not with the work since the last
one lost.

    watch_launcher()                              # at the start of a rank: its launcher's end is a stop request
    with StopOnSignal(enabled=True) as stop:      # while the training loop runs
        ... at each step boundary: if trainer agrees stop.requested on every rank: save, exit EXIT_PREEMPTED

The first SIGTERM, SIGINT or SIGUSR1 only records the request (one line says so); the loop finishes the optimizer
step it is in, every rank agrees at the next boundary (one all-reduce, so no rank waits in a collective the
others left), they save a complete checkpoint and exit with status EXIT_PREEMPTED. A second signal more than
DUPLICATE_SECONDS later exits at once (os._exit): a save it interrupts has no COMPLETE marker yet, so the newest
complete checkpoint is untouched. Signals within DUPLICATE_SECONDS of the first are the same request delivered twice
(Ctrl-C reaches every process of the terminal's group and the launcher forwards it too; Slurm signals every process
of the step), not a second request. Outside this block, errors.cli's handlers apply (unwind, exit 128 + signal);
after a requested stop they are not restored: the process is leaving with its checkpoint, and a late duplicate (a
launcher signalling the ranks that are left once one has exited) is ignored rather than changing its exit status.

The launcher's end. A launcher that dies without passing its signal on (the deepspeed runner has no handler; any
of them killed with SIGKILL, or by the OOM killer; the ssh session of a pdsh rank closed) leaves its ranks re-parented
and training on. So a rank records, at its start, its chain of launcher ancestors: the processes of the known
launchers above it (LAUNCHERS; `bash launch.sh`), and, where the top one was started by a non-interactive ssh
session (pdsh), the shells and the `sshd: USER@notty` session above it. A thread looks at that chain every
WATCH_SECONDS (a few reads of /proc); once any of it has ended, the rank stops as on SIGTERM: inside the block above
a request like a signal's (checkpoint, EXIT_PREEMPTED), elsewhere SIGTERM to itself (errors.cli: exit 143). A signal
arriving after such a request counts as the first (the launcher's own forwarding of it is not a second request).
The processes above the top launcher (the user's shell, a nohup's parent) are not watched: they may go.
"""

import os
import select
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DUPLICATE_SECONDS = 2.0
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, resumable; run the same command again
WATCH_SECONDS = 1.0  # how often a rank looks at its launcher chain: the bound on noticing its end
# `python -m MODULE` or a console script of that name: the processes that start ranks, theirs and ours
LAUNCHERS = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
             "torch.distributed.launch", "ds_mlm.supervise", "deepspeed", "ds", "torchrun")
SHELLS = ("bash", "sh", "dash")  # between a remote launcher and its ssh session (pdsh runs `sh -c "cd ...; python"`)
PR_SET_PDEATHSIG = 1
_active = None  # the StopOnSignal inside which the training loop runs, if any: the watcher's request goes there
_stopping = threading.Event()  # a stop was requested (signal or launcher's end): the watcher has nothing left to do


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # its reader gone (the ssh session of a pdsh rank): stopping goes on, unheard
        pass


class StopOnSignal:
    """See the module docstring; `requested` is the first signal's name (or "its launcher's end"), or None."""

    def __init__(self, enabled: bool = True, prefix: str = ""):
        self.enabled, self.prefix = enabled, prefix
        self.requested = None
        self._first_at = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._first_at is None:  # the first signal (perhaps after the launcher's end was noticed)
            self._first_at = now
            if self.requested is None:
                self.request(name)
        elif now - self._first_at > DUPLICATE_SECONDS:
            _say(f"{self.prefix}ds-mlm: {name} again: exiting now, without saving (the newest complete checkpoint "
                 "is intact)")
            os._exit(128 + signum)

    def request(self, why: str, label: str = None) -> None:
        """Stop at the next step boundary with a checkpoint (a signal's handler, or the launcher watch); `requested`
        becomes `label` (default: `why`)."""
        if self.requested is None:
            self.requested = label or why
            _stopping.set()
            _say(f"{self.prefix}ds-mlm: {why}: finishing this step, saving a checkpoint, then exiting with status "
                 f"{EXIT_PREEMPTED} (send a signal again to exit at once)")

    def __enter__(self) -> "StopOnSignal":
        global _active
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        from ds_mlm.errors import ignore_stop_signals

        _active = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.requested is not None:
            ignore_stop_signals()


# -- the launcher watch ----------------------------------------------------------------------------------------------

def _stat(pid: int):
    """(state, parent pid, start time in clock ticks) of `pid` from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _argv(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_launcher(argv: list) -> bool:
    """Is this command line one of LAUNCHERS (`python -m M`, `python .../M`, `M`) or `bash launch.sh`?"""
    names = [os.path.basename(a) for a in argv[:3]]
    if "-m" in argv[1:3]:
        return argv[argv.index("-m") + 1] in LAUNCHERS if argv.index("-m") + 1 < len(argv) else False
    if names and names[0] in SHELLS:
        return len(names) > 1 and names[1] == "launch.sh"
    if names and names[0].startswith("python"):
        return len(names) > 1 and names[1] in LAUNCHERS
    return bool(names) and names[0] in LAUNCHERS


def _launcher_name(argv: list) -> str:
    """What a reader knows it by: the module of `python -m M`, the script of `python S` or `bash launch.sh`."""
    if "-m" in argv[1:3] and argv.index("-m") + 1 < len(argv):
        return argv[argv.index("-m") + 1]
    return os.path.basename(argv[1] if len(argv) > 1 else argv[0])


def launcher_chain(pid: int = None) -> list:
    """[(pid, start time, name)] of the launcher ancestors of `pid` (this process), nearest first; see the module
    docstring. Empty when it was not started by a launcher (or an ancestor ended while it was being read)."""
    here = _stat(os.getpid() if pid is None else pid)
    chain, shells, pid = [], [], here[1] if here else 0
    while pid > 1 and (argv := _argv(pid)) and (stat := _stat(pid)):
        name = os.path.basename(argv[0])
        if not shells and is_launcher(argv):
            chain.append((pid, stat[2], _launcher_name(argv)))
        elif chain and name in SHELLS and len(shells) < 2:  # above the top launcher: shells, then an ssh session
            shells.append((pid, stat[2], name))
        elif chain and name.startswith("sshd") and "@notty" in " ".join(argv):  # its title: "sshd: USER@notty"
            return chain + shells + [(pid, stat[2], " ".join(argv).strip())]
        else:
            break
        pid = stat[1]
    return chain


def chain_broken(chain: list):
    """None while every process of `chain` runs with the same parent as at the start, else which one ended."""
    below = os.getpid()
    for pid, started, name in chain:
        mine, above = _stat(below), _stat(pid)
        if mine is None or mine[1] != pid or above is None or above[2] != started or above[0] in "ZX":
            return f"{name} (pid {pid}) ended"
        below = pid
    return None


class Unbroken:
    """sys.stdout / sys.stderr of a rank under a launcher: once a write fails because nobody reads any more (EPIPE:
    the ssh session of a pdsh rank closed, a `| tee` gone), the stream goes to /dev/null and the run goes on to its
    checkpoint instead of dying of BrokenPipeError on its next progress line."""

    def __init__(self, stream):
        self.stream = stream

    def _silenced(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.stream.fileno())
        os.close(null)

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._silenced()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._silenced()
            self.stream.flush()  # what was buffered goes to /dev/null: the next flush (at exit too) succeeds

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _quiet_if_unread() -> None:
    """stdout and stderr to /dev/null where nobody reads them any more (a pipe or socket whose reader is gone: the
    ssh session's), so that the lines on the way out do not fail with BrokenPipeError."""
    poller = select.poll()
    for fd in (1, 2):
        poller.register(fd, 0)  # no event asked for: POLLERR / POLLHUP are reported anyway
    for fd, events in poller.poll(0):
        if events & (select.POLLERR | select.POLLHUP):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)


def _watch(chain: list, interval: float, prefix: str) -> None:
    while not _stopping.wait(interval):
        why = chain_broken(chain)
        if why is None:
            continue
        _quiet_if_unread()
        if _stopping.is_set():
            return
        _stopping.set()
        active = _active
        if active is not None:
            active.request(f"its launcher is gone: {why}", label="its launcher's end")
        else:
            _say(f"{prefix}ds-mlm: its launcher is gone: {why}: stopping (SIGTERM to itself)")
            os.kill(os.getpid(), signal.SIGTERM)
        return


def watch_launcher(interval: float = WATCH_SECONDS, prefix: str = "") -> list:
    """Start the watch of this process's launcher chain (once per process), and make its output survive its reader
    (Unbroken); the chain, empty when there is none."""
    global _watcher
    if _watcher is not None or sys.platform != "linux":
        return _watcher or []
    _watcher = launcher_chain()
    if _watcher:
        sys.stdout, sys.stderr = Unbroken(sys.stdout), Unbroken(sys.stderr)
        threading.Thread(target=_watch, args=(_watcher, interval, prefix), name="ds-mlm-launcher-watch",
                         daemon=True).start()
    return _watcher


_watcher = None


def die_with_parent(signum: int = signal.SIGKILL):
    """A subprocess preexec_fn: the child gets `signum` when the process that started it ends (PR_SET_PDEATHSIG;
    None off Linux). Made here, in the parent, so that the child, forked from a process with threads, only calls."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
