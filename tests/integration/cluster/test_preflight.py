"""launch.sh's host preflight (ds_mlm/hosts.py) on the test cluster: each failure made real on real hosts, and each
named in one line before any rank starts (exit status 2, no launcher run, no process on any host)."""

import shutil
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def job(cluster, tmp_path, small_corpus, bpe_tokenizer_dir):
    """A job's working directory, its variables, and a tokenizer of its own (tmp_path/disk/tokenizer)."""
    tokenizer = tmp_path / "disk" / "tokenizer"
    shutil.copytree(bpe_tokenizer_dir, tokenizer)
    (tmp_path / "cwd").mkdir()
    variables = {"HOSTFILE": cluster.hostfile(cluster.hosts), "PROJECT_TRAIN_DIR": small_corpus[0],
                 "PROJECT_TOKENIZER": tokenizer, "PROJECT_OUTPUT_DIR": tmp_path / "out", "PROJECT_MAX_STEPS": 2}
    return tmp_path, variables


def launch(cluster, job, env=None, **more):
    root, variables = job
    command = " ".join(f"{k}={v}" for k, v in {**variables, **more}.items())
    proc = cluster.run(cluster.head, f"{command} bash {REPO}/launch.sh", cwd=root / "cwd", env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "deepspeed.launcher.runner" not in proc.stdout  # nothing started...
    assert {h: cluster.pids(h) for h in cluster.hosts} == {h: [] for h in cluster.hosts}
    assert sorted(p.name for p in (root / "out").iterdir()) == ["launch"]  # ...nor written, but the job's hostfile
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_pdsh_missing(cluster, job, tmp_path):
    bare = tmp_path / "bin-without-pdsh"  # this node's PATH without pdsh, everything else as it is
    bare.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "pdsh":
            (bare / tool.name).symlink_to(tool)
    env = {**cluster.env, "PATH": f"{cluster.tmp}/bin:{bare}"}  # the ssh wrapper first, as always
    lines = launch(cluster, job, env=env)
    assert lines == ["launch.sh: error: pdsh is not installed on this node (the deepspeed launcher starts the other "
                     "nodes with it): install it (apt-get install pdsh), or choose another backend with "
                     "LAUNCHER_ARGS=\"--launcher openmpi\""]


def test_unreachable_host_missing_python_and_missing_tokenizer(cluster, job):
    root, variables = job
    python_dir = REPO / ".venv" / "bin"
    cluster.run("n1", f"mount -t tmpfs tmpfs {root}/disk", check=True)  # n1's disk lacks the tokenizer
    cluster.run("n2", f"mount -t tmpfs tmpfs {python_dir}", check=True)  # n2 has no .venv/bin/python
    cluster.cut("n3")  # n3 is off the network
    try:
        lines = launch(cluster, job)
    finally:
        cluster.restore("n3")
        cluster.run("n2", f"umount {python_dir}", check=True)
        cluster.run("n1", f"umount {root}/disk", check=True)
    assert len(lines) == 3, lines
    assert (f"launch.sh: error: n1: the tokenizer --tokenizer_name_or_path {root}/disk/tokenizer is not there: every "
            "node needs it at the same path (a shared file system, or rsync -a)") in lines
    assert (f"launch.sh: error: n2: no {python_dir}/python (the Python of this node): put the repository and its "
            ".venv at the same path on every node (bash scripts/bootstrap.sh there)") in lines
    cut = [line for line in lines if line.startswith("launch.sh: error: n3: ssh cannot reach it (ssh: connect to host "
                                                     "n3 port 22: ")]
    assert len(cut) == 1 and cut[0].endswith("every node of the hostfile needs passwordless ssh from this node "
                                             "(try: ssh n3 true)"), lines


def test_master_unreachable_and_an_interface_a_host_lacks(cluster, job):
    root, _ = job
    (root / "cwd" / ".deepspeed_env").write_text("GLOO_SOCKET_IFNAME=ib0\n")
    master = cluster.addr("n1")
    for host in ("n1", "n3"):  # n2 has no ib0
        cluster.run(host, "ip link add ib0 type veth peer name ib0-peer", check=True)  # (no dummy module in containers)
    cluster.run("n3", f"ip route add unreachable {master}/32", check=True)  # n3 has no route to the master
    try:
        lines = launch(cluster, job, MASTER_ADDR=master, MASTER_PORT=29512)
    finally:
        cluster.run("n3", f"ip route del unreachable {master}/32")
        for host in ("n1", "n3"):
            cluster.run(host, "ip link del ib0")
    assert sorted(lines) == [
        "launch.sh: error: n2: GLOO_SOCKET_IFNAME=ib0 names no interface of this node (it has lo, eth0): set it to an "
        "interface every node has (in .deepspeed_env)",
        f"launch.sh: error: n3: the master address {master}:29512 does not answer from this node (No route to host): "
        "set MASTER_ADDR to an address of the first node that every node reaches, and open MASTER_PORT between the "
        "nodes"]
