"""What each launcher does on each stop signal, measured (not a test): the table of README's "Stop signals".

    .venv/bin/python bench/stop.py [CASE ...] [--workdir DIR]     # CASE like deepspeed:started:SIGTERM; default all

For each case a roberta-tiny job (1 process, 64 ids per sample, 100,000 steps, no scheduled save) is started the way
the README says (`.venv/bin/deepspeed ds_mlm/run_mlm.py ...`, `.venv/bin/torchrun ds_mlm/run_mlm.py ...`,
`bash launch.sh ...`), and once it trains one process of it gets the signal: the launcher you started, another
launcher inside it, the supervisor of launch.sh, or the rank. Printed per case: the status of the command you
started, the seconds from the signal until no process of the job is left, the step the training log reached and the
checkpoint saved (COMPLETE) -- the same step when the ranks saved on the way out.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from conftest import job_processes  # noqa: E402 (the suite's: every live process naming a directory)

BIN = REPO / ".venv" / "bin"
CASES = [f"deepspeed:{t}:{s}" for t, s in [("started", "SIGTERM"), ("started", "SIGINT"), ("started", "SIGUSR1"),
                                             ("started", "SIGKILL"), ("deepspeed.launcher.launch", "SIGTERM"),
                                             ("deepspeed.launcher.launch", "SIGUSR1"),
                                             ("deepspeed.launcher.launch", "SIGKILL"), ("rank", "SIGTERM")]] + \
        [f"torchrun:{t}:{s}" for t, s in [("started", "SIGTERM"), ("started", "SIGINT"), ("started", "SIGUSR1"),
                                           ("started", "SIGKILL"), ("rank", "SIGTERM")]] + \
        [f"launch.sh:{t}:{s}" for t, s in [("started", "SIGTERM"), ("started", "SIGINT"), ("started", "SIGUSR1"),
                                            ("deepspeed.launcher.runner", "SIGKILL"),
                                            ("deepspeed.launcher.launch", "SIGKILL"), ("ds_mlm.supervise", "SIGKILL"),
                                            ("rank", "SIGTERM")]]


def module_of(argv: list):
    """M of `python [-u] -m M ...` (the first -m: the supervisor's command line names its launcher's module later)."""
    return argv[argv.index("-m") + 1] if "-m" in argv[:3] and argv.index("-m") + 1 < len(argv) else None


def steps(out: Path) -> int:
    log = out / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def run_case(case: str, work: Path, tokenizer: Path) -> str:
    from ds_mlm.distributed import free_port

    how, target, name = case.split(":")
    out = work / case.replace(":", "_")
    shutil.rmtree(out, ignore_errors=True)
    args = ["--tokenizer_name_or_path", tokenizer, "--train_dir", REPO / "data" / "sample" / "train",
            "--output_dir", out, "--datasets_cache_dir", work / "cache", "--architecture", "roberta-tiny",
            "--max_seq_length", "64", "--per_device_train_batch_size", "4", "--max_steps", "100000",
            "--logging_steps", "1", "--save_steps", "100000", "--deepspeed_config", "zero0.json"]
    port = str(free_port())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": port}
    script = REPO / "ds_mlm" / "run_mlm.py"
    if how == "deepspeed":
        cmd = [BIN / "deepspeed", "--num_gpus", "1", "--master_port", port, script, *args]
    elif how == "torchrun":
        cmd = [BIN / "torchrun", "--nproc_per_node", "1", "--master_port", port, script, *args]
    else:
        env.update(PROJECT_TRAIN_DIR=str(args[3]), PROJECT_TOKENIZER=str(tokenizer), PROJECT_OUTPUT_DIR=str(out))
        cmd = ["bash", REPO / "launch.sh", *args]
    log = work / f"{case.replace(':', '_')}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while steps(out) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            return f"{case:48} did not start training (status {proc.poll()}): see {log}"
        time.sleep(0.2)
    procs = job_processes(str(out))
    if target == "started":  # the command you started: the runner, torchrun, launch.sh
        pid = proc.pid
    elif target == "rank":
        pid = next(p.pid for p in procs if str(script) in " ".join(p.cmdline()) and "-m" not in p.cmdline()[1:3]
                   and "deepspeed" not in os.path.basename(p.cmdline()[1]) and "torchrun" not in p.cmdline()[1])
    else:
        pid = next(p.pid for p in procs if module_of(p.cmdline()) == target)
    reached_before = steps(out)
    os.kill(pid, getattr(signal, name))
    sent = time.monotonic()
    try:
        status = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        status = "still running after 120 s"
    while job_processes(str(out)) and time.monotonic() - sent < 120:
        time.sleep(0.2)
    gone = time.monotonic() - sent
    left = job_processes(str(out))
    for p in left:
        p.kill()
    status = 128 - status if isinstance(status, int) and status < 0 else status
    saved = (out / "latest_checkpoint").read_text().strip() if (out / "latest_checkpoint").exists() else "-"
    complete = saved != "-" and (out / saved / "COMPLETE").is_file()
    return (f"{case:48} status {status!s:>4}  all gone {gone:5.1f} s{' (LEFT: killed)' if left else ''}  "
            f"signalled at step {reached_before}, log reached {steps(out)}, saved {saved}{'' if complete else ' (none)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", default=CASES)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds-mlm-stop-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = work / "tokenizer"
    if not tokenizer.exists():
        from conftest import build_bpe_tokenizer

        build_bpe_tokenizer(tokenizer)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for case in args.cases:
        print(run_case(case, work, tokenizer), flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; logs in {work}", flush=True)


if __name__ == "__main__":
    main()
