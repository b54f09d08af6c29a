"""The datasets of a run: which files, who builds which shards, who waits, and a check that every rank reads the same.

Each split (train: every --train_dir; validation: every --eval_dir) is one sharded dataset in --datasets_cache_dir
(ds_mlm/data/manifest.py), one shard per input file. Preparing them:

1. Plans (data/dataset_plan.py): the first rank of each node lists and fingerprints the inputs (once per node: hashing
   reads them) and shares them with its node; every rank compares the plans' fingerprints with everyone's: nodes
   that would train on other data stop the job with one line naming them.
2. Groups: the processes that see one cache directory build it together. Its leader is global rank 0 when the
   cache is shared by all nodes, the first rank of each node when it is node-local (`--cache_scope`; `auto` asks
   the file system, and also handles a directory shared by some nodes only).
3. Each group runs the one build policy (data/ensure.py): the leader takes the cache's lock (a second job on the
   same cache waits, then reuses what the first built), finds the shards that are there and sound, and deals the
   missing ones to the group's processes, balanced by input size. Each builds its share with its own worker pool
   (the node's cores are shared among its processes); the leader writes the manifests once all said "done".
4. Everyone opens the datasets read-only; the first rank of each node checks the checksums of the shards it has
   not checked yet (--verify_data, data/verify.py). The training set is a Mixture of the train sources
   (--train_weights); the evaluation sets are one dataset per --eval_dir.

After step 2, every wait polls the job's rendezvous store (never a collective), so a build of many hours never trips
the process group's timeout and an error anywhere reaches every rank of the group as one line (data/group.py).
"""

import logging
import os
import socket
import time
import uuid

from ds_mlm import distributed, preflight
from ds_mlm.data.dataset_plan import BuildOptions, plan_dataset
from ds_mlm.data.ensure import ensure_datasets
from ds_mlm.data.formats import distinct_sources, list_input_files
from ds_mlm.data.group import BuildGroup
from ds_mlm.data.manifest import ShardedStore, check_replaceable, known_identities, read_manifest
from ds_mlm.data.mixture import Mixture
from ds_mlm.data.spec import special_ids, tokenizer_fingerprint
from ds_mlm.data.store import StaleCacheError
from ds_mlm.data.verify import check_shards
from ds_mlm.errors import UserError

log = logging.getLogger(__name__)  # who builds and who waits is news from every rank (output.setup_logging)
POLL_SECONDS = 1.0
VISIBLE_WITHIN = 60.0  # a manifest renamed into place on one NFS client can take a while to appear on the others
SPLITS = (("train", "--train_dir", "train_dir"), ("validation", "--eval_dir", "eval_dir"))


def builder_rank(cache_dir: str, dist: distributed.DistInfo, scope: str) -> int:
    """The global rank that leads the build of the cache this rank reads."""
    if scope == "shared" or dist.world_size == dist.local_world_size:
        return 0
    if scope == "local":
        return dist.first_rank_on_node
    # auto: the first rank of each node drops a uniquely named file; a rank's builder is the lowest rank whose file
    # it sees. A never-used name is in no NFS client's negative lookup cache, so "not seen" means "not shared".
    probes = dist.gather(uuid.uuid4().hex if dist.local_rank == 0 else None)
    paths = {rank: os.path.join(cache_dir, f".probe-{probe}") for rank, probe in enumerate(probes) if probe}
    if dist.local_rank == 0:
        open(paths[dist.rank], "w").close()
    dist.barrier()
    builder = min(rank for rank, path in paths.items() if os.path.exists(path))
    dist.barrier()
    if dist.local_rank == 0:
        os.remove(paths[dist.rank])
    return builder


def check_same_inputs(fingerprints: dict, dist: distributed.DistInfo) -> None:
    """Every rank must train on the same data: a one-line error naming the nodes whose inputs differ from node 0's."""
    everyone = dist.gather((dist.node_rank, socket.gethostname(), fingerprints))
    odd = sorted({f"node {node} ({host})" for node, host, fps in everyone if fps != everyone[0][2]})
    if odd:
        raise UserError(f"the training data differ between nodes: {', '.join(odd)} read other --train_dir/--eval_dir "
                        f"files or another tokenizer than node 0 ({everyone[0][1]}); give every node the same files "
                        "(same paths, sizes and modification times: copy with rsync -a) and the same tokenizer")


