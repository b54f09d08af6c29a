"""The test cluster itself (tests/cluster.py): real hosts that reach each other by name over ssh/pdsh and nothing
else, whose processes can be listed, cut off and killed, and which leave nothing behind."""

import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_hosts_have_their_own_name_address_and_sshd(cluster):
    out = cluster.run(cluster.head, f"pdsh -R ssh -w {','.join(cluster.hosts)} "
                                    "'hostname; getent hosts n1 | cut -d\" \" -f1; ip -o -4 addr show eth0'",
                      check=True).stdout
    for host in cluster.hosts:
        mine = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(f"{host}: ")]
        assert mine[0] == host
        assert mine[1] == cluster.addr("n1")  # names resolve through the cluster's hosts file
        assert f"inet {cluster.addr(host)}/24" in mine[2]
    assert cluster.run(cluster.head, "hostname", check=True).stdout.strip() == cluster.head
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() != "n1"  # ours is untouched


def test_no_route_to_the_machines_network(cluster):
    # the machine's own addresses are unreachable from a host: its only link is the test bridge
    own = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    addrs = [w.split("/")[0] for line in own.splitlines() for w in line.split()[3:4] if not w.startswith("127.")]
    for addr in addrs:
        res = cluster.run("n1", f"ip route get {addr}")
        assert res.returncode != 0 and "unreachable" in res.stderr, res.stdout


def test_pids_kill_cut_and_restore(cluster):
    job = cluster.popen("n2", "sleep 300")
    assert job.pid in cluster.pids("n2")
    assert cluster.pids("n3") == []
    cluster.kill("n2")
    assert job.wait(timeout=10) == -9
    deadline = time.monotonic() + 10  # the shell's child gets its SIGKILL too, a moment later
    while cluster.pids("n2") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.pids("n2") == []
    cluster.cut("n3")
    try:
        res = cluster.run(cluster.head, "ssh -o ConnectTimeout=2 n3 true")
        assert res.returncode == 255
    finally:
        cluster.restore("n3")
    assert cluster.run(cluster.head, "ssh n3 hostname", check=True).stdout.strip() == "n3"


def test_private_mounts_stay_in_their_host(cluster, tmp_path):
    (tmp_path / "disk").mkdir()
    cluster.run("n1", f"mount -t tmpfs tmpfs {tmp_path}/disk && echo n1 > {tmp_path}/disk/who", check=True)
    assert cluster.run("n1", f"cat {tmp_path}/disk/who", check=True).stdout == "n1\n"
    assert not (tmp_path / "disk" / "who").exists()  # not on the machine's own file system
    assert cluster.run("n2", f"ls {tmp_path}/disk", check=True).stdout == ""


def test_close_leaves_nothing(tmp_path):
    from cluster import Cluster, unavailable

    if unavailable():
        pytest.skip(unavailable())
    small = Cluster(tmp_path / "c", n_hosts=1)
    names = [small.ns(h) for h in (*small.all_hosts, "sw")]
    pids = [small.popen("n1", "sleep 300").pid, *[p.pid for p in small._init.values()]]
    assert all(Path("/run/netns", n).exists() for n in names)
    small.close()
    assert not any(Path("/run/netns", n).exists() for n in names)
    assert not any(Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
                   for p in pids)
    assert not list(Path("/dev/shm").glob("*dsmlm*"))


def test_a_crashed_runs_namespaces_are_removed(cluster):
    from cluster import remove_stale, unavailable

    if unavailable():
        pytest.skip(unavailable())
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it
    name = f"dsmlm{dead}x1-n9"
    subprocess.run(["ip", "netns", "add", name], check=True)
    remove_stale()
    assert not Path("/run/netns", name).exists()
    assert any(Path("/run/netns").glob(f"dsmlm{os.getpid()}x*"))  # this session's own cluster is kept
