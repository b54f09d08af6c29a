"""ds_mlm/hosts.py's parts that need no host: the launcher's flags, the interface variables as the ranks get them, and
the per-host check script run here with sh (the real hosts: tests/integration/cluster/test_preflight.py)."""

import subprocess
import sys

from ds_mlm import hosts


def test_launcher_view_follows_include_exclude_backend_and_ssh_port():
    names = ["a", "b", "c"]
    assert hosts.launcher_view("", names) == ("pdsh", names, [])
    assert hosts.launcher_view("--exclude b", names)[1] == ["a", "c"]
    assert hosts.launcher_view("--exclude b:0,1", names)[1] == names  # b keeps its other slots
    assert hosts.launcher_view("--include a@c:0 --launcher OpenMPI --ssh_port 2222", names) == \
        ("openmpi", ["a", "c"], ["-p", "2222"])


def test_interface_variables_as_the_ranks_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text("OMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=eth0\nGLOO_SOCKET_IFNAME=\"ib0\"\n")
    assert hosts.ifname_values(str(env_file)) == {"NCCL_SOCKET_IFNAME": "eth", "GLOO_SOCKET_IFNAME": "ib0"}


def check_here(tmp_path, python, ifnames, paths=()):
    script = hosts.remote_script(python, list(paths), "", 0, ifnames)
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30).stdout.splitlines()


def test_the_host_script_names_missing_paths_python_and_interfaces(tmp_path):
    assert check_here(tmp_path, sys.executable, {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "^docker"}) == []
    assert check_here(tmp_path, sys.executable, {"NCCL_SOCKET_IFNAME": "=l"}) == [
        f"problem: NCCL_SOCKET_IFNAME==l names no interface of this node (it has "
        f"{', '.join(n for _, n in __import__('socket').if_nameindex())}): set it to an interface every node has "
        "(in .deepspeed_env)"]
    out = check_here(tmp_path, str(tmp_path / "no-python"), {}, [("the corpus --train_dir", str(tmp_path / "gone"))])
    assert out == [f"problem: the corpus --train_dir {tmp_path}/gone is not there: every node needs it at the same "
                   "path (a shared file system, or rsync -a)",
                   f"problem: no {tmp_path}/no-python (the Python of this node): put the repository and its .venv at "
                   "the same path on every node (bash scripts/bootstrap.sh there)"]


def test_nothing_to_check_under_slurm_or_without_hosts():
    assert hosts.check(["x"], sys.executable, [], "", 1, None, launcher="slurm") == []
    assert hosts.check([], sys.executable, [], "", 1, None) == []
