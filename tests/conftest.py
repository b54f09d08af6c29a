"""Fixtures shared by the whole suite: the bundled sample corpus and a small tokenizer built from it (no downloads)."""

import os
import signal
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
# Under tests/run.sh's two xdist workers on two cores, one OpenMP thread per process: two workers' torch pools of two
# threads each would spin against each other. Runs compared bit for bit all start inside one worker, so alike.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# What the tests start, and signal, starts with default dispositions however the suite was started: a background job
# of a script (`bash tests/run.sh &`, cron, CI wrappers) begins with SIGINT and SIGQUIT ignored, nohup with SIGHUP
# ignored; a child inherits an ignored signal (bash cannot even trap it), a handled one is reset to default at exec.
for _sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, signal.default_int_handler if _sig == signal.SIGINT else signal.SIG_DFL)

from ds_mlm.distributed import free_port  # noqa: E402,F401 (the tests import it from here; after the settings above)


def cpu_mixed_precision() -> str:
    """What --fp16 (and bf16) trains in on this CPU: bf16 where oneDNN computes it natively (AVX512-BF16/AMX), else
    fp32 (ds_mlm.ds_config.bf16_native); CI machines of either kind must pass."""
    import torch

    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def fp16_precision() -> str:
    """What --fp16 trains in on this CPU (ds_mlm.precision.choose): fp16 where DeepSpeed accepts it (oneDNN computes
    fp16: AVX512-FP16 or AMX-FP16, as on a Xeon of this project's), else cpu_mixed_precision()."""
    import torch

    return "fp16" if torch.ops.mkldnn._is_mkldnn_fp16_supported() else cpu_mixed_precision()


def fp16_fallback_warning(used: str) -> str:
    """The warning --fp16 prints where it trains in `used` instead; empty where fp16 runs as asked."""
    return "" if used == "fp16" else f"fp16 is not supported on this cpu: training in {used} instead"


# The keys of a train_log.jsonl record that measure time, not training: runs compare every other number exactly.
TIMING = ("tokens_per_s", "samples_per_s", "tflops", "mfu", "data_wait", "peak_memory_gib", "time")

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """Each test starts with the process's signal handlers as the suite found them: a run called in-process installs
    its own (errors.cli, save-on-signal, and SIG_IGN once it has decided to stop), and a later test's forked workers
    would inherit them."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A test cluster of real hosts (tests/cluster.py): n1, n2, n3 and a head, each a namespace with its own sshd.
    Skips with one line where the machine cannot host it, unless DS_MLM_REQUIRE_CLUSTER=1 (CI) makes that a failure."""
    import atexit

    from cluster import Cluster, unavailable

    why = unavailable()
    if why:
        if os.environ.get("DS_MLM_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"DS_MLM_REQUIRE_CLUSTER=1 but {why}")
        pytest.skip(why)
    made = Cluster(tmp_path_factory.mktemp("cluster"), n_hosts=3)
    atexit.register(made.close)  # an interrupted session still removes it; a killed one: the next start does
    yield made
    made.close()


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


def launcher_cmd(script, *args, num_procs: int = 1, port: int | None = None) -> list:
    """The real deepspeed launcher on localhost running `script` (run_mlm.py or a wrapper around it)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs), "--master_port",
            str(port or free_port()), str(script), *args]


def read_log(out) -> list:
    """The records of OUTPUT_DIR/train_log.jsonl."""
    import json

    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]



def numbers(out) -> list:
    """The log's records without their timing fields: what must be equal between two runs of the same steps."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_log(out)]


CRASH_AFTER_STEP = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
from ds_mlm.trainer import Trainer
def crash(trainer, record):
    if trainer.global_step == {stop} and "loss" in record:  # a training step's record
        os._exit(3)  # a hard crash after a logged step: no cleanup, no save
init = Trainer.__init__
def init_with_crash(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.on_log.append(crash)  # the Trainer's public hook, after each record it writes
Trainer.__init__ = init_with_crash
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def crash_after_step(folder, step: int) -> Path:
    """A run_mlm.py that dies (os._exit, no save) right after logging optimizer step `step`."""
    script = Path(folder) / f"crash_after_step_{step}.py"
    script.write_text(CRASH_AFTER_STEP.format(repo=str(REPO), stop=step, script=str(REPO / "ds_mlm" / "run_mlm.py")))
    return script


@pytest.fixture(scope="session")
def no_dropout_config(tmp_path_factory) -> Path:
    """roberta-tiny's shapes without dropout, as a --config_name JSON: runs that must follow one trajectory."""
    from transformers import RobertaConfig

    from ds_mlm.model import _COMMON, PRESETS

    path = tmp_path_factory.mktemp("configs") / "roberta-tiny-no-dropout.json"
    RobertaConfig(**{**_COMMON, **PRESETS["roberta-tiny"], "hidden_dropout_prob": 0.0,
                     "attention_probs_dropout_prob": 0.0}).to_json_file(str(path))
    return path


# -- an in-process trainer over a list-backed dataset (tests/integration/test_trainer.py, test_throughput.py) ----------

SEQ = 64


class ListDataset:
    """The dataset interface the trainer reads: len() and __getitems__(indices) -> list of 1-D LongTensors."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitems__(self, indices):
        return [self.samples[i] for i in indices]


def blocks(tokenizer, folder, lines_per_file):
    """<s> ids </s> blocks of SEQ tokens from the first lines of each file (a tiny packed dataset)."""
    import torch

    ids = []
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines()[:lines_per_file]:
            ids += tokenizer(line, add_special_tokens=False)["input_ids"]
    n = SEQ - 2
    return ListDataset([torch.tensor([tokenizer.bos_token_id, *ids[i:i + n], tokenizer.eos_token_id])
                        for i in range(0, len(ids) - n + 1, n)])


@pytest.fixture(scope="module")
def data(bpe_tokenizer_dir):
    """(tokenizer, train set, eval set) for in-process trainers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    return tokenizer, blocks(tokenizer, SAMPLE / "train", 400), blocks(tokenizer, SAMPLE / "eval", 40)


def make_trainer(tmp_path, data, world, *flags, eval_set=True):
    """A trainer assembled by run_mlm's own plan_run and setup_training (minus the lock and the dataset build)."""
    from ds_mlm.args import parse_args
    from ds_mlm.run_mlm import plan_run, setup_training

    tokenizer, train_set, evaluation = data
    args = parse_args(["--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--architecture",
                       "roberta-tiny", "--max_seq_length", str(SEQ), "--save_steps", "1000", *flags])
    return setup_training(plan_run(args, tokenizer, world), tokenizer, train_set,
                          {"eval": evaluation} if eval_set else None)


def train(trainer):
    """trainer.train() without save-on-signal handlers (a test's own signals stay the test runner's)."""
    from ds_mlm.signals import StopOnSignal

    with StopOnSignal(False) as stop:
        return trainer.train(stop)


def job_processes(marker: str) -> list:
    """Every live process (psutil.Process) whose command line names `marker` (a test's own directory: no other job
    matches)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or ()) \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def no_leftovers(tmp_path):
    """After the test, passed or failed, nothing naming its directory runs on (a failure leaves no job behind)."""
    import psutil

    yield tmp_path
    for proc in job_processes(str(tmp_path)):
        try:
            proc.kill()
        except psutil.Error:
            pass
