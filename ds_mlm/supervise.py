"""Run one command of a job so that stopping it stops all of it: the signal reaches every rank, the ranks get time to
finish (save a checkpoint), and after the grace period nothing of the job is left.

    python -m ds_mlm.supervise [--ranks-of MODULE] [--grace SECONDS] -- COMMAND...

launch.sh runs each of its commands this way (the launcher, and the demo's tokenizer training and fill-mask), because
the launchers do not stop their jobs on their own. Measured (deepspeed 0.19.8, torch 2.13):
  - `deepspeed.launcher.runner` without pdsh has no handler: SIGTERM kills it and `deepspeed.launcher.launch` and the
    ranks, re-parented to init, train on; SIGINT likewise, after a KeyboardInterrupt traceback.
  - `deepspeed.launcher.launch` (and it does the same when a rank fails): SIGTERM to each rank's process tree in turn,
    up to 30 s each, then SIGKILL, exit status 1 (the rank's own status when a rank failed first).
  - torchrun: the signal to each worker's process group, up to --shutdown_timeout (30 s), SIGKILL, then a
    SignalException traceback and exit status 1.

What this process does:
  - This process and COMMAND leave launch.sh's process group, so a terminal's Ctrl-C reaches launch.sh alone, which
    passes it here once; and this process is a child subreaper: whatever of the job is orphaned comes here, not to
    init.
  - On SIGTERM, SIGINT, SIGHUP or SIGUSR1 it sends that signal once to each rank: each child of a process running
    `python -m MODULE` (--ranks-of, the launcher's per-node agent), or COMMAND itself without --ranks-of, and anything
    orphaned here. Ranks that appear later (a signal during start-up) get it when they appear. A repeated signal is
    the same request. The launchers then wind down by their own rules as their ranks exit, and pass a status on.
  - When COMMAND ends but processes of its job are left (its launcher was killed), they are stopped the same way,
    with the signal that ended COMMAND (SIGTERM if it was another).
  - GRACE seconds after the signal, everything left is killed (SIGKILL).
  - If launch.sh itself dies (kill -9), this process gets SIGTERM (PR_SET_PDEATHSIG): the job stops, unsupervised
    it would run on. If this process dies (kill -9, the OOM killer), COMMAND gets SIGTERM the same way, and the ranks
    see their launcher chain change (ds_mlm.signals.watch_launcher): they save and stop.
Exit status: COMMAND's (128 + N when signal N ended it). After a stop, EXIT_PREEMPTED (75) when COMMAND or an
orphan of the job that ended here exited with it (the ranks saved a checkpoint: a launcher killed by the signal, or
deepspeed.launcher.launch killed, whose runner then says 0; the same when such orphans ended before the runner's 0
was noticed, so that no stop was begun here); otherwise a launcher's 0 or generic 1 (torchrun, and
deepspeed.launcher.launch when it was signalled itself) becomes 128 + the stop signal: a stopped job never says 0.
"""

import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
requests: list = []  # stop signals received, in order: appended by the handler, handled by the loop


def _request(signum, frame):
    requests.append(signum)


if __name__ == "__main__":  # first of all: a signal during the imports below is then a request, not a traceback
    for _sig in STOP_SIGNALS:
        signal.signal(_sig, _request)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import psutil  # noqa: E402

from ds_mlm.signals import EXIT_PREEMPTED, die_with_parent  # noqa: E402

PREFIX = "launch.sh"  # its only caller: the lines read as launch.sh's
POLL_SECONDS = 0.2  # while stopping: how often the process tree is looked at (new ranks, orphans, the end)
REAP_SECONDS = 10.0  # after SIGKILL: how long to wait for the kernel (a process in D state cannot die at once)
LAUNCHER_FAILED = 1  # what torchrun and deepspeed.launcher.launch exit with when signalled or a worker failed
# An agent without any child this long while stopping is waiting for something else (torchrun's rendezvous with the
# other nodes): it gets the signal itself. A child that is exiting, or exited and not yet reaped, still counts (a rank
# tearing down several GB under load took 13 s here): its agent is about to pass its status on, and a signal now
# would turn the ranks' 75 into the launcher's own 1 (or kill deepspeed.launcher.launch, whose runner then says 0).
AGENT_IDLE_SECONDS = 5.0
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


