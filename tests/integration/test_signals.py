"""Save on signal, the launcher watch end to end: a rank whose launcher is killed, or whose ssh session above the
launcher ends, sees its chain change and stops with a checkpoint (stand-in launchers, real processes). The handlers
themselves, fast: tests/unit/test_signals.py."""

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

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
