"""Save on signal, the handler side: the first signal is a request, a duplicate is ignored, a later one exits now.
The launcher watch end to end (a killed launcher, an ended ssh session): tests/integration/test_signals.py."""

import os
import signal
import subprocess
import sys
import time

from conftest import REPO
from ds_mlm import signals
from ds_mlm.signals import EXIT_PREEMPTED, StopOnSignal

SECOND_SIGNAL = f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
from ds_mlm import signals
signals.DUPLICATE_SECONDS = 0.2
with signals.StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)  # the same request delivered twice (a launcher forwarding it)
    assert stop.requested == "SIGTERM"
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGUSR1)  # a second request: out at once
    time.sleep(5)
print("not reached")
"""


def test_first_signal_is_a_request_then_late_duplicates_are_ignored(capsys):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        with StopOnSignal() as stop:
            assert stop.requested is None
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            assert stop.requested == "SIGUSR1"
            os.kill(os.getpid(), signal.SIGTERM)  # within DUPLICATE_SECONDS: the same request
            time.sleep(0.05)
        # the run is leaving with its checkpoint: a launcher's late SIGTERM must not change its exit status
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in before)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert err.count("ds-mlm: SIGUSR1: finishing this step, saving a checkpoint, then exiting with status "
                     f"{EXIT_PREEMPTED}") == 1


def test_without_a_request_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_disabled_installs_nothing():
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    with StopOnSignal(enabled=False) as stop:
        assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before
    assert stop.requested is None


def test_a_second_signal_later_exits_at_once():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR1 and "not reached" not in proc.stdout
    assert "SIGUSR1 again: exiting now, without saving" in proc.stderr
    assert time.monotonic() - started < 20


# -- the launcher watch: a rank whose launcher has gone stops ---------------------------------------------------------

def test_no_launcher_above_means_nothing_to_watch():
    assert signals.launcher_chain() == []  # pytest's parent is a shell or a terminal, not a launcher
    assert signals.is_launcher(["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert signals.is_launcher(["/v/bin/python3.11", "/v/bin/deepspeed", "--num_gpus", "2"])
    assert signals.is_launcher(["bash", "/repo/launch.sh"]) and not signals.is_launcher(["bash", "-c", "x"])
    assert not signals.is_launcher(["/v/bin/python", "-m", "pytest"]) and not signals.is_launcher([])