def _workers(data_args, dist) -> int:
    # every process of the node builds: they share its cores
    cores = len(os.sched_getaffinity(0))
    return data_args.preprocessing_num_workers or max(1, cores // max(dist.local_world_size, 1))


def _open(plan, path: str, data_args, dist, group) -> ShardedStore:
    """The dataset, once this node sees it complete (a shared file system may take a moment)."""
    deadline = time.monotonic() + VISIBLE_WITHIN
    while True:
        try:
            store = ShardedStore(path, expect_fingerprint=plan.fingerprint)
            break
        except StaleCacheError:
            if time.monotonic() > deadline:
                raise UserError(f"rank {dist.rank} on {socket.gethostname()}: rank {group.leader} built {path}, but "
                                "this node sees no such dataset there: the cache directory is not shared between "
                                "these nodes; use --cache_scope local (or auto)") from None
            time.sleep(POLL_SECONDS)
    if dist.local_rank == 0:  # once per node: shards built on other hosts, or never checked here
        damaged = check_shards(path, store.shard_names, data_args.verify_data)
        if damaged:
            raise UserError(f"{damaged[0][1]} (as read on {socket.gethostname()}): run again to rebuild it")
    return store


def _sources(data_args):
    """{split: [(directory as given, its files)]}: listed first, so a missing folder fails before any write."""
    out = {}
    for split, flag, field in SPLITS:
        dirs = getattr(data_args, field) or []
        if dirs:
            out[split] = distinct_sources([(d, list_input_files(d, data_args.ext, flag)) for d in dirs], flag)
    return out


def prepare_datasets(data_args, tokenizer, dist: distributed.DistInfo, cache_dir: str, tokenizer_id=None):
    """(train dataset: a Mixture of the train sources, {eval source: dataset} or None); see the module docstring.
    `tokenizer_id`: the tokenizer's fingerprint, where the caller computed it already."""
    sources = _sources(data_args)
    options = BuildOptions(block_size=data_args.max_seq_length, datasets_type=data_args.datasets_type,
                           long_sentence=data_args.long_sentence, text_field=data_args.text_field,
                           packing=data_args.packing)
    preflight.writable_dir(cache_dir, "--datasets_cache_dir")  # a real write: its error says why
    paths = {split: os.path.join(cache_dir, split) for split in sources}
    for path in paths.values():  # a foreign directory fails now, before hashing; the leader checks again, locked
        check_replaceable(path)
    mine = None
    if dist.local_rank == 0:  # hashing the inputs reads them: once per node (its first rank), not once per process
        if tokenizer_id is None:  # hashed once for every split: it serialises the whole tokenizer
            special_ids(tokenizer)  # a tokenizer without <s> and </s> fails here, before anything is hashed
            tokenizer_id = tokenizer_fingerprint(tokenizer)
        mine = {split: plan_dataset(srcs, tokenizer, options, known_identities(read_manifest(paths[split])),
                                    tokenizer_id) for split, srcs in sources.items()}
    # through the store, not a collective: hashing a large corpus may take longer than --distributed_timeout_minutes
    nodes = sorted(set(dist.gather(dist.first_rank_on_node)))
    plans = distributed.gather_from("plans", mine, nodes, "the first rank of each node to fingerprint the inputs")[
        dist.first_rank_on_node]
    check_same_inputs({split: plan.fingerprint for split, plan in plans.items()}, dist)
    leader = builder_rank(cache_dir, dist, data_args.cache_scope)
    members = [rank for rank, lead in enumerate(dist.gather(leader)) if lead == leader]
    group = BuildGroup(leader, members, dist.rank, distributed.job_store(), " and ".join(sources),
                       distributed.watcher(members))
    built = ensure_datasets(plans, paths, tokenizer, group, cache_dir, _workers(data_args, dist),
                            data_args.tokenize_chunksize, data_args.overwrite_cache, data_args.verify_data,
                            {split: flag for split, flag, _ in SPLITS})
    for split, done in built.items():
        if done is None:
            log.info("rank %d: %s: reusing the token dataset in %s (its inputs are unchanged)", dist.rank, split,
                     paths[split])
        else:
            log.info("rank %d: %s: built %s: %d shard(s) built by %d process(es), %d reused%s", dist.rank, split,
                     paths[split], done.shards_built, len(members), done.report.reused,
                     f"\n{done.report.format()}" if done.report.built else "")
    # Everyone has the word within POLL_SECONDS: rank 0 must not leave (--build_dataset_only) and take the store
    # with it before then
    dist.barrier()
    for split in plans:
        _open(plans[split], paths[split], data_args, dist, group)
    distributed.wait_all("datasets open", "every node to check its dataset shards")  # checksums take their time
    train = Mixture([ShardedStore(paths["train"], plans["train"].fingerprint, source=k)
                     for k in range(len(plans["train"].sources))], data_args.train_dir, data_args.train_weights,
                    seed=data_args.data_seed)
    evals = None
    if "validation" in plans:
        evals = {name: ShardedStore(paths["validation"], plans["validation"].fingerprint, source=k)
                 for k, name in enumerate(data_args.eval_dir)}
    return train, evals
