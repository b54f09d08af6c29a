"""Save on signal: a preempted run ends with a checkpoint of the step it reached, not with the work since the last
one lost.

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
"""

import os
import signal
import sys
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DUPLICATE_SECONDS = 2.0
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, resumable; run the same command again


class StopOnSignal:
    """See the module docstring; `requested` is the first signal's name, or None."""

    def __init__(self, enabled: bool = True, prefix: str = ""):
        self.enabled, self.prefix = enabled, prefix
        self.requested = None
        self._first_at = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._first_at = name, now
            print(f"{self.prefix}ds-mlm: {name}: finishing this step, saving a checkpoint, then exiting with status "
                  f"{EXIT_PREEMPTED} (send it again to exit at once)", file=sys.stderr, flush=True)
        elif now - self._first_at > DUPLICATE_SECONDS:
            print(f"{self.prefix}ds-mlm: {name} again: exiting now, without saving (the newest complete checkpoint "
                  "is intact)", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def __enter__(self) -> "StopOnSignal":
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        from ds_mlm.errors import ignore_stop_signals

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.requested is not None:
            ignore_stop_signals()
