"""Training as two nodes on one machine (two deepspeed launchers, --no_ssh), failures, torch.distributed.launch.

Each run is a few steps of roberta-tiny on the small corpus. A "spy" wrapper around run_mlm.py records the loss every
rank logs (all-reduced, so the ranks must agree) and can make a rank die abruptly. The process helpers here are also
used by test_launch.py (which runs torchrun, through launch.sh).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DIST_ENV, REPO, free_port

pytestmark = pytest.mark.slow  # each test starts launchers and ranks
PYTHON = sys.executable
TINY = ["--architecture", "roberta-tiny", "--max_seq_length", "64", "--max_steps", "4", "--logging_steps", "1",
        "--save_steps", "4", "--per_device_train_batch_size", "4"]
SPY = '''"""run_mlm.py, plus: each rank appends every loss it logs to $SPY_DIR/rank$RANK.txt; with $DIE_AFTER_STEP set,
rank 1 exits abruptly (status 3) once it has logged that step; with $DIE_IN_BUILD set, rank 0 exits (status 4) while
building the dataset."""
import os
import sys
import time

sys.path.insert(0, {repo!r})
from ds_mlm import metrics, run_mlm
from ds_mlm.data import ensure

summary = metrics.Window.summary
logged = []


def spy(self, *args, **kwargs):
    out = summary(self, *args, **kwargs)
    logged.append(out["loss"])
    with open(os.path.join(os.environ["SPY_DIR"], f"rank{{os.environ['RANK']}}.txt"), "a") as f:
        print(repr(out["loss"]), file=f)
    if os.environ["RANK"] == "1" and str(len(logged)) == os.environ.get("DIE_AFTER_STEP"):
        os._exit(3)
    return out


def dying_build(*args, **kwargs):
    time.sleep(2)  # the other ranks are waiting by now
    os._exit(4)


metrics.Window.summary = spy
if os.environ.get("DIE_IN_BUILD") and os.environ["RANK"] == "0":
    ensure.build_shards = dying_build  # rank 0's share of the shards
run_mlm.cli_main()
'''


def write_spy(folder: Path) -> Path:
    path = folder / "spy_run_mlm.py"
    path.write_text(SPY.format(repo=str(REPO)))
    (folder / "spy").mkdir()
    return path


def spied_losses(folder: Path) -> list:
    """[rank 0's logged losses, rank 1's]."""
    return [(folder / "spy" / f"rank{r}.txt").read_text().split() for r in (0, 1)]


def start(cmd, log: Path, env=None) -> subprocess.Popen:
    """Start `cmd` in a process group of its own (so a stuck run can be killed whole), output to `log`."""
    inherited = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # an in-process test's world of one
    with open(log, "w") as out:
        return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env={**inherited, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs, logs, timeout: float) -> list:
    """Exit statuses of `procs`; past `timeout` seconds kill them all and fail, showing the logs."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        tails = "\n".join(f"--- {log}\n{Path(log).read_text()[-3000:]}" for log in logs)
        raise AssertionError(f"still running after {timeout} s\n{tails}") from None


def no_shm_leak(port: int) -> bool:
    """DeepSpeed's CPU all-reduce buffers are named ..._<addr>_<port>_<rank>: none may be left for our port."""
    return not [name for name in os.listdir("/dev/shm") if f"_{port}_" in name]


