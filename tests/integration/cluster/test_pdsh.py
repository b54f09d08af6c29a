"""The deepspeed launcher over real ssh and pdsh, on the test cluster (tests/cluster.py): jobs started from the head
on three hosts, with the README's commands.

- `HOSTFILE=... bash launch.sh` (ZeRO-1, shared cache) and `deepspeed --hostfile ... ds_mlm/run_mlm.py` (ZeRO-3,
  node-local caches) reach the losses of one process with the same global batch (dropout off, fp32: one trajectory
  up to the order of reductions, rtol 1e-3 as in test_elastic).
- Inside the ranks, a sitecustomize (Python's own start-up hook, on the PYTHONPATH that the launcher exports to every
  node) records the host each rank ran on and the environment it got: the hostfile's order, the user's
  `.deepspeed_env` lines and the interface variable reach every rank.
"""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, read_log, run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
GLOBAL_BATCH, STEPS, HOSTS = 6, 4, 3

PROBE = textwrap.dedent("""
    # Records, for each rank of run_mlm.py, the host it runs on and the variables the test looks for.
    import json, os, socket, sys
    if os.environ.get("RANK") is not None and sys.argv and sys.argv[0].endswith("run_mlm.py"):
        keys = ("RANK", "MASTER_ADDR", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "DS_MLM_CLUSTER_MARK",
                "DS_MLM_HOME_MARK", "DS_ACCELERATOR", "OMP_NUM_THREADS")
        with open(os.path.join(os.path.dirname(__file__), "rank-%s.json" % os.environ["RANK"]), "w") as f:
            json.dump({"host": socket.gethostname(), "env": {k: os.environ.get(k) for k in keys}}, f)
""")

# The user's .deepspeed_env, as the README shows it: the interface and anything else every node needs.
DEEPSPEED_ENV = "GLOO_SOCKET_IFNAME=eth0\nNCCL_SOCKET_IFNAME=eth0\nDS_MLM_CLUSTER_MARK=from-deepspeed-env\n"


def train_args(corpus, tokenizer, config, out, cache, zero, world):
    return ["--train_dir", corpus[0], "--tokenizer_name_or_path", tokenizer, "--config_name", config,
            "--output_dir", out, "--datasets_cache_dir", cache, "--max_seq_length", "64",
            "--per_device_train_batch_size", str(GLOBAL_BATCH // world), "--max_steps", str(STEPS),
            "--logging_steps", "1", "--save_steps", "100", "--learning_rate", "2e-3", "--warmup_steps", "2",
            "--deepspeed_config", zero, "--bf16", "false"]


def job_dir(tmp: Path) -> tuple[Path, Path]:
    """A working directory holding the user's .deepspeed_env, and a probe directory for the PYTHONPATH."""
    cwd, probe = tmp / "cwd", tmp / "probe"
    cwd.mkdir(parents=True)
    probe.mkdir()
    (cwd / ".deepspeed_env").write_text(DEEPSPEED_ENV)
    (probe / "sitecustomize.py").write_text(PROBE)
    return cwd, probe


def with_probe(env: dict, probe: Path) -> dict:
    # PYTHON* variables are exported to every node by the deepspeed launcher itself
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(probe), env.get("PYTHONPATH")]))}


def losses(out) -> list:
    return [r["loss"] for r in read_log(out) if "loss" in r]


def ranks_seen(probe: Path) -> dict:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in probe.glob("rank-*.json")}


def assert_ranks_placed(probe: Path, hosts: list[str]):
    seen = ranks_seen(probe)
    assert sorted(seen) == list(range(len(hosts)))
    for rank, record in seen.items():
        assert record["host"] == hosts[rank]  # rank r ran on the hostfile's r-th host
        assert record["env"]["GLOO_SOCKET_IFNAME"] == "eth0" and record["env"]["NCCL_SOCKET_IFNAME"] == "eth0"
        assert record["env"]["DS_MLM_CLUSTER_MARK"] == "from-deepspeed-env"


def assert_nothing_left(cluster):
    deadline = time.monotonic() + 30
    while any(cluster.pids(h) for h in cluster.hosts) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {h: cluster.pids(h) for h in cluster.hosts} == {h: [] for h in cluster.hosts}


