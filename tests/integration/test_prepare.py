"""Preparing a run's datasets: sources and weights, a build spread over the job's processes (each shard tokenized
once), a second job on the same cache that waits and reuses, signals that end every worker, and the ancestor's
command end to end with samples_by_source in the log (the same on 1 and 2 ranks, and across a kill -9)."""

import json
import math
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import DIST_ENV, REPO, free_port
from ds_mlm.args import parse_args

TINY = ["--architecture", "roberta-tiny", "--max_seq_length", "64", "--per_device_train_batch_size", "4",
        "--logging_steps", "1"]
WRAPPER = '''"""run_mlm, plus hooks set by the environment: $RECORD gets a line "rank split shard" for every shard this
process tokenizes; a share is built only once the file $HOLD_UNTIL exists; $SLOW_CHUNK seconds per tokenized chunk
(in the workers); $KILL_AFTER_STEP: rank 0 SIGKILLs itself once it has logged that step."""
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import ds_mlm.data.build as build
import ds_mlm.data.ensure as ensure
from ds_mlm.trainer import Trainer

real_build_shards, real_tokenize, real_init = ensure.build_shards, build._tokenize, Trainer.__init__


def recorded(plan, dataset, shards, *args, **kwargs):
    with open(os.environ["RECORD"], "a") as f:
        for s in shards:
            print(os.environ.get("RANK", "0"), os.path.basename(dataset), s.name, file=f)
    while os.environ.get("HOLD_UNTIL") and not os.path.exists(os.environ["HOLD_UNTIL"]):
        time.sleep(0.05)
    return real_build_shards(plan, dataset, shards, *args, **kwargs)


def slow_tokenize(*args):
    time.sleep(float(os.environ.get("SLOW_CHUNK", "0")))
    return real_tokenize(*args)


def killing(trainer, record):  # the Trainer's public hook, after each record it writes
    if str(trainer.global_step) == os.environ.get("KILL_AFTER_STEP") and trainer.dist.rank == 0 and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)


def init_with_killing(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    self.on_log.append(killing)


ensure.build_shards, build._tokenize, Trainer.__init__ = recorded, slow_tokenize, init_with_killing
from ds_mlm.run_mlm import cli_main
cli_main()
'''


def write_wrapper(folder: Path) -> Path:
    path = folder / "wrapped_run_mlm.py"
    path.write_text(WRAPPER.format(repo=str(REPO)))
    return path


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    return {**env, **{k: str(v) for k, v in extra.items()}}


def corpus(root: Path, sizes) -> Path:
    """Files part-k.txt of the given numbers of lines of the sample corpus (Thai and English)."""
    from conftest import SAMPLE

    lines = [x for p in sorted((SAMPLE / "train").glob("*.txt")) for x in p.read_text(encoding="utf-8").splitlines()
             if x.strip()]
    root.mkdir(parents=True)
    at = 0
    for k, n in enumerate(sizes):
        (root / f"part-{k}.txt").write_text("\n".join(lines[at:at + n]) + "\n", encoding="utf-8")
        at += n
    return root


