"""The slow tests of ds_mlm.data.workers (processes, large files, the command): the fast ones are in
tests/unit/data/test_workers.py."""

import os
import signal
import subprocess
import sys

import pytest

from ds_mlm.data.workers import OrderedPool, WorkerDied
from conftest import REPO
from unit.data.test_workers import gone, slow_square  # noqa: F401 (fixtures among them)

# The caller ran its fast tokenizer's Rust thread pool, then the build forks its workers: with
# TOKENIZERS_PARALLELISM=true, a forked worker waited forever on pool threads that exist only in the parent.
TOKENIZER_THEN_POOL = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np
from transformers import AutoTokenizer
from ds_mlm.data import build
from ds_mlm.data.spec import encode_lines
from ds_mlm.data.workers import OrderedPool
tok = AutoTokenizer.from_pretrained({tok!r})
encode_lines(tok, ["the caller uses its tokenizer"] * 2000)
build._TOKENIZER = tok
with OrderedPool(build._tokenize, 2) as pool:
    for _ in range(4):
        pool.submit((["some text to tokenize"] * 500, len(tok), np.dtype("int32")))
    print(sum(len(pool.next()[0]) for _ in range(4)))
"""


@pytest.mark.slow
def test_a_stuck_worker_is_noticed_within_the_bound_and_the_others_end():
    with pytest.raises(WorkerDied, match=r"worker 0 \(pid \d+\) is alive but returned nothing for 2 s: it hangs"):
        with OrderedPool(slow_square, 2, stuck_seconds=2) as pool:
            pids = pool.pids
            os.kill(pids[0], signal.SIGSTOP)  # alive, holding its task forever: a hung worker
            pool.submit((1, 0.0))
            pool.submit((2, 0.0))
            pool.next(idle=lambda: None)  # the heartbeat keeps beating: it must not keep the wait going
    assert gone(pids)


@pytest.mark.slow
def test_workers_forked_after_the_callers_tokenizer_ran_its_thread_pool_do_not_hang(bpe_tokenizer_dir):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    try:
        script = TOKENIZER_THEN_POOL.format(repo=str(REPO), tok=str(bpe_tokenizer_dir))
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the workers hang after the caller's tokenizer ran its thread pool")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) > 2000


@pytest.mark.slow
def test_a_train_dir_of_blank_lines_ends_in_one_line_whatever_tokenizers_parallelism_says(tmp_path, bpe_tokenizer_dir,
                                                                                          sample_dirs):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n   \n\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "ds_mlm.run_mlm", "--tokenizer_name_or_path", str(bpe_tokenizer_dir), "--train_dir",
           str(tmp_path / "blank"), "--eval_dir", str(sample_dirs[1]), "--output_dir", str(tmp_path / "out"),
           "--max_seq_length", "64", "--build_dataset_only"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(REPO)}
    try:  # it stopped at "tokenizing validation 0%" for good: the fingerprint ran the Rust pool before the fork
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the build hangs with TOKENIZERS_PARALLELISM=true")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (f"ds-mlm: error: no sample from --train_dir {tmp_path / 'blank'} "
                                                   "(no text, or every line longer than a sample with --long_sentence "
                                                   "split): add text to it")