def two_node_pair(tmp_path, script, args, env=None, timeout=240):
    """Two deepspeed launchers, --no_ssh, node ranks 0 and 1 of a two-label hostfile: (statuses, logs, port)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")
    port = free_port()
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = [start([PYTHON, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--no_ssh", "--node_rank", n,
                    "--master_addr", "127.0.0.1", "--master_port", port, script, *args(n)], logs[n], env)
             for n in (0, 1)]
    return finish(procs, logs, timeout), [log.read_text() for log in logs], port


def test_two_nodes_with_node_local_caches_train_as_one_world(tmp_path, bpe_tokenizer_dir, small_corpus):
    spy = write_spy(tmp_path)
    out = tmp_path / "out"  # shared by both "nodes", as an output directory must be

    def args(node):
        return ["--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir", small_corpus[0], "--output_dir", out,
                "--datasets_cache_dir", tmp_path / f"cache-node{node}", "--cache_scope", "local", *TINY]

    statuses, logs, port = two_node_pair(tmp_path, spy, args, env={"SPY_DIR": str(tmp_path / "spy")})
    assert statuses == [0, 0], logs
    assert "x 2 processes" in logs[0]
    for node in (0, 1):  # each node built its own cache, once
        assert logs[node].count("train: built") == logs[node].count(f"rank {node}: train: built") == 1
        assert (tmp_path / f"cache-node{node}" / "train" / "manifest.json").is_file()
    rank0, rank1 = spied_losses(tmp_path)
    assert len(rank0) == 4 and rank0 == rank1  # one world: every logged loss is the mean over both ranks
    assert no_shm_leak(port)


def test_nodes_with_other_data_stop_with_one_line_naming_them(tmp_path, bpe_tokenizer_dir, small_corpus):
    other = tmp_path / "other-train"  # node 1's copy of the corpus lives elsewhere: other paths, other data
    other.mkdir()
    for f in small_corpus[0].iterdir():
        (other / f.name).write_bytes(f.read_bytes())

    def args(node):
        return ["--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir", [small_corpus[0], other][node],
                "--output_dir", tmp_path / "out", *TINY]

    statuses, logs, _ = two_node_pair(tmp_path, REPO / "ds_mlm" / "run_mlm.py", args, timeout=120)
    assert statuses == [2, 2]
    for log in logs:
        assert "ds-mlm: error: the training data differ between nodes: node 1 (" in log
    assert not (tmp_path / "out" / "datasets_cache" / "train").exists()  # stopped before any build


def test_a_rank_dying_ends_the_other_node_with_a_message(tmp_path, bpe_tokenizer_dir, small_corpus):
    spy = write_spy(tmp_path)

    def args(node):
        return ["--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir", small_corpus[0],
                "--output_dir", tmp_path / "out", *TINY, "--max_steps", "200"]

    statuses, logs, _ = two_node_pair(tmp_path, spy, args, timeout=120,
                                      env={"SPY_DIR": str(tmp_path / "spy"), "DIE_AFTER_STEP": "2"})
    assert statuses[1] == 3  # the launcher passes on its rank's status
    assert statuses[0] != 0
    assert statuses[0] == 3  # the surviving rank: one line, pointing at the other process's log
    assert "[rank 0] ds-mlm: error: lost contact with rank 1 on " in logs[0]  # named: its heartbeat stopped
    assert "it died, hangs or its network is cut; its own log says why" in logs[0] and "Traceback" not in logs[0]
    assert len(spied_losses(tmp_path)[0]) < 200


@pytest.mark.alone  # rank 1 must reach its last wait before rank 0 dies: a race lost under a neighbour's load
def test_the_builder_dying_ends_the_wait_on_the_other_node(tmp_path, bpe_tokenizer_dir, small_corpus):
    spy = write_spy(tmp_path)

    def args(node):
        return ["--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir", small_corpus[0],
                "--output_dir", tmp_path / "out", *TINY]

    statuses, logs, _ = two_node_pair(tmp_path, spy, args, timeout=120,
                                      env={"SPY_DIR": str(tmp_path / "spy"), "DIE_IN_BUILD": "1"})
    assert statuses == [4, 2], logs  # node 1 stops with a user-facing line, not a hang
    assert "rank 1: waiting for dataset build" in logs[1]
    assert "ds-mlm: error: rank 1: lost the job's rendezvous store while rank 0 was building the train" in logs[1]


def test_torch_distributed_launch_passes_local_rank_with_a_hyphen(tmp_path, bpe_tokenizer_dir, small_corpus):
    out, log = tmp_path / "out", tmp_path / "launch.log"
    proc = start([PYTHON, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port", free_port(),
                  REPO / "ds_mlm" / "run_mlm.py", "--tokenizer_name_or_path", bpe_tokenizer_dir,
                  "--train_dir", small_corpus[0], "--output_dir", out, *TINY], log)
    assert finish([proc], [log], 240) == [0], log.read_text()
    assert "x 2 processes" in log.read_text()
    assert (out / "checkpoint-4" / "rng_state_1.pt").is_file() and (out / "roberta_thai").is_dir()