def recorded(path: Path) -> list:
    return [tuple(line.split()) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow  # four stores built through worker processes: 5-6 s, the fast tier's slowest test
def test_sources_weights_and_eval_sets_in_one_process(tmp_path, world_of_one, bpe_tokenizer_dir, caplog,
                                                      monkeypatch):
    from transformers import AutoTokenizer

    from ds_mlm.data import prepare
    from ds_mlm.data import dataset_plan as data_plan
    from ds_mlm.data.mixture import Mixture
    from ds_mlm.data.prepare import prepare_datasets

    hashed = []  # the tokenizer's fingerprint serialises the whole tokenizer: once per build, not once per split
    real_fingerprint = data_plan.tokenizer_fingerprint
    for module in (prepare, data_plan):
        monkeypatch.setattr(module, "tokenizer_fingerprint", lambda tok: hashed.append(1) or real_fingerprint(tok))

    news, web = corpus(tmp_path / "news", [200, 100]), corpus(tmp_path / "web", [50])
    eval_a, eval_b = corpus(tmp_path / "eval_a", [40]), corpus(tmp_path / "eval_b", [30])
    _, data_args, _ = parse_args(["--train_dir", str(news), str(web), "--train_weights", "1", "3", "--eval_dir",
                                  str(eval_a), str(eval_b), "--output_dir", str(tmp_path / "out"), *TINY])
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    with caplog.at_level(logging.INFO):
        train, evals = prepare_datasets(data_args, tokenizer, world_of_one, str(tmp_path / "cache"))
    assert isinstance(train, Mixture) and train.source_names == [str(news), str(web)]
    assert len(hashed) == 1, "the tokenizer was fingerprinted once for each split"
    assert [round(s, 2) for s in train.shares] == [0.25, 0.75]
    assert list(evals) == [str(eval_a), str(eval_b)] and all(len(d) > 0 for d in evals.values())
    assert sum(map(len, evals.values())) == len(__import__("ds_mlm.data", fromlist=["x"]).open_store(
        str(tmp_path / "cache" / "validation")))
    assert "train: built" in caplog.text and "validation: built" in caplog.text
    text = train.describe(1000)
    assert f"  {news}: 2 file(s), " in text and f"  {web}: 1 file(s), " in text and "weight 0.750" in text
    batch = train.__getitems__(list(range(0, len(train), 7)))
    assert all(s[0] == tokenizer.bos_token_id and s[-1] == tokenizer.eos_token_id for s in batch)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again, _ = prepare_datasets(data_args, tokenizer, world_of_one, str(tmp_path / "cache"),
                                    tokenizer_id=real_fingerprint(tokenizer))  # as run_mlm passes the plan's
    assert "train: reusing the token dataset" in caplog.text and "built" not in caplog.text
    assert len(hashed) == 1  # the caller's fingerprint was used
    assert [x.tolist() for x in again.__getitems__(range(20))] == [x.tolist() for x in train.__getitems__(range(20))]


@pytest.mark.slow
def test_two_processes_build_each_shard_exactly_once(tmp_path, bpe_tokenizer_dir):
    train = corpus(tmp_path / "train", [400, 50, 120, 300, 80, 200])
    evaluation = corpus(tmp_path / "eval", [60, 40])
    record = tmp_path / "record.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         write_wrapper(tmp_path), "--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir", train, "--eval_dir",
         evaluation, "--output_dir", tmp_path / "out", "--build_dataset_only", *TINY],
        cwd=REPO, env=clean_env(RECORD=record), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = recorded(record)
    names = [(split, name) for _, split, name in built]
    assert len(names) == len(set(names)) == 8  # 6 train files + 2 eval files, each tokenized once
    by_rank = {rank: sum((train / n.split(".")[0]).with_suffix(".txt").stat().st_size if split == "train" else
                         (evaluation / n.split(".")[0]).with_suffix(".txt").stat().st_size
                         for r, split, n in built if r == rank) for rank in ("0", "1")}
    assert min(by_rank.values()) > 0.3 * sum(by_rank.values())  # both built a fair share
    manifest = json.loads((tmp_path / "out" / "datasets_cache" / "train" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"][0]["shards"]] == sorted(n for sp, n in names if sp == "train")
    assert "rank 1: train: tokenized" in proc.stdout + proc.stderr  # the member's own report
    from transformers import AutoTokenizer

    from ds_mlm.data import DatasetSpec, ensure_store, list_input_files, open_store

    one = tmp_path / "one-process"  # best fit (the default) gives the same samples built by one process
    ensure_store(DatasetSpec(list_input_files(str(train), "txt"), AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir)),
                             64), str(one))
    two, ref = open_store(str(tmp_path / "out" / "datasets_cache" / "train")), open_store(str(one))
    assert len(two) == len(ref) and all(np.array_equal(a, b) for a, b in zip(two.__getitems__(range(len(two))),
                                                                                ref.__getitems__(range(len(ref)))))


