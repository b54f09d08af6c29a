"""Save on signal, the handler side: the first signal is a request, a duplicate is ignored, a later one exits now."""

import os
import signal
import subprocess
import sys
import time

import pytest

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

FAKE_LAUNCHER = """import subprocess, sys, time
rank = subprocess.Popen([sys.executable, sys.argv[1]])
print(rank.pid, flush=True)
sys.exit(rank.wait())
"""
WATCHING_RANK = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from ds_mlm import signals
chain = signals.watch_launcher(interval=0.1)
print(" | ".join(name for _, _, name in chain), flush=True)
with signals.StopOnSignal() as stop:
    deadline = time.monotonic() + 60
    while stop.requested is None and time.monotonic() < deadline:
        time.sleep(0.05)  # a training step
print("stopped by", stop.requested, flush=True)
sys.exit(signals.EXIT_PREEMPTED if stop.requested else 1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("over_ssh", [False, True], ids=["launcher", "ssh-session-above-it"])
def test_a_rank_whose_launcher_chain_breaks_stops_with_a_checkpoint(tmp_path, over_ssh):
    """The launcher (a stand-in named torchrun) is SIGKILLed; or, pdsh's case, the ssh session above it ends (a bash
    titled like sshd's session process) while the launcher lives on: either way the rank sees its chain change."""
    import psutil

    launcher = tmp_path / "torchrun"
    launcher.write_text(FAKE_LAUNCHER)
    (tmp_path / "rank.py").write_text(WATCHING_RANK)
    out = tmp_path / "rank.out"
    start = f"{sys.executable} {launcher} {tmp_path / 'rank.py'} > {out} 2>&1"
    if over_ssh:  # `exec -a` sets the title: "sshd: user@notty" runs a shell, which runs the launcher
        start = f"exec -a 'sshd: user@notty' bash -c \"bash -c {start!r}; true\""
    top = subprocess.Popen(["bash", "-c", start], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 30
    while len(out.read_text().splitlines() if out.exists() else []) < 2:
        assert time.monotonic() < deadline and top.poll() is None, out.read_text() if out.exists() else "no output"
        time.sleep(0.05)
    rank_pid, chain = out.read_text().splitlines()[:2]
    assert chain.startswith("torchrun") and ("sshd: user@notty" in chain) == over_ssh, chain
    rank = psutil.Process(int(rank_pid))
    fake_launcher = rank.parent()
    (top if over_ssh else fake_launcher).kill()
    try:
        rank.wait(30)  # not our child: no status to read; its last line says how it ended
    finally:
        for proc in (fake_launcher, rank):
            if proc.is_running():
                proc.kill()
    top.wait(10)
    text = out.read_text()
    assert "ds-mlm: its launcher is gone: " in text and "stopped by its launcher's end" in text.splitlines()[-1], text


def test_no_launcher_above_means_nothing_to_watch():
    assert signals.launcher_chain() == []  # pytest's parent is a shell or a terminal, not a launcher
    assert signals.is_launcher(["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert signals.is_launcher(["/v/bin/python3.11", "/v/bin/deepspeed", "--num_gpus", "2"])
    assert signals.is_launcher(["bash", "/repo/launch.sh"]) and not signals.is_launcher(["bash", "-c", "x"])
    assert not signals.is_launcher(["/v/bin/python", "-m", "pytest"]) and not signals.is_launcher([])
