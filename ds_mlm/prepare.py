"""The token stores of a run: which files, who builds them, who waits, and a check that every rank reads the same.

One process builds a missing or stale store while the others wait: global rank 0 when `--datasets_cache_dir` is
shared by all nodes, the first rank of each node when it is not (`--cache_scope`; `auto` asks the file system, and
also handles a directory shared by some nodes only). Before anything is built, every rank compares the fingerprint
of its inputs (files and tokenizer) with everyone's: nodes that would train on other data stop the job with one line
naming them. Waiting ranks poll the job's rendezvous store for the builder's word ("done" or its error) instead of
sitting in a collective, so a build of many hours never trips the process group's timeout, a build error reaches
every rank, and a builder that dies (taking rank 0's store with it, or killed with its node) ends the wait.
"""

import logging
import os
import socket
import time
import uuid

from ds_mlm import distributed, preflight
from ds_mlm.data import DatasetSpec, StaleCacheError, ensure_store, list_text_files, open_store
from ds_mlm.errors import UserError

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)  # who builds and who waits is news from every rank (run_mlm shows INFO from rank 0 only)
POLL_SECONDS = 1.0
SAY_WAITING_EVERY = 300.0
VISIBLE_WITHIN = 60.0  # a store renamed into place on one NFS client can take a while to appear on the others


def builder_rank(cache_dir: str, dist: distributed.DistInfo, scope: str) -> int:
    """The global rank that builds the stores this rank reads."""
    if scope == "shared" or dist.world_size == dist.local_world_size:
        return 0
    if scope == "local":
        return dist.first_rank_on_node
    # auto: the first rank of each node drops a uniquely named file; a rank's builder is the lowest rank whose file
    # it sees. A never-used name is in no NFS client's negative lookup cache, so "not seen" means "not shared".
    probes = distributed.all_gather_object(uuid.uuid4().hex if dist.local_rank == 0 else None)
    paths = {rank: os.path.join(cache_dir, f".probe-{probe}") for rank, probe in enumerate(probes) if probe}
    if dist.local_rank == 0:
        open(paths[dist.rank], "w").close()
    distributed.barrier()
    builder = min(rank for rank, path in paths.items() if os.path.exists(path))
    distributed.barrier()
    if dist.local_rank == 0:
        os.remove(paths[dist.rank])
    return builder


def check_same_inputs(fingerprints: dict, dist: distributed.DistInfo) -> None:
    """Every rank must train on the same data: a one-line error naming the nodes whose inputs differ from node 0's."""
    everyone = distributed.all_gather_object((dist.node_rank, socket.gethostname(), fingerprints))
    odd = sorted({f"node {node} ({host})" for node, host, fps in everyone if fps != everyone[0][2]})
    if odd:
        raise UserError(f"the training data differ between nodes: {', '.join(odd)} read other --train_dir/--eval_dir "
                        f"files or another tokenizer than node 0 ({everyone[0][1]}); give every node the same files "
                        "(same paths, sizes and modification times: copy with rsync -a) and the same tokenizer")


def _signal_key(builder: int, split: str) -> str:
    # A restarted torchrun attempt keeps its agent's store: the restart count keeps an old attempt's word out.
    return f"ds_mlm/dataset/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{builder}/{split}"


def _build(spec, path: str, fingerprint: str, split: str, data_args, dist, store) -> None:
    """Build (or reuse) the store, then tell the waiting ranks how it went."""
    try:
        report = ensure_store(spec, path, num_workers=data_args.preprocessing_num_workers,
                              chunk_size=data_args.tokenize_chunksize, overwrite=data_args.overwrite_cache,
                              fingerprint=fingerprint)
    except BaseException as e:
        if store is not None:
            store.set(_signal_key(dist.rank, split), f"failed: {' '.join(str(e).split()) or type(e).__name__}")
        raise
    if report is None:
        log.info("rank %d: %s: reusing the token store in %s (its inputs are unchanged)", dist.rank, split, path)
    else:
        log.info("rank %d: %s: built %s\n%s", dist.rank, split, path, report.format())
    if store is not None:
        store.set(_signal_key(dist.rank, split), "done")


def _wait(path: str, fingerprint: str, split: str, builder: int, dist, store):
    """Wait for the builder's word, then open the finished store read-only."""
    key, started = _signal_key(builder, split), time.monotonic()
    log.info("rank %d: waiting for dataset build: rank %d builds the %s store in %s", dist.rank, builder, split, path)
    said = started
    while True:
        try:
            ready = store.check([key])
        except Exception:  # noqa: BLE001 (the store's network errors have no common public type)
            raise UserError(f"rank {dist.rank}: lost the job's rendezvous store while rank {builder} was building the "
                            f"{split} dataset: rank 0 has died; its log says why") from None
        if ready:
            break
        now = time.monotonic()
        if now - said >= SAY_WAITING_EVERY and dist.rank == builder + 1:  # one voice per builder is enough
            log.info("rank %d: still waiting for the %s dataset build (%.0f s)", dist.rank, split, now - started)
            said = now
        time.sleep(POLL_SECONDS)
    word = store.get(key).decode()
    if word != "done":
        raise UserError(f"rank {dist.rank}: the {split} dataset build on rank {builder} {word}")
    deadline = time.monotonic() + VISIBLE_WITHIN
    while True:
        try:
            return open_store(path, expect_fingerprint=fingerprint)
        except (StaleCacheError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise UserError(f"rank {dist.rank} on {socket.gethostname()}: rank {builder} built {path}, but this "
                                "node sees no such store there: the cache directory is not shared between these "
                                "nodes; use --cache_scope local (or auto)") from None
            time.sleep(POLL_SECONDS)


def prepare_datasets(data_args, tokenizer, dist: distributed.DistInfo, cache_dir: str):
    """(train_dataset, eval_dataset or None), each a read-only memory-mapped token store."""
    splits = [("train", "--train_dir", data_args.train_dir)]
    if data_args.eval_dir:
        splits.append(("validation", "--eval_dir", data_args.eval_dir))
    specs = {split: DatasetSpec(files=list_text_files(directory, data_args.ext, flag), tokenizer=tokenizer,
                                block_size=data_args.max_seq_length, datasets_type=data_args.datasets_type,
                                long_sentence=data_args.long_sentence)
             for split, flag, directory in splits}
    preflight.writable_dir(cache_dir, "--datasets_cache_dir")  # a real write: its error says why

    # Hashing the inputs reads them: once per node (its first rank), not once per process.
    mine = {split: spec.fingerprint() for split, spec in specs.items()} if dist.local_rank == 0 else None
    fingerprints = distributed.all_gather_object(mine)[dist.first_rank_on_node]
    check_same_inputs(fingerprints, dist)
    builder = builder_rank(cache_dir, dist, data_args.cache_scope)
    store = distributed.job_store()
    datasets = {}
    for split, spec in specs.items():
        path = os.path.join(cache_dir, split)
        if dist.rank == builder:
            _build(spec, path, fingerprints[split], split, data_args, dist, store)
            datasets[split] = open_store(path, expect_fingerprint=fingerprints[split])
        else:
            datasets[split] = _wait(path, fingerprints[split], split, builder, dist, store)
    return datasets["train"], datasets.get("validation")
