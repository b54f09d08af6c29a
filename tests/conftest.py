"""Fixtures shared by the whole suite: the bundled sample corpus and a small tokenizer built from it (no downloads)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"

# Tests never reach a model hub, and never leave DeepSpeed's CPU all-reduce buffers in /dev/shm.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cpu_mixed_precision() -> str:
    """What --fp16 (and bf16) trains in on this CPU: bf16 where oneDNN computes it natively (AVX512-BF16/AMX), else
    fp32 (ds_mlm.ds_config.bf16_native); CI machines of either kind must pass."""
    import torch

    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


# The keys of a train_log.jsonl record that measure time, not training: runs compare every other number exactly.
TIMING = ("tokens_per_s", "samples_per_s", "tflops", "mfu", "data_wait", "peak_memory_gib")

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bpe_tokenizer(out_dir: Path, vocab_size: int = 2000) -> Path:
    """A byte-level BPE RobertaTokenizer (fast, transformers 5) trained on the sample corpus, specials at ids 0-4."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(p) for p in sorted((SAMPLE / "train").glob("*.txt"))], vocab_size=vocab_size, min_frequency=2,
              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(out_dir))
    tok = RobertaTokenizer(vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"))
    tok.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def world_of_one():
    """An in-process world of one for the module's tests (environment restored after; the process group lives on,
    as it must: torch cannot initialise a second one)."""
    from ds_mlm import distributed

    mp = pytest.MonkeyPatch()
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        mp.setenv(key, value)
    yield distributed.init()
    mp.undo()


@pytest.fixture(scope="session")
def sample_dirs():
    """(train_dir, eval_dir) of the bundled sample corpus."""
    return SAMPLE / "train", SAMPLE / "eval"


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe_tokenizer"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A few hundred lines of the sample corpus (Thai and English) as (train_dir, eval_dir): fast to tokenize."""
    root = tmp_path_factory.mktemp("small_corpus")
    for split, n in (("train", 300), ("eval", 60)):
        (root / split).mkdir()
        for src in sorted((SAMPLE / split).glob("*.txt")):
            lines = src.read_text(encoding="utf-8").splitlines()[:n]
            (root / split / src.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "train", root / "eval"


def run(cmd, timeout=600, env=None, cwd=REPO, check=True) -> subprocess.CompletedProcess:
    """Run a command, capture its output, and show it when the check fails."""
    # A child is never part of this process's own world of one (an in-process test may have set RANK, MASTER_PORT...)
    inherited = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    full_env = {**inherited, **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def deepspeed_cmd(*script_args, num_procs: int = 1, port: int | None = None) -> list:
    """The real deepspeed launcher on localhost, running run_mlm.py as a file (as users do)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs), "--master_port",
            str(port or free_port()), str(REPO / "ds_mlm" / "run_mlm.py"), *script_args]
