"""Worker processes that run one function over a stream of tasks, results in submission order, and that nothing
outlives: not an error, not SIGTERM or SIGINT, not the parent's own death.

    with OrderedPool(function, workers) as pool:    # forked now: they inherit the parent's memory (the tokenizer)
        pool.submit(args)                           # task k goes to worker k % workers
        result = pool.next()                        # the result of the oldest task not yet returned

Task k goes to worker k % n and results are taken in the same order, so each worker's own queue is FIFO and the
output never depends on the number of workers. A worker that dies (the OOM killer) is noticed within POLL_SECONDS
and raises WorkerDied; an exception inside the function comes back as itself (UserError) or as a RuntimeError with
the worker's traceback.

Ending (issue 13: tokenizer workers orphaned by SIGTERM kept `| tee` waiting forever): leaving the `with` block by
an exception (an error, KeyboardInterrupt, errors.Terminated) terminates every worker, then kills what is left;
the workers ignore SIGINT (a terminal sends it to the whole process group: the parent decides) and take SIGTERM
with its default action; each asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), so even a
`kill -9` of the parent leaves no worker holding its stdout, its pipes or a temporary store open.
Why not multiprocessing.Pool or ProcessPoolExecutor: a Pool waits forever for a dead worker, and neither can end
its workers on demand before Python 3.14 without private attributes.
"""

import ctypes
import multiprocessing
import os
import queue
import signal
import time
import traceback

from ds_mlm.errors import UserError

POLL_SECONDS = 0.5
STUCK_SECONDS = 600.0  # a worker alive but silent this long on one task hangs (a task is one chunk: seconds)
_PR_SET_PDEATHSIG = 1
_STOPS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}  # blocked across the fork until a worker has its own handlers


class WorkerDied(Exception):
    """A worker process ended without returning its task's result (killed, or out of memory), or is alive but
    returned nothing for `stuck_seconds` (stopped, swapping, deadlocked)."""


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's `finally` is what ends the workers
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _serve(function, tasks, results, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # not the parent's handlers (errors.Terminated): just end
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # blocked across the fork; one that came meanwhile ends us now
    _die_with_parent(parent)
    # A fork keeps the parent's memory, not its threads: a Rust tokenizer whose thread pool ran in the parent
    # (TOKENIZERS_PARALLELISM=true, or set by the caller) would wait forever on pool threads that do not exist here.
    # Each worker is one core's share of the parallelism: its tokenizer runs in this thread (read at every call).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    while (task := tasks.get()) is not None:
        try:
            results.put((True, function(*task)))
        except Exception as e:  # noqa: BLE001 (sent back to the parent, which raises it)
            results.put((False, (isinstance(e, UserError), str(e), traceback.format_exc())))


class OrderedPool:
    """See the module docstring."""

    def __init__(self, function, workers: int, stuck_seconds: float = STUCK_SECONDS):
        if workers < 1:
            raise ValueError("an OrderedPool needs at least one worker")
        context = multiprocessing.get_context("fork")  # inherit the tokenizer instead of pickling it per worker
        self._tasks = [context.Queue() for _ in range(workers)]
        self._results = [context.Queue() for _ in range(workers)]
        self._procs = [context.Process(target=_serve, args=(function, t, r, os.getpid()), daemon=True,
                                       name=f"ds-mlm-worker-{k}")
                       for k, (t, r) in enumerate(zip(self._tasks, self._results))]
        self.submitted = self.returned = 0
        self.stuck_seconds = stuck_seconds
        # A stop signal between the fork and _serve's handlers would run the parent's handler in the child (a
        # Terminated traceback from multiprocessing's bootstrap, seen when an error ended a pool as it started):
        # the children are born with the stop signals blocked, and the parent takes its own a moment late.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            for proc in self._procs:
                proc.start()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.terminate()
            raise
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    @property
    def pids(self) -> list:
        return [p.pid for p in self._procs]

    @property
    def in_flight(self) -> int:
        return self.submitted - self.returned

    def submit(self, args: tuple) -> None:
        self._tasks[self.submitted % len(self._procs)].put(args)
        self.submitted += 1

    def next(self, idle=None):
        """The result of the oldest task not yet returned (blocks until it is there; `idle()` is called every
        POLL_SECONDS meanwhile: a heartbeat). A worker that died, or that is alive but silent for stuck_seconds, raises
        WorkerDied: the idle heartbeat must not keep a hung worker's caller looking alive forever."""
        if not self.in_flight:
            raise RuntimeError("OrderedPool.next() without a task in flight")
        k = self.returned % len(self._procs)
        started = time.monotonic()
        while True:
            try:
                ok, value = self._results[k].get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if idle is not None:
                    idle()
                if not self._procs[k].is_alive():
                    raise WorkerDied(f"worker {k} (pid {self._procs[k].pid}) died, exit code "
                                     f"{self._procs[k].exitcode}") from None
                if time.monotonic() - started > self.stuck_seconds:
                    raise WorkerDied(f"worker {k} (pid {self._procs[k].pid}) is alive but returned nothing for "
                                     f"{self.stuck_seconds:.0f} s: it hangs (stopped, swapping or deadlocked)") \
                        from None
        self.returned += 1
        if ok:
            return value
        user_error, message, trace = value
        if user_error:
            raise UserError(message)
        raise RuntimeError(f"a worker process failed:\n{trace}")

    def close(self) -> None:
        """Let the workers finish and exit (every result must have been taken)."""
        for tasks in self._tasks:
            tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
        self.terminate()  # anything still there after 10 s

    def terminate(self) -> None:
        """End every worker now: SIGTERM, then SIGKILL for any still alive a moment later."""
        for proc in self._procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            if proc.pid is not None:
                proc.join(timeout=2)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=2)
        for q in self._tasks + self._results:
            q.cancel_join_thread()  # a feeder thread blocked on a full pipe must not hold up the exit
            q.close()

    def __enter__(self) -> "OrderedPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()
