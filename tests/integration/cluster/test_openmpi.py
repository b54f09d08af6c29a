"""OpenMPI on the test cluster: `--launcher openmpi` from the head, the deepspeed runner's real mpirun reaching n1
and n2 over ssh (the cluster's ssh wrapper first on PATH is OpenMPI's rsh agent), one rank per host, as the README
says to run it. Asserted from the hosts themselves: each ran exactly its rank (OMPI_COMM_WORLD_RANK of a run_mlm.py
process inside it), and nothing of the job is left on any host afterwards.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
STEPS = 4


def ranks_inside(cluster, host) -> set:
    """OMPI_COMM_WORLD_RANK of every run_mlm.py process running inside `host`."""
    found = set()
    for pid in cluster.pids(host):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if any(a.endswith(b"run_mlm.py") for a in argv) and b"OMPI_COMM_WORLD_RANK" in env:
            found.add(int(env[b"OMPI_COMM_WORLD_RANK"]))
    return found


def test_launcher_openmpi_runs_one_rank_per_host(cluster, tmp_path, small_corpus, bpe_tokenizer_dir):
    if subprocess.run(["which", "mpirun", "ompi_info"], capture_output=True).returncode != 0:
        why = "OpenMPI is not installed: bash tests/run.sh installs it as root (openmpi-bin)"
        if os.environ.get("DS_MLM_REQUIRE_CLUSTER") == "1":  # CI: the cluster tier must run
            pytest.fail(f"DS_MLM_REQUIRE_CLUSTER=1 but {why}")
        pytest.skip(why)
    hosts = cluster.hosts[:2]
    out = tmp_path / "out"
    env = {**cluster.env, "HOSTFILE": str(cluster.hostfile(hosts)), "LAUNCHER_ARGS": "--launcher openmpi",
           "PROJECT_TRAIN_DIR": str(small_corpus[0]), "PROJECT_TOKENIZER": str(bpe_tokenizer_dir),
           "PROJECT_OUTPUT_DIR": str(out), "PROJECT_ARCHITECTURE": "roberta-tiny", "PROJECT_MAX_STEPS": str(STEPS),
           "PROJECT_MAX_SEQ_LENGTH": "64", "PROJECT_BATCH_SIZE": "4", "PROJECT_LOGGING_STEPS": "1",
           "PROJECT_SAVE_STEPS": str(STEPS),
           # the test runs as root, which mpirun refuses unless told (users run it as themselves)
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        proc = cluster.popen(cluster.head, "bash launch.sh", cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    seen = {h: set() for h in hosts}
    deadline = time.monotonic() + 600
    while proc.poll() is None:
        for h in hosts:
            seen[h] |= ranks_inside(cluster, h)
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"launch.sh --launcher openmpi did not end within 600 s:\n{log.read_text()[-6000:]}")
        time.sleep(0.3)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "cmd = mpirun -n 2 -hostfile" in text  # the deepspeed runner's OpenMPI backend, not pdsh
    assert seen == {hosts[0]: {0}, hosts[1]: {1}}, text[-3000:]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert (out / "roberta_thai" / "config.json").exists()
    for host in cluster.all_hosts:  # mpirun, its orted daemons and the ranks: all gone
        assert cluster.pids(host) == [], host