@dataclass
class Job:
    """One supervised command and what has been done to stop it."""

    command: list
    """The command line."""
    ranks_of: tuple = ()
    """Modules (`python -m M`) of the per-node agents whose children are the ranks; empty: COMMAND is the target."""
    grace: float = 30.0
    """Seconds from the stop signal to SIGKILL of whatever is left."""
    child: subprocess.Popen = None
    """COMMAND, once started."""
    status: int = None
    """COMMAND's exit status (negative: the signal that ended it), once it has ended."""
    stop: int = None
    """The signal the job is being stopped with, once it is."""
    deadline: float = None
    """time.monotonic() at which what is left gets SIGKILL."""
    signalled: set = field(default_factory=set)
    """(pid, start time) of every process sent the stop signal: each gets it once."""
    killed_at: float = None
    """time.monotonic() of the first SIGKILL."""
    childless: dict = field(default_factory=dict)
    """(pid, start time) of each agent seen without ranks while stopping -> since when (time.monotonic())."""
    orphans_ended: list = field(default_factory=list)
    """Exit statuses of the processes of the job re-parented here (orphans) that ended here."""

    def __post_init__(self):
        if not self.command:
            raise ValueError("no command to supervise")
        if self.grace < 0:
            raise ValueError(f"grace {self.grace} s: must be 0 or more")


def say(message: str) -> None:
    try:
        print(f"{PREFIX}: {message}", file=sys.stderr, flush=True)
    except OSError:  # a reader gone (`| tee` died with the Ctrl-C, the terminal hung up): stopping goes on, unheard
        sys.stderr = open(os.devnull, "w")


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: no subreaper, no parent-death signal
        return False


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _key(proc: psutil.Process):
    try:
        return proc.pid, proc.create_time()  # a pid alone may be reused
    except psutil.Error:
        return proc.pid, None


def _runs_module(proc: psutil.Process, modules: tuple) -> bool:
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return False
    return any(a == "-m" and b in modules for a, b in zip(argv, argv[1:]))


def _name(proc: psutil.Process) -> str:
    try:
        argv = proc.cmdline() or ["?"]
    except psutil.Error:
        argv = ["?"]
    if not os.path.basename(argv[0]).startswith("python"):
        return os.path.basename(argv[0])
    if "-m" in argv[1:-1] or "-c" in argv[1:-1]:  # of a Python process: its module or script, what a reader knows
        return argv[argv.index("-m") + 1] if "-m" in argv else "python -c"
    return os.path.basename(next((w for w in argv[1:] if not w.startswith("-")), "python"))


def live_tree() -> list:
    """Every live descendant of this process (orphans of the job included: they are re-parented here), and each
    child of ours that shows as a zombie but is not reaped yet: a multi-threaded rank's main thread ends first, and
    its status (75) only comes once its other threads have (seconds, under load)."""
    try:
        return [p for p in psutil.Process().children(recursive=True) if _alive(p) or _ours(p)]
    except psutil.Error:
        return []


def _ours(proc: psutil.Process) -> bool:
    try:
        return proc.ppid() == os.getpid()
    except psutil.Error:
        return False


def targets(job: Job, tree: list) -> list:
    """Who is sent the stop signal: the ranks (children of the agents), anything orphaned to this process, and
    without --ranks-of COMMAND itself. Not an agent (unless it has had no child for AGENT_IDLE_SECONDS) nor, with
    --ranks-of, the launcher above it: they would die or forward, and the ranks' exit status be lost on the way."""
    parents = {}
    for proc in tree:
        try:
            if proc.cmdline():  # empty while a process exits: it is past any handler, leave it be
                parents[proc.pid] = proc.ppid()
        except psutil.Error:
            pass
    agents = {p.pid: p for p in tree if job.ranks_of and p.pid in parents and _runs_module(p, job.ranks_of)}
    chosen = [p for p in tree if p.pid in parents and p.pid not in agents and (
        parents[p.pid] in agents or (parents[p.pid] == os.getpid() and (p.pid != job.child.pid or not job.ranks_of)))]
    now = time.monotonic()
    for pid, agent in agents.items():
        try:  # any child at all, also one exiting or exited but not yet reaped (its agent has yet to see its status)
            busy = bool(agent.children())
        except psutil.Error:
            busy = False
        if busy:
            job.childless.pop(_key(agent), None)
        elif now - job.childless.setdefault(_key(agent), now) >= AGENT_IDLE_SECONDS:
            chosen.append(agent)
    return chosen


def begin_stop(job: Job, signum: int, why: str) -> None:
    job.stop, job.deadline = signum, time.monotonic() + job.grace
    name = signal.Signals(signum).name
    who = "each rank" if job.ranks_of else "the command"
    say(f"{why}: stopping the job: {name} to {who}, SIGKILL to whatever is left after {job.grace:g} s "
        f"(STOP_GRACE_SECONDS)")


