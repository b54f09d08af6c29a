"""The token stores of a run: which files, who builds them, who waits, and a check that every rank reads the same.

One process builds a missing or stale store while the others wait: global rank 0 when `--datasets_cache_dir` is
shared by all nodes, local rank 0 of each node when it is not (`--cache_scope`, detected by default). Waiting ranks
poll for the finished store instead of sitting in a collective, so a build of many hours never trips the process
group's timeout; if the builder dies, the launcher ends the job. Before training, every rank checks that it opened
the store with the same fingerprint as rank 0.
"""

import logging
import os
import socket
import time
import uuid

from ds_mlm import distributed
from ds_mlm.data import DatasetSpec, StaleCacheError, ensure_store, list_text_files, open_store
from ds_mlm.errors import UserError

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
SAY_WAITING_EVERY = 60.0


def cache_is_shared(cache_dir: str, dist: distributed.DistInfo, scope: str) -> bool:
    """Whether all nodes see the same cache directory (then one build serves the whole job)."""
    if scope != "auto":
        return scope == "shared"
    if dist.world_size == dist.local_world_size:
        return True  # one node: trivially shared
    # Rank 0 drops a uniquely named file; every rank looks for it.
    probe = distributed.all_gather_object(uuid.uuid4().hex)[0]
    path = os.path.join(cache_dir, f".shared-probe-{probe}")
    if dist.is_main:
        open(path, "w").close()
    distributed.barrier()
    seen = all(distributed.all_gather_object(os.path.exists(path)))
    distributed.barrier()
    if dist.is_main:
        os.remove(path)
    return seen


def _wait_for_store(path: str, fingerprint: str, split: str):
    """Poll until the builder has renamed a complete store with this fingerprint into place."""
    started = last_said = time.monotonic()
    log.info("waiting for the %s dataset build (%s) by another rank", split, path)
    while True:
        try:
            return open_store(path, expect_fingerprint=fingerprint)
        except StaleCacheError:
            now = time.monotonic()
            if now - last_said >= SAY_WAITING_EVERY:
                log.info("still waiting for the %s dataset build (%.0f s)", split, now - started)
                last_said = now
            time.sleep(POLL_SECONDS)


def prepare_datasets(data_args, tokenizer, dist: distributed.DistInfo, cache_dir: str):
    """(train_dataset, eval_dataset or None), each a read-only memory-mapped token store."""
    splits = [("train", data_args.train_dir)]
    if data_args.eval_dir:
        splits.append(("validation", data_args.eval_dir))
    specs = {split: DatasetSpec(files=list_text_files(directory, data_args.ext), tokenizer=tokenizer,
                                block_size=data_args.max_seq_length, datasets_type=data_args.datasets_type,
                                long_sentence=data_args.long_sentence)
             for split, directory in splits}
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --datasets_cache_dir {cache_dir}: {e.strerror}; give a writable directory") from None
    if not os.access(cache_dir, os.W_OK):
        raise UserError(f"--datasets_cache_dir {cache_dir} is not writable: give a writable directory")

    shared = cache_is_shared(cache_dir, dist, data_args.cache_scope)
    builder = dist.rank == 0 if shared else dist.local_rank == 0
    datasets = {}
    for split, spec in specs.items():
        path = os.path.join(cache_dir, split)
        fingerprint = spec.fingerprint()
        if builder:
            report = ensure_store(spec, path, num_workers=data_args.preprocessing_num_workers,
                                  chunk_size=data_args.tokenize_chunksize, overwrite=data_args.overwrite_cache)
            if report is None:
                log.info("%s: reusing the token store in %s (its inputs are unchanged)", split, path)
            else:
                log.info("%s: built %s\n%s", split, path, report.format())
            datasets[split] = open_store(path, expect_fingerprint=fingerprint)
        else:
            datasets[split] = _wait_for_store(path, fingerprint, split)

    # Every rank must train on the same data: compare fingerprints across the job.
    mine = (socket.gethostname(), tuple(ds.fingerprint for ds in datasets.values()))
    everyone = distributed.all_gather_object(mine)
    odd = [f"rank {r} on {host}" for r, (host, fps) in enumerate(everyone) if fps != everyone[0][1]]
    if odd:
        raise UserError(f"the token stores differ between ranks ({', '.join(odd)} differ from rank 0 on "
                        f"{everyone[0][0]}): give every node the same --train_dir/--eval_dir files and tokenizer")
    return datasets["train"], datasets.get("validation")
