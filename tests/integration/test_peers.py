"""peers.py end to end: a peer that stops answering (SIGSTOP: alive, holding its sockets, like a hung host or one
behind a cut link) ends the job within --distributed_timeout_minutes, with one line naming it: in a collective while
training, and while the build group waits for a member. Two deepspeed launchers (--no_ssh) on the loopback, as
test_distributed_launchers. The waits themselves, fast: tests/unit/test_peers.py.
"""

import os
import signal
import socket

import pytest

from conftest import REPO, free_port
from integration.test_distributed_launchers import PYTHON, TINY, finish, start

pytestmark = pytest.mark.slow
SPY = '''import os, signal, sys
sys.path.insert(0, {repo!r})
from ds_mlm import metrics, run_mlm
from ds_mlm.data import ensure

summary, build, logged = metrics.Window.summary, ensure.build_shards, []


def spy(self, *args, **kwargs):
    out = summary(self, *args, **kwargs)
    logged.append(out["loss"])
    if os.environ["RANK"] == "1" and str(len(logged)) == os.environ.get("STOP_AFTER_STEP"):
        os.kill(os.getpid(), signal.SIGSTOP)  # alive, silent: a hung host
    return out


def stuck_build(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSTOP)


metrics.Window.summary = spy
if os.environ.get("STOP_IN_BUILD") and os.environ["RANK"] == "1":
    ensure.build_shards = stuck_build
run_mlm.cli_main()
'''
TIMEOUT_MINUTES = 0.25  # 15 s: what each test waits out; the ranks of two launchers started side by side meet
# at each collective within seconds of each other, even on a loaded machine


def stopped_pair(tmp_path, tokenizer, corpus, env):
    """Node 0's status and log once it ended (node 1 holds a stopped rank: killed after)."""
    spy = tmp_path / "spy.py"
    spy.write_text(SPY.format(repo=str(REPO)))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")
    port, logs = free_port(), [tmp_path / f"node{n}.log" for n in (0, 1)]
    args = ["--tokenizer_name_or_path", tokenizer, "--train_dir", corpus, "--output_dir", tmp_path / "out", *TINY,
            "--max_steps", "200", "--distributed_timeout_minutes", str(TIMEOUT_MINUTES)]
    procs = [start([PYTHON, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--no_ssh", "--node_rank", n,
                    "--master_addr", "127.0.0.1", "--master_port", port, spy, *args], logs[n], env)
             for n in (0, 1)]
    try:
        status = finish(procs[:1], logs, 300)[0]  # a bound, not a timing: without one it waited forever
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return status, logs[0].read_text()


def test_a_stopped_rank_ends_training_with_one_line_naming_it(tmp_path, bpe_tokenizer_dir, small_corpus):
    status, log = stopped_pair(tmp_path, bpe_tokenizer_dir, small_corpus[0], {"STOP_AFTER_STEP": "2"})
    assert status == 3, log
    lines = [line for line in log.splitlines() if "ds-mlm: error:" in line]
    assert len(lines) == 1, log
    assert f"[rank 0] ds-mlm: error: lost contact with rank 1 on {socket.gethostname()} (" in lines[0]
    assert "it died, hangs or its network is cut" in lines[0] and "Traceback" not in log


def test_a_stopped_member_ends_the_build_with_one_line_naming_it(tmp_path, bpe_tokenizer_dir, small_corpus):
    status, log = stopped_pair(tmp_path, bpe_tokenizer_dir, small_corpus[0], {"STOP_IN_BUILD": "1"})
    assert status == 3, log
    assert (f"[rank 0] ds-mlm: error: rank 0: rank 1 on {socket.gethostname()} stopped answering (no heartbeat for "
            f"{TIMEOUT_MINUTES * 60:.0f} s, --distributed_timeout_minutes) while this rank waited for the members' "
            "shares of the train dataset") in log, log
    assert "Traceback" not in log