def describe(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def reap(job: Job) -> None:
    """Collect every ended child (COMMAND and adopted orphans); record COMMAND's status."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == job.child.pid:
            job.status = job.child.returncode = os.waitstatus_to_exitcode(wait_status)
        else:  # an orphan of the job (its launcher died): say how it ended, the launcher cannot any more
            job.orphans_ended.append(os.waitstatus_to_exitcode(wait_status))
            say(f"{pid} (orphaned here) ended: {describe(job.orphans_ended[-1])}")


def step(job: Job) -> bool:
    """One look at the job after an event or POLL_SECONDS: act on signals, orphans and the deadline. False when the
    job is over: COMMAND has ended and nothing of its job is left."""
    reap(job)
    while requests:
        signum = requests.pop(0)
        if job.stop is None:
            begin_stop(job, signum, signal.Signals(signum).name)
        elif time.monotonic() > job.deadline - job.grace + 1.0:  # not the echo of one delivery to several processes
            left = max(job.deadline - time.monotonic(), 0)
            say(f"{signal.Signals(signum).name} again: already stopping, SIGKILL in {left:.0f} s")
    if job.stop is None and job.status is None:
        return True  # running undisturbed: no need to look at the tree
    tree = live_tree()
    if job.stop is None and tree:
        ended = -job.status if job.status < 0 else None
        signum = ended if ended in STOP_SIGNALS else signal.SIGTERM
        begin_stop(job, signum, f"the launcher ended ({describe(job.status)}) but {len(tree)} processes of its job "
                                f"are still running")
    if job.stop is not None and job.killed_at is None:
        fresh = [p for p in targets(job, tree) if _key(p) not in job.signalled]
        names = [f"{p.pid} ({_name(p)})" for p in fresh]  # before the signal: a process may be gone right after
        for proc in fresh:
            job.signalled.add(_key(proc))
            try:
                proc.send_signal(job.stop)
            except psutil.Error:
                pass
        if fresh:
            say(f"{signal.Signals(job.stop).name} sent to " + ", ".join(names))
    if job.stop is not None and tree and time.monotonic() >= job.deadline:
        if job.killed_at is None:
            job.killed_at = time.monotonic()
            say(f"{len(tree)} processes of the job still running {job.grace:g} s after "
                f"{signal.Signals(job.stop).name}: killing them: " + ", ".join(f"{p.pid} ({_name(p)})" for p in tree))
        for proc in tree:  # again on every look: a process forked meanwhile is killed too
            try:
                proc.kill()
            except psutil.Error:
                pass
        if time.monotonic() - job.killed_at > REAP_SECONDS:
            say("still there after SIGKILL (uninterruptible): " + ", ".join(str(p.pid) for p in tree))
            return False
    return job.status is None or bool(tree)


def exit_status(job: Job) -> int:
    code = job.status if job.status is not None else -signal.SIGKILL
    code = 128 - code if code < 0 else code
    # the ranks saved a checkpoint of the step reached: resumable. Also without a stop begun here: ranks whose launcher
    # was killed save and may end before COMMAND's own end (the runner's 0) is noticed with them still running
    if EXIT_PREEMPTED in (code, *job.orphans_ended) and (job.stop is not None or code in (0, LAUNCHER_FAILED)):
        return EXIT_PREEMPTED
    if job.stop is not None and code in (0, LAUNCHER_FAILED):
        code = 128 + job.stop
    return code


def supervise(job: Job) -> int:
    """Start COMMAND and look after it until nothing of its job is left; its exit status (see the module docstring)."""
    parent = os.getppid()
    try:
        os.setpgid(0, 0)  # out of launch.sh's group (see the docstring); COMMAND stays in this one
    except OSError:
        pass  # a session leader already: no terminal group to leave
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if _prctl(PR_SET_PDEATHSIG, signal.SIGTERM) and os.getppid() != parent:
        requests.append(signal.SIGTERM)  # the parent died before the death signal was armed
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_write)  # every signal (SIGCHLD included) ends the wait below at once
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    if requests:  # stopped before anything started: start nothing
        say(f"{signal.Signals(requests[0]).name} received before the start: nothing run")
        return 128 + requests[0]
    # if this process dies (kill -9, the OOM killer), COMMAND gets SIGTERM: the launchers pass it on or die of it
    job.child = subprocess.Popen(job.command, preexec_fn=die_with_parent(signal.SIGTERM))
    while step(job):
        idle = job.stop is None and job.status is None
        select.select([wake_read], [], [], None if idle else POLL_SECONDS)
        try:
            os.read(wake_read, 4096)
        except BlockingIOError:
            pass
    reap(job)  # an orphan that became a zombie after the last look: its status (a rank's 75) counts
    return exit_status(job)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_mlm.supervise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks-of", action="append", default=[], metavar="MODULE",
                        help="the ranks are the children of processes running `python -m MODULE` (repeatable)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds from the stop signal to SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.grace < 0:
        parser.error("give --grace >= 0 and a command after --")
    return supervise(Job(command=command, ranks_of=tuple(args.ranks_of), grace=args.grace))


if __name__ == "__main__":
    sys.exit(main())
