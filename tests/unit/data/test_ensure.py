"""The one build policy (data/ensure.py): a group of processes and a group of one run the same routine, so a
run's build, a build shared by two processes and the ancestor's dataset class give the same bytes and manifest."""

import multiprocessing
import os
from datetime import timedelta

import orjson
import pytest
import torch.distributed as dist

import ds_mlm.data.ensure as ensure
from ds_mlm.args import DataArguments
from ds_mlm.data import DatasetSpec, MemmapConcatFullSentenceTextDataset, ensure_datasets, list_input_files
from ds_mlm.data.group import BuildGroup
from ds_mlm.data.manifest import MANIFEST
from ds_mlm.data.prepare import prepare_datasets
from ds_mlm.distributed import DistInfo, free_port

from unit.data.test_build import ByteTokenizer, store_bytes
from unit.data.test_shards import write_corpus


def manifest(path):
    return orjson.loads(open(os.path.join(path, MANIFEST), "rb").read())


def test_a_runs_build_and_the_dataset_class_write_the_same_bytes_and_manifest(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=3, lines=40)
    files = list_input_files(str(corpus), "txt")
    alone = str(tmp_path / "alone")
    dataset = MemmapConcatFullSentenceTextDataset(ByteTokenizer(), files, 64, alone, num_workers=1)
    args = DataArguments(train_dir=[str(corpus)], max_seq_length=64, preprocessing_num_workers=1)
    train, evals = prepare_datasets(args, ByteTokenizer(), DistInfo(0, 1, 0, 1), str(tmp_path / "cache"))
    run = str(tmp_path / "cache" / "train")
    assert evals is None and len(train) == len(dataset) > 0
    assert store_bytes(run) == store_bytes(alone)
    assert manifest(run) == manifest(alone)


def member(port, plans, paths, record):
    """Rank 1 of a group of two, in a forked process: its share, then the leader's word."""
    code = 0
    try:
        store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=60))
        group = BuildGroup(0, [0, 1], 1, store, "train")
        real = ensure.build_shards
        ensure.build_shards = lambda plan, d, shards, *a, **k: (
            open(record, "a").write("".join(f"{s.name}\n" for s in shards)), real(plan, d, shards, *a, **k))[1]
        assert ensure_datasets(plans, paths, ByteTokenizer(), group, num_workers=1) == {}
    except BaseException as e:  # noqa: BLE001 (reported through the exit status)
        print(f"member failed: {e}", flush=True)
        code = 1
    os._exit(code)


def test_a_group_of_two_shares_the_shards_and_writes_what_one_process_writes(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", n_files=4, lines=40)
    spec = DatasetSpec(list_input_files(str(corpus), "txt"), ByteTokenizer(), 64)
    alone = str(tmp_path / "alone")
    report = ensure.ensure_dataset(spec.plan(), alone, spec.tokenizer, num_workers=1)
    assert len(report.built) == 4 and report.reused == 0

    built = []
    real = ensure.build_shards
    monkeypatch.setattr(ensure, "build_shards", lambda plan, d, shards, *a, **k: (
        built.extend(s.name for s in shards), real(plan, d, shards, *a, **k))[1])
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=60), wait_for_workers=False)
    plans, paths = {"train": spec.plan()}, {"train": str(tmp_path / "cache" / "train")}
    (tmp_path / "cache").mkdir()  # the run's cache directory (prepare.py checks it is writable)
    record = tmp_path / "member.txt"
    record.touch()
    child = multiprocessing.get_context("fork").Process(target=member, args=(port, plans, paths, str(record)))
    child.start()
    try:
        done = ensure_datasets(plans, paths, spec.tokenizer, BuildGroup(0, [0, 1], 0, store, "train"),
                               cache_dir=str(tmp_path / "cache"), num_workers=1)["train"]
    finally:
        child.join(60)
    assert child.exitcode == 0
    other = record.read_text().split()
    assert built and other and not set(built) & set(other)  # each built a share, none twice
    assert done.shards_built == 4 and sorted(done.report.built) == sorted(built)
    assert store_bytes(paths["train"]) == store_bytes(alone)
    assert manifest(paths["train"]) == manifest(alone)
    # and again, alone: everything is there and current, nothing is built
    assert ensure.ensure_dataset(spec.plan(), paths["train"], spec.tokenizer, num_workers=1) is None


def test_a_group_of_one_needs_no_store_and_never_waits():
    group = BuildGroup.alone("dataset")
    assert group.is_leader and group.members == [0] and group.poll("plan") is None
    group.say("plan", "{}")
    group.beat()
    group.wait_for_members()  # no one to wait for
    with pytest.raises(ValueError, match="without a store"):
        group.wait_for("plan")  # a word that can never come: an error, not a hang