@pytest.mark.slow
def test_a_second_job_on_the_same_cache_waits_then_reuses(tmp_path, bpe_tokenizer_dir):
    train = corpus(tmp_path / "train", [300, 200])
    wrapper, cache = write_wrapper(tmp_path), tmp_path / "cache"

    def job(name, **env):
        args = [sys.executable, wrapper, "--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir", train,
                "--output_dir", tmp_path / name, "--datasets_cache_dir", cache, "--build_dataset_only", *TINY]
        return subprocess.Popen([str(a) for a in args], cwd=REPO, env=clean_env(RECORD=tmp_path / f"{name}.txt", **env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = job("first", HOLD_UNTIL=tmp_path / "go")  # holds the cache's lock until told to build
    deadline = time.monotonic() + 120
    while not (cache / ".ds-mlm.lock").exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    second = job("second")
    said = []
    for line in second.stdout:  # the second job starts, finds the cache locked, and says it waits
        said.append(line)
        if "waiting for" in line and ": in use by" in line:
            break
    (tmp_path / "go").touch()
    out_second = "".join(said) + second.communicate(timeout=120)[0]
    out_first, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second
    assert len(recorded(tmp_path / "first.txt")) == 2 and recorded(tmp_path / "second.txt") == []
    assert f"waiting for {cache}: in use by dataset build on " in out_second
    assert "train: reusing the token dataset" in out_second and "train: built" in out_first


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to the process group", "SIGKILL"])
def test_a_signal_during_a_build_ends_every_worker_and_leaves_nothing(tmp_path, bpe_tokenizer_dir, how):
    train = corpus(tmp_path / "train", [300, 300])
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [str(a) for a in (sys.executable, write_wrapper(tmp_path), "--tokenizer_name_or_path", bpe_tokenizer_dir,
                          "--train_dir", train, "--output_dir", tmp_path / "out", "--datasets_cache_dir", cache,
                          "--build_dataset_only", "--tokenize_chunksize", "10", "--preprocessing_num_workers", "2",
                          *TINY)],
        cwd=REPO, env=clean_env(RECORD=tmp_path / "record.txt", SLOW_CHUNK=0.2), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)  # stdout and stderr are pipes, as under `| tee`
    deadline, workers = time.monotonic() + 90, []
    while time.monotonic() < deadline:  # the build is under way: workers busy, a shard being written
        workers = psutil.Process(proc.pid).children(recursive=True)
        shards = cache / "train" / "shards"
        if len(workers) >= 2 and shards.is_dir() and any(".tmp-" in n for n in os.listdir(shards)):
            break
        time.sleep(0.05)
    assert len(workers) >= 2, "the build never started its workers"
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    elif how == "SIGKILL":
        proc.kill()
    else:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
    out, err = proc.communicate(timeout=30)  # EOF on both pipes: nothing holds them open any more
    expected = {"SIGTERM": (143, "ds-mlm: stopped by SIGTERM"), "SIGKILL": (-9, None),
                "SIGINT to the process group": (130, "ds-mlm: interrupted")}[how]
    assert proc.returncode == expected[0]
    if expected[1]:
        assert [line for line in err.splitlines() if line.startswith("ds-mlm")] == [expected[1]]
        assert "Traceback" not in err and not any(".tmp-" in n for n in os.listdir(cache / "train" / "shards"))
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], f"workers still running: {alive}"


@pytest.mark.slow
def test_the_ancestors_command_with_add_space_token_and_byte_level_bpe_trains_and_exports(
        tmp_path, small_corpus, bpe_tokenizer_dir, world_of_one, capsys):
    from transformers import AutoModelForMaskedLM

    from ds_mlm.run_mlm import main

    out = tmp_path / "out"
    command = (f"--tokenizer_name_or_path {bpe_tokenizer_dir} --ext txt --train_dir {small_corpus[0]} "
               f"--eval_dir {small_corpus[1]} --fp16 --max_seq_length 64 --learning_rate 5e-4 --weight_decay 0.01 "
               "--adam_beta2 0.98 --adam_epsilon 1e-6 --max_steps 4 --per_device_train_batch_size 4 "
               "--per_device_eval_batch_size 4 --gradient_accumulation_steps 1 --warmup_steps 1 --seed 1234 "
               f"--save_steps 4 --logging_steps 2 --save_total_limit 1 --evaluation_strategy steps --eval_steps 4 "
               f"--prediction_loss_only --logging_dir {out}/logs --output_dir {out} --add_space_token "
               f"--datasets_cache_dir {out}/cache --datasets_type MemmapConcatFullSentenceTextDataset "
               "--architecture roberta-tiny").split()
    assert main(command) == 0  # run_mlm's logging replaces the root handlers: its lines go to stdout
    said = capsys.readouterr()
    warnings = [line for line in (said.out + said.err).splitlines() if "--add_space_token" in line]
    assert len(warnings) == 1 and "has no effect" in warnings[0] and "Traceback" not in said.err
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["samples_by_source"] for r in train_records] == [{str(small_corpus[0]): 8}, {str(small_corpus[0]): 16}]
    assert any("eval_loss" in r for r in records)
    assert AutoModelForMaskedLM.from_pretrained(out / "roberta_thai").config.vocab_size == 2000


