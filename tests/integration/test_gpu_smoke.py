"""bench/gpu.sh --smoke: the GPU benchmark's code paths on CPU (a launcher run through its configuration loop, the
table read from train_log.jsonl, the exact-resume check, the export check), so the script cannot rot; and a
configuration that fails (one with compile on) makes the script fail."""

import json

import pytest

from conftest import REPO, run


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """One GPU_BENCH_DIR for both tests: the script keeps its tokenizer and token stores there between runs."""
    return tmp_path_factory.mktemp("gpu-bench")


@pytest.mark.slow
def test_gpu_sh_smoke_runs_every_code_path(bench_dir):
    tmp_path = bench_dir
    proc = run(["bash", REPO / "bench" / "gpu.sh", "--smoke"], env={"GPU_BENCH_DIR": str(tmp_path)}, timeout=1200)
    out = proc.stdout
    rows = {line[:26].strip(): line.split() for line in out.splitlines() if line.startswith("seq 64 ZeRO-")}
    assert set(rows) == {"seq 64 ZeRO-2 compile off"}
    for name, cells in rows.items():
        tokens_per_s, tflops, mfu = float(cells[6].replace(",", "")), float(cells[8]), cells[9]
        assert tokens_per_s > 0 and tflops >= 0 and mfu.endswith("%"), (name, cells)  # mfu: against --peak_tflops
    assert "exact resume (fused AdamW): ok (3 records, steps [2, 4, 6], resumed from checkpoint-4" in out
    assert "export: ok (vocab_size 2000, 2000 rows, tokenizer 2000; equal to the in-run export" in out
    assert out.rstrip().endswith("gpu.sh: every configuration ran and every check held")
    records = [json.loads(x) for x in (tmp_path / "runs" / "s64-z2-off" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["mfu"] == pytest.approx(r["tflops"] / 0.5) and 0 <= r["data_wait"] < 1 for r in records)
    config = json.loads((tmp_path / "runs" / "s64-z2-off" / "ds_config.json").read_text())
    assert config["optimizer"]["params"]["torch_adam"] is True and config["optimizer"]["params"]["fused"] is True


@pytest.mark.slow
def test_gpu_sh_fails_loudly_when_a_configuration_fails(bench_dir):
    proc = run(["bash", REPO / "bench" / "gpu.sh", "--smoke"], check=False, timeout=600,
               env={"GPU_BENCH_DIR": str(bench_dir), "GPU_BENCH_STAGES": "9", "GPU_BENCH_COMPILE": "on",
                    "GPU_BENCH_CHECKS": "0"})
    assert proc.returncode == 1
    assert "gpu.sh: FAILED: seq 64 ZeRO-9 compile on" in proc.stderr
    assert "zero9.json: no such file" in proc.stderr  # the run's own one-line error, shown from its log
