"""The slow tests of ds_mlm.data.mixture (processes, large files, the command): the fast ones are in
tests/unit/data/test_mixture.py."""

import pytest

from unit.data.test_build import ByteTokenizer  # noqa: F401 (fixtures among them)


@pytest.mark.slow
def test_resuming_with_other_weights_says_so_in_one_line(tmp_path, small_corpus, bpe_tokenizer_dir):
    import shutil
    import sys

    from conftest import run

    news, books = tmp_path / "news", tmp_path / "books"
    news.mkdir()
    books.mkdir()
    shutil.copy(small_corpus[0] / "thaigov.txt", news)
    shutil.copy(small_corpus[0] / "botchan.txt", books)
    out = tmp_path / "out"

    def cmd(steps, *weights):
        return [sys.executable, "-m", "ds_mlm.run_mlm", "--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir",
                news, books, "--train_weights", *weights, "--output_dir", out, "--architecture", "roberta-tiny",
                "--max_seq_length", "64", "--per_device_train_batch_size", "4", "--max_steps", steps,
                "--save_steps", "2", "--logging_steps", "2", "--deepspeed_config", "zero0.json"]

    run(cmd("2", "1", "1"))
    proc = run(cmd("4", "3", "1"))
    lines = [s for s in (proc.stdout + proc.stderr).splitlines() if "training mixture changed" in s]
    assert len(lines) == 1 and lines[0].endswith(
        f"resume: the training mixture changed from {news}:0.5 {books}:0.5 to {news}:0.75 {books}:0.25: training "
        "goes on from the samples consumed, drawn from the new mixture")
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stdout + proc.stderr
