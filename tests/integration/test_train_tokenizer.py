"""The train-tokenizer command's word-counting workers, in a process of their own: they end when the parent ignores
SIGTERM. The command itself, fast: tests/unit/test_train_tokenizer.py."""

import sys

import pytest

from conftest import run

pytestmark = pytest.mark.slow  # a fresh interpreter: seconds


def test_word_counting_workers_end_when_the_parent_ignores_sigterm(small_corpus, tmp_path):
    """A process that has decided to stop ignores SIGTERM (errors.ignore_stop_signals), and forked workers inherit
    that: a multiprocessing.Pool's terminate() then waited forever on them (seen as a hung suite)."""
    script = (f"import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              f"from ds_mlm.train_tokenizer import TrainTokenizerArguments, train\n"
              f"train(TrainTokenizerArguments(type='newmm', input_dir={str(small_corpus[0])!r}, num_workers=2, "
              f"output_dir={str(tmp_path / 'tok')!r}))\n")
    run([sys.executable, "-c", script], timeout=120)
    assert (tmp_path / "tok" / "newmm.json").is_file()
