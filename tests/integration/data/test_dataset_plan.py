"""The slow tests of ds_mlm.data.dataset_plan (processes, large files, the command): the fast ones are in
tests/unit/data/test_dataset_plan.py."""

import os
import sys

import pytest

from conftest import run
from unit.data.test_dataset_plan import TEXT, edit_in_place, write_big  # noqa: F401 (fixtures among them)


@pytest.mark.slow
def test_the_build_rebuilds_a_70_mib_file_edited_in_place_with_its_times_restored(tmp_path, bpe_tokenizer_dir):
    train, evaluation = tmp_path / "train", tmp_path / "eval"
    train.mkdir()
    evaluation.mkdir()
    at = write_big(train / "big.txt")
    (evaluation / "e.txt").write_bytes(TEXT[:2000])
    cmd = [sys.executable, "-m", "ds_mlm.run_mlm", "--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir",
           train, "--eval_dir", evaluation, "--output_dir", tmp_path / "out", "--datasets_cache_dir",
           tmp_path / "cache", "--max_seq_length", "64", "--build_dataset_only"]
    run(cmd)
    shards = os.listdir(tmp_path / "cache" / "train" / "shards")
    unchanged = run(cmd)
    assert "reusing the token dataset" in unchanged.stdout + unchanged.stderr
    edit_in_place(train / "big.txt", at + 100)
    edited = run(cmd)
    assert "reusing the token dataset" not in edited.stdout + edited.stderr
    rebuilt = os.listdir(tmp_path / "cache" / "train" / "shards")
    assert len(rebuilt) == 1 and rebuilt != shards  # a new shard, of the new bytes; the old one dropped
