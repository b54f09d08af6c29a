"""User-facing errors: one line that says what is wrong and how to fix it, then a non-zero exit.

Anything raised as `UserError` is a mistake the user can fix (a flag, a path, a file); the `cli` wrapper prints it as
`ds-mlm: error: <message>` and exits with status 2, without a traceback. A collective that fails because another
process of the job died, or stopped answering for --distributed_timeout_minutes, is one line too (status 3) naming
that process when the job's store can tell (peers.py): the cause is in its log, not in this traceback.
Every other exception is a bug and keeps its traceback.
"""

import atexit
import functools
import logging
import os
import signal
import sys

EXIT_USER_ERROR = 2
EXIT_PEER_LOST = 3
# What gloo / NCCL say on a surviving rank when another process of the job died: not this rank's fault, not a bug here
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             # ... and when a peer stopped answering (a hung host, a cut link) for --distributed_timeout_minutes
             "Timed out waiting", "wait timeout after", "Socket Timeout", "Watchdog caught collective operation timeout")
lost_peer_hint = None  # set by distributed.init: () -> "rank 2 on n3", the peers that stopped answering


class UserError(Exception):
    """A mistake in the user's input; the message says what is wrong and how to fix it."""


class PeerLost(UserError):
    """Another process of the job died or stopped answering (exit status EXIT_PEER_LOST)."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP reached the main thread: unwind (every `finally` runs: workers stopped, temp files removed),
    then exit with 128 + the signal's number. A BaseException, so no `except Exception` swallows it. (The training
    loop replaces this with save-on-signal while it runs.)"""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def install_stop_handlers() -> None:
    """SIGTERM and SIGHUP raise Terminated in the main thread (SIGINT raises KeyboardInterrupt already)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_terminated if sig != signal.SIGINT else signal.default_int_handler)


def ignore_stop_signals() -> None:
    """The process has decided how it ends: a late duplicate of a signal (a launcher forwarding it once a peer has
    exited) must not turn that ending into another one while the interpreter shuts down."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def is_peer_loss(error: BaseException) -> bool:
    """Is `error` torch.distributed's word that another process of the job died, hangs or is cut off?"""
    return isinstance(error, RuntimeError) and any(words in str(error) for words in PEER_LOST)


_status = None  # the status a cli() command exits with, once it has decided


def _exit(code: int) -> None:
    global _status
    ignore_stop_signals()
    _status = code
    sys.exit(code)


def exit_without_teardown() -> None:
    """For a process's main script, called before the heavy imports: once every later atexit handler has run, a
    command that decided its status exits with it at once. The interpreter's teardown of torch, DeepSpeed and their
    C++ statics took 1.7 s after a finished run here (HF's script pays less: fewer modules), and is where exit-time
    crashes of C++ destructors live. Non-daemon threads were joined before atexit; an uncaught traceback exits as usual."""

    def finish():
        if _status is None:
            return
        logging.shutdown()  # its own atexit handler was registered before this one, so it would not run
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nothing more to say
                pass
        os._exit(_status)

    atexit.register(finish)


def _rank_prefix() -> str:
    # In a multi-process job every rank would print the same line; say which one spoke.
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _note_lost(line: str) -> None:
    """Add `line` to $DS_MLM_LOST_FILE (launch.sh ends a failed job with its first line: who was lost)."""
    path = os.environ.get("DS_MLM_LOST_FILE")
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass  # a courtesy: the rank's own line has been printed


def cli(main):
    """Wrap `main(argv=None) -> int` so that a UserError becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        install_stop_handlers()
        try:
            code = main(argv)
        except UserError as e:
            message = " ".join(str(e).split("\n"))  # one line, always
            print(f"{_rank_prefix()}ds-mlm: error: {message}", file=sys.stderr, flush=True)
            if isinstance(e, PeerLost):
                _note_lost(message)
            _exit(EXIT_PEER_LOST if isinstance(e, PeerLost) else EXIT_USER_ERROR)
        except RuntimeError as e:  # torch.distributed.DistBackendError is one too
            if not is_peer_loss(e):
                raise
            who = (lost_peer_hint() if lost_peer_hint is not None else "") or "another process of the job"
            _note_lost(f"rank {os.environ.get('RANK', '0')} lost contact with {who}")
            print(f"{_rank_prefix()}ds-mlm: error: lost contact with {who} ({type(e).__name__}: {_first_line(e)}): "
                  "it died, hangs or its network is cut; its own log says why", file=sys.stderr, flush=True)
            _exit(EXIT_PEER_LOST)
        except KeyboardInterrupt:
            print(f"{_rank_prefix()}ds-mlm: interrupted", file=sys.stderr, flush=True)
            _exit(128 + signal.SIGINT)
        except Terminated as e:
            print(f"{_rank_prefix()}ds-mlm: stopped by {signal.Signals(e.signum).name}", file=sys.stderr, flush=True)
            _exit(128 + e.signum)
        _exit(code or 0)

    return wrapper
