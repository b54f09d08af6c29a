"""The slow tests of ds_mlm.data.build (processes, large files, the command): the fast ones are in
tests/unit/data/test_build.py."""

import multiprocessing
import os
import random
import shutil
import signal
import time

import pytest

from ds_mlm.data import DatasetSpec, StaleCacheError, ensure_store, list_text_files, open_store
from unit.data.test_build import build_alternately, leftovers, store_bytes, tokenizer  # noqa: F401 (fixtures among them)


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_store_that_looks_complete(tmp_path, tokenizer, sample_dirs):
    files = list_text_files(str(sample_dirs[0]), "txt")
    specs = [DatasetSpec(files, tokenizer, 128), DatasetSpec(files, tokenizer, 96)]
    started = time.perf_counter()
    reference = {}
    for k, spec in enumerate(specs):
        ensure_store(spec, str(tmp_path / f"ref{k}"), num_workers=2)
        reference[spec.fingerprint()] = store_bytes(tmp_path / f"ref{k}")
    build_seconds = (time.perf_counter() - started) / 2
    path, rng, seen = str(tmp_path / "victim"), random.Random(1234), {"complete": 0, "missing": 0, "leftover": 0}
    for k in range(12):
        if k % 2:  # every other round kills the very first build, with no older store in place
            shutil.rmtree(path, ignore_errors=True)
        victim = multiprocessing.get_context("fork").Process(target=build_alternately, args=(specs, path))
        victim.start()
        try:
            os.setpgid(victim.pid, victim.pid)  # also here: whichever runs first
        except OSError:
            pass
        time.sleep(rng.uniform(0.0, (0.8 if k % 2 else 2.0) * build_seconds))
        os.killpg(victim.pid, signal.SIGKILL)
        victim.join()
        seen["leftover"] += bool(leftovers(tmp_path))
        try:
            store = open_store(path)
        except StaleCacheError:
            seen["missing"] += 1
            continue
        seen["complete"] += 1
        assert store_bytes(path) == reference[store.fingerprint]  # complete means exactly an uninterrupted build
    print(f"kill -9 outcomes: {seen}")
    assert seen["leftover"] >= 6 and seen["missing"] >= 1, seen  # most kills landed in the middle of a write
    assert ensure_store(specs[0], path) is not None or seen["complete"]
    assert store_bytes(path) == reference[specs[0].fingerprint()]
    assert not leftovers(tmp_path)
