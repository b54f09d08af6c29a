"""Rank discovery under every launcher, and the dataset builder's choice, without starting a process group."""

import os

import pytest

from ds_mlm import distributed
from ds_mlm.data import prepare
from ds_mlm.distributed import DistInfo, env_info, fill_rendezvous_env
from ds_mlm.errors import UserError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever the test (or fill_rendezvous_env) writes to os.environ is undone after."""
    schedulers = {k for k in os.environ if k.startswith(("OMPI_", "MV2_", "PMI_", "MPI_LOCAL", "SLURM_"))}
    for key in {*LAUNCHER_VARS, *schedulers}:
        monkeypatch.setenv(key, "")  # recorded, so restored (or removed) at the end
        monkeypatch.delenv(key)
    return monkeypatch


def test_no_launcher_is_a_world_of_one_on_a_free_port(clean_env):
    fill_rendezvous_env()
    assert env_info() == DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and 0 < int(os.environ["MASTER_PORT"]) < 65536


def test_torch_style_launchers_are_read_as_they_are(clean_env):
    # the deepspeed launcher says LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE
    for local_key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        for key, value in (("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), (local_key, "4")):
            clean_env.setenv(key, value)
        fill_rendezvous_env()
        info = env_info()
        assert info == DistInfo(rank=5, world_size=8, local_rank=1, local_world_size=4)
        assert (info.node_rank, info.first_rank_on_node) == (1, 4)
        clean_env.delenv(local_key)


def test_mpirun_variables_become_torch_ones(clean_env):
    for key, value in (("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "4"),
                       ("OMPI_COMM_WORLD_LOCAL_RANK", "1"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
                       ("MASTER_ADDR", "10.0.0.1")):
        clean_env.setenv(key, value)
    assert env_info() == DistInfo(rank=3, world_size=4, local_rank=1, local_world_size=2)
    fill_rendezvous_env()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT")] == ["3", "4", "1", "2", "10.0.0.1", "29500"]


def test_srun_variables_with_uneven_nodes(clean_env):
    # 4 tasks on each of nodes 0-1, 3 on node 2; this is the second task of node 2
    for key, value in (("SLURM_PROCID", "9"), ("SLURM_STEP_NUM_TASKS", "11"), ("SLURM_LOCALID", "1"),
                       ("SLURM_NODEID", "2"), ("SLURM_STEP_TASKS_PER_NODE", "4(x2),3"), ("MASTER_ADDR", "n1")):
        clean_env.setenv(key, value)
    assert env_info() == DistInfo(rank=9, world_size=11, local_rank=1, local_world_size=3)


def test_a_scheduler_without_master_addr_is_a_one_line_error(clean_env):
    for key, value in (("PMI_RANK", "0"), ("PMI_SIZE", "2"), ("MPI_LOCALRANKID", "0"), ("MPI_LOCALNRANKS", "1")):
        clean_env.setenv(key, value)
    with pytest.raises(UserError, match="MPICH/Intel MPI without MASTER_ADDR"):
        fill_rendezvous_env()


def _two_nodes(monkeypatch, other_node_probe: str):
    """Pretend to be rank 2 of 4, first on node 1; node 0's first rank dropped `other_node_probe`."""
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: [other_node_probe, None, mine, None])
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    return DistInfo(rank=2, world_size=4, local_rank=0, local_world_size=2)


def test_auto_scope_on_a_shared_directory_leaves_the_build_to_rank_0(tmp_path, monkeypatch):
    (tmp_path / ".probe-node0").touch()  # node 0's probe is visible here: the directory is shared
    dist = _two_nodes(monkeypatch, "node0")
    assert prepare.builder_rank(str(tmp_path), dist, "auto") == 0
    assert [p.name for p in tmp_path.iterdir()] == [".probe-node0"]  # our own probe is gone again


def test_auto_scope_on_a_node_local_directory_builds_on_each_node(tmp_path, monkeypatch):
    dist = _two_nodes(monkeypatch, "node0")  # node 0's probe is not in this node's directory
    assert prepare.builder_rank(str(tmp_path), dist, "auto") == 2
    assert list(tmp_path.iterdir()) == []


def test_explicit_scopes_need_no_probe(tmp_path, monkeypatch):
    dist = _two_nodes(monkeypatch, "node0")
    assert prepare.builder_rank(str(tmp_path), dist, "shared") == 0
    assert prepare.builder_rank(str(tmp_path), dist, "local") == 2
    assert prepare.builder_rank(str(tmp_path), DistInfo(3, 4, 1, 2), "local") == 2


def test_inputs_that_differ_between_nodes_are_named(monkeypatch):
    gathered = [(0, "host-a", {"train": "f1"}), (0, "host-a", {"train": "f1"}),
                (1, "host-b", {"train": "f2"}), (1, "host-b", {"train": "f2"})]
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: gathered)
    with pytest.raises(UserError, match=r"node 1 \(host-b\) read other --train_dir.*node 0 \(host-a\)") as err:
        prepare.check_same_inputs({"train": "f1"}, DistInfo(0, 4, 0, 2))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: gathered[:2])
    prepare.check_same_inputs({"train": "f1"}, DistInfo(0, 2, 0, 2))  # the same everywhere: no error