@pytest.mark.slow
def test_samples_by_source_are_the_same_on_1_and_2_ranks_and_across_a_kill_9(tmp_path, bpe_tokenizer_dir):
    news, web = corpus(tmp_path / "news", [300, 200]), corpus(tmp_path / "web", [80])
    common = ["--tokenizer_name_or_path", bpe_tokenizer_dir, "--train_dir", news, web, "--train_weights", "1", "1",
              "--datasets_cache_dir", tmp_path / "cache", "--architecture", "roberta-tiny", "--max_seq_length", "64",
              "--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--deepspeed_config", "zero0.json"]
    wrapper = write_wrapper(tmp_path)

    def by_source(out):
        return [(r["step"], r["samples_by_source"]) for r in
                map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "samples_by_source" in r]

    one = subprocess.run([str(a) for a in (sys.executable, wrapper, *common, "--output_dir", tmp_path / "one",
                                           "--per_device_train_batch_size", "4")],
                         cwd=REPO, env=clean_env(RECORD=tmp_path / "r1.txt"), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def two(**env):
        return subprocess.run(
            [str(a) for a in (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              free_port(), wrapper, *common, "--output_dir", tmp_path / "two",
                              "--per_device_train_batch_size", "2")],
            cwd=REPO, env=clean_env(RECORD=tmp_path / "r2.txt", **env), capture_output=True, text=True, timeout=300)

    killed = two(KILL_AFTER_STEP=6)
    assert killed.returncode != 0 and [s for s, _ in by_source(tmp_path / "two")] == list(range(1, 7))
    assert (tmp_path / "two" / "latest_checkpoint").read_text().strip() == "checkpoint-4"
    resumed = two()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = by_source(tmp_path / "one")
    assert [s for s, _ in expected] == list(range(1, 9))
    assert by_source(tmp_path / "two") == expected  # 2 ranks, killed and resumed: the same samples from each source
    final = expected[-1][1]
    assert sum(final.values()) == 8 * 4 and set(final) == {str(news), str(web)}
    assert min(final.values()) >= 8  # weights 1:1 over 32 samples: both sources drawn, about equally


@pytest.mark.slow
def test_several_eval_sources_are_reported_each_and_overall(tmp_path, bpe_tokenizer_dir, world_of_one):
    from ds_mlm.run_mlm import main

    from conftest import SAMPLE

    train = corpus(tmp_path / "train", [200])
    thai, english = corpus(tmp_path / "eval_th", [40]), tmp_path / "eval_en"
    english.mkdir()
    (english / "botchan.txt").write_text("\n".join((SAMPLE / "eval" / "botchan.txt").read_text(encoding="utf-8")
                                                   .splitlines()[:80]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["--tokenizer_name_or_path", str(bpe_tokenizer_dir), "--train_dir", str(train), "--eval_dir",
                 str(thai), str(english), "--output_dir", str(out), *TINY, "--max_steps", "2", "--save_steps", "2",
                 "--evaluation_strategy", "steps", "--eval_steps", "2", "--deepspeed_config", "zero0.json"]) == 0
    [record] = [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "eval_loss" in r]
    a, b = record[f"eval_loss/{thai}"], record[f"eval_loss/{english}"]
    assert a != b and min(a, b) < record["eval_loss"] < max(a, b)  # overall: every masked token of both
    assert record[f"perplexity/{thai}"] == pytest.approx(math.exp(a))