def assert_export_loads(out: Path):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(str(out / "roberta_thai")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out / "roberta_thai"))
    with torch.no_grad():
        logits = model(**tokenizer("The <mask> of the school was there.", return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def shared_job(cluster, tmp_path_factory, small_corpus, bpe_tokenizer_dir, no_dropout_config):
    """launch.sh from the head on 3 hosts, ZeRO-1, the dataset cache on the shared file system."""
    root = tmp_path_factory.mktemp("pdsh_zero1")
    cwd, probe = job_dir(root)
    out, cache = root / "out", root / "cache"
    variables = {"HOSTFILE": cluster.hostfile(cluster.hosts), "PROJECT_TRAIN_DIR": small_corpus[0],
                 "PROJECT_TOKENIZER": bpe_tokenizer_dir, "PROJECT_OUTPUT_DIR": out, "PROJECT_CACHE_DIR": cache,
                 "PROJECT_MAX_SEQ_LENGTH": 64, "PROJECT_BATCH_SIZE": GLOBAL_BATCH // HOSTS, "PROJECT_MAX_STEPS": STEPS,
                 "PROJECT_LOGGING_STEPS": 1, "PROJECT_SAVE_STEPS": 100, "PROJECT_LEARNING_RATE": "2e-3",
                 "PROJECT_WARMUP_STEPS": 2, "DS_CONFIG": "zero1.json"}
    home = root / "home"  # the user's ~/.deepspeed_env, with a comment and a blank line (launch.sh drops them)
    home.mkdir()
    (home / ".deepspeed_env").write_text("# mine\nDS_MLM_HOME_MARK=from-home\n\n")
    command = " ".join(f"{k}={v}" for k, v in {**variables, "HOME": home}.items())
    proc = cluster.run(cluster.head, f"{command} bash {REPO}/launch.sh --config_name {no_dropout_config} --bf16 false",
                       cwd=cwd, env=with_probe(cluster.env, probe), timeout=600)
    return root, proc, probe, out, cache


@pytest.fixture(scope="module")
def reference(shared_job, small_corpus, bpe_tokenizer_dir, no_dropout_config):
    """One process (no launcher), ZeRO-0, the same global batch and the same cache (built by the job above)."""
    root, _, _, _, cache = shared_job
    out = root / "one_process"
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = run([sys.executable, REPO / "ds_mlm" / "run_mlm.py",
                *train_args(small_corpus, bpe_tokenizer_dir, no_dropout_config, out, cache, "zero0.json", 1)],
               env=env)
    return proc, losses(out)


def test_launch_sh_on_three_hosts_over_pdsh(cluster, shared_job, reference):
    _, proc, probe, out, cache = shared_job
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "launch.sh: checking the nodes of" in text
    assert f"pdsh -S -f 1024 -w {','.join(cluster.hosts)}" in text  # the real pdsh, from the head
    assert_ranks_placed(probe, cluster.hosts)
    for record in ranks_seen(probe).values():  # launch.sh's own lines and the user's ~/.deepspeed_env reach every rank
        assert record["env"]["DS_MLM_HOME_MARK"] == "from-home" and record["env"]["DS_ACCELERATOR"] == "cpu"
    env_file = (out / "launch" / "deepspeed_env").read_text().splitlines()
    assert env_file[0].startswith("OMP_NUM_THREADS=") and env_file[-3:] == DEEPSPEED_ENV.splitlines()  # yours last
    # the shared cache is built once, by the whole job; the one-process run reuses it as it is
    assert "train: built" in text and "built by 3 process(es), 0 reused" in text
    ref_proc, expected = reference
    assert "train: built" not in ref_proc.stdout + ref_proc.stderr
    assert len(list((cache).glob("*/manifest.json"))) == 1
    got = losses(out)
    assert len(got) == STEPS and got == pytest.approx(expected, rel=1e-3)
    assert_export_loads(out)
    assert_nothing_left(cluster)


def test_deepspeed_hostfile_zero3_with_node_local_caches(cluster, tmp_path, reference, small_corpus,
                                                          bpe_tokenizer_dir, no_dropout_config):
    """`deepspeed --hostfile` as the README gives it, each host's cache on its own disk (a private tmpfs at the same
    path): every host builds its own once, and the job trains to the same losses."""
    cwd, probe = job_dir(tmp_path)
    (cwd / ".deepspeed_env").write_text(DEEPSPEED_ENV + "DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\n")
    out, cache = tmp_path / "out", tmp_path / "local_cache"
    cache.mkdir()
    for host in cluster.hosts:  # a disk of each host's own, at the same path
        cluster.run(host, f"mount -t tmpfs tmpfs {cache}", check=True)
    argv = train_args(small_corpus, bpe_tokenizer_dir, no_dropout_config, out, cache, "zero3.json", HOSTS)
    proc = cluster.run(cluster.head, f"{REPO}/.venv/bin/deepspeed --hostfile {cluster.hostfile(cluster.hosts)} "
                                     f"{REPO}/ds_mlm/run_mlm.py --cache_scope local " + " ".join(map(str, argv)),
                       cwd=cwd, env=with_probe(cluster.env, probe), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_ranks_placed(probe, cluster.hosts)
    for host in cluster.hosts:  # one build per host, on its own disk, none on the shared one
        assert cluster.run(host, f"ls {cache}/*/manifest.json", check=True).stdout.count("manifest.json") == 1
        assert f"{host}: " in proc.stdout and "built by 1 process(es), 0 reused" in proc.stdout
    assert not list(cache.iterdir())
    assert proc.stdout.count("built by 1 process(es), 0 reused") == HOSTS
    assert losses(out) == pytest.approx(reference[1], rel=1e-3)
    assert_export_loads(out)
    assert_nothing_left(cluster)
