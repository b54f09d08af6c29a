"""The one build policy: make datasets match their plans, built by a group of processes (group.py) that share one
cache directory; a single process is the group of one (`ensure_dataset`, under DatasetSpec and the dataset classes).

    built = ensure_datasets(plans, paths, tokenizer, group, cache_dir)   every member of the group calls it
    report = ensure_dataset(plan, dataset, tokenizer)                      the same steps, alone

The leader (rank `group.leader`; the one process of a group of one):
  1. takes the cache's lock when given `cache_dir` (ds_mlm.lock.DirLock, waiting: a second job on the same cache
     waits, then reuses what the first built),
  2. refuses a dataset directory that holds something not ours (manifest.check_replaceable), and says when it
     replaces an older format,
  3. finds the shards that are there, complete and sound (`present_shards`; none with `overwrite`),
  4. deals the missing ones to the members, balanced by input size (dataset_plan.balance), and says the deal,
  5. builds its own share, as every member does (this host's leftovers removed, build.build_shards, read back
     against the checksums: `check_built`),
  6. waits for every member's "done" (a member's failure or silence is one line, group.py),
  7. per dataset: keeps a manifest that is current (`manifest_is_current`), or counts the shards, refuses a source
     without samples (`no_samples_error`) and writes the manifest (manifest.finalize),
  8. says "done" (or why it failed) to the members, who wait for that word.
"""

import contextlib
import dataclasses
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ds_mlm.data import manifest as layout
from ds_mlm.data.build import BuildReport, build_shards
from ds_mlm.data.dataset_plan import DatasetPlan, balance
from ds_mlm.data.group import BuildGroup
from ds_mlm.data.store import StaleCacheError, TokenStore
from ds_mlm.errors import Terminated, UserError
from ds_mlm.lock import DirLock

# verify.py is also a command (python -m ds_mlm.data.verify): imported where used, so that running it does not find
# it imported already by this package (runpy's warning)

log = logging.getLogger(__name__)  # a member's share is news from every rank (output.setup_logging)


@dataclass
class Built:
    """What the group did to one dataset whose manifest was not current (the leader's view)."""

    report: BuildReport
    """The leader's own share: `built` lists its shards (maybe none), `reused` counts the shards already there."""
    shards_built: int
    """Shards built by the whole group."""


def present_shards(plan: DatasetPlan, dataset: str, verify: str = "once") -> List[str]:
    """Names of the plan's shards that are in `dataset`, complete, of the right fingerprint and (as `verify` says)
    match their checksums; a damaged one is one warning line, and is left out (so it is built again)."""
    present = []
    for shard in plan.shards:
        try:
            TokenStore(layout.shard_path(dataset, shard.name), expect_fingerprint=shard.fingerprint)
            present.append(shard.name)
        except StaleCacheError:
            continue
    from ds_mlm.data.verify import check_shards

    for name, why in check_shards(dataset, present, verify):
        log.warning("%s: rebuilding this shard", why)
        present.remove(name)
    return present


def check_built(dataset: str, names: Sequence[str]) -> None:
    """Read back the shards just built against their checksums (and remember it for this host)."""
    from ds_mlm.data.verify import check_shards

    damaged = check_shards(dataset, names, "always")
    if damaged:
        raise UserError(f"{damaged[0][1]}, right after it was written: the disk or file system of "
                        f"--datasets_cache_dir loses data; check it, or choose another --datasets_cache_dir")


def shard_counts(plan: DatasetPlan, dataset: str) -> dict:
    """{name: (samples, tokens, data_crc32)} of every shard of the plan, from their headers (all must be there)."""
    counts = {}
    for shard in plan.shards:
        store = TokenStore(layout.shard_path(dataset, shard.name), expect_fingerprint=shard.fingerprint)
        counts[shard.name] = (len(store), store.num_tokens, store.data_crc32)
    return counts


def no_samples_error(plan: DatasetPlan, counts: dict, flag: str) -> Optional[UserError]:
    """A UserError naming each source that holds no sample at all, or None."""
    empty = [s.name for s in plan.sources if not sum(counts[sh.name][0] for sh in s.shards)]
    if not empty:
        return None
    return UserError(f"no sample from {flag} {', '.join(empty)} (no text, or every line longer than a sample with "
                     f"--long_sentence {plan.options.long_sentence}): add text to it")


def manifest_is_current(plan: DatasetPlan, dataset: str, present: Sequence[str], verify: str = "once") -> bool:
    """The manifest there is the plan's, every shard it names is `present` (sound), and so is its index."""
    manifest = layout.read_manifest(dataset)
    if manifest is None or manifest.get("fingerprint") != plan.fingerprint or len(present) != len(plan.shards):
        return False
    from ds_mlm.data.verify import check_index

    why = check_index(dataset, manifest, verify)
    if why:
        log.warning("%s: writing it again", why)
    return why is None


def _why(e: BaseException) -> str:
    """One line saying how a process stopped."""
    if isinstance(e, Terminated):
        return f"was stopped by {signal.Signals(e.signum).name}"
    if isinstance(e, KeyboardInterrupt):
        return "was interrupted"
    return " ".join(str(e).split()) or type(e).__name__


def _build_share(plans, paths, share: dict, tokenizer, group, num_workers, chunk_size) -> Dict[str, BuildReport]:
    """Build this process's `share` ({name: [shard names]}), read each back against its checksum; its reports."""
    for path in paths.values():
        layout.remove_leftovers(path)  # of builds on this host that were killed (each host cleans its own)
    reports = {}
    for name, shards in share.items():
        if not shards:
            continue
        wanted = set(shards)
        os.makedirs(os.path.join(paths[name], layout.SHARDS), exist_ok=True)
        report = build_shards(plans[name], paths[name], [s for s in plans[name].shards if s.name in wanted],
                              tokenizer, num_workers, chunk_size, beat=group.beat)
        check_built(paths[name], report.built)
        reports[name] = report
    return reports


def _lead(plans, paths, tokenizer, group, cache_dir, num_workers, chunk_size, overwrite, verify, flags):
    """Steps 1 to 7 (the module docstring); {name: Built, or None where the manifest was current}."""
    lock = DirLock(cache_dir, "dataset build", wait=True, flag="--datasets_cache_dir", idle=group.beat) \
        if cache_dir is not None else contextlib.nullcontext()
    with lock:
        for name, path in paths.items():
            older = layout.check_replaceable(path)
            if older:
                log.info("%s: %s; building it again as one shard per input file (format 2)", path, older)
        present = {name: [] if overwrite else present_shards(plan, paths[name], verify)
                   for name, plan in plans.items()}
        missing = list({f"{name}/{s.name}": dataclasses.replace(s, name=f"{name}/{s.name}")  # a file in two
                        for name, plan in plans.items() for s in plan.shards  # sources is one shard
                        if s.name not in present[name]}.values())
        shares = {rank: {} for rank in group.members}
        for rank, names in balance(missing, group.members).items():
            for qualified in names:
                name, shard = qualified.split("/", 1)
                shares[rank].setdefault(name, []).append(shard)
        group.say("plan", json.dumps({str(r): s for r, s in shares.items()}))
        own = _build_share(plans, paths, shares[group.rank], tokenizer, group, num_workers, chunk_size)
        group.wait_for_members()
        built = {}
        for name, plan in plans.items():
            if not missing and manifest_is_current(plan, paths[name], present[name], verify):
                built[name] = None
                continue
            counts = shard_counts(plan, paths[name])
            error = no_samples_error(plan, counts, flags[name])
            if error:
                raise error
            layout.finalize(plan, paths[name], counts)
            report = own.get(name) or build_shards(plan, paths[name], [], tokenizer, num_workers, chunk_size)
            report.reused = len(present[name])
            built[name] = Built(report, sum(1 for s in missing if s.name.startswith(f"{name}/")))
        return built


def _follow(plans, paths, tokenizer, group, cache_dir, num_workers, chunk_size) -> None:
    """A member: wait for the leader's deal, build its share, say "done" (or why not), wait for the leader's "done"."""
    share = json.loads(group.wait_for("plan")).get(str(group.rank), {})
    try:
        reports = _build_share(plans, paths, share, tokenizer, group, num_workers, chunk_size)
    except BaseException as e:
        group.say(f"member/{group.rank}", f"failed: {_why(e)}")
        raise
    for name, report in reports.items():
        log.info("rank %d: %s: tokenized %d shard(s) of %s (its share)\n%s", group.rank, name, len(report.built),
                 paths[name], report.format())
    group.say(f"member/{group.rank}", "done")
    log.info("rank %d: waiting for dataset build: rank %d writes the %s dataset in %s", group.rank, group.leader,
             group.what, cache_dir)
    group.wait_for("done")


def ensure_datasets(plans: Dict[str, DatasetPlan], paths: Dict[str, str], tokenizer, group: BuildGroup,
                    cache_dir: Optional[str] = None, num_workers: Optional[int] = None, chunk_size: int = 2500,
                    overwrite: bool = False, verify: str = "once",
                    flags: Optional[Dict[str, str]] = None) -> Dict[str, Optional[Built]]:
    """Make each dataset `paths[name]` match `plans[name]`, together with the other members of `group` (see the
    module docstring); every member calls it. `cache_dir`: the directory to lock while the leader builds (None:
    none); `flags`: the option naming each dataset's inputs, for errors. The leader gets {name: Built, or None
    where the manifest was current}; the other members get {} once the leader is done."""
    if chunk_size < 1:
        raise UserError(f"chunk size {chunk_size} must be at least 1 line (--tokenize_chunksize)")
    if num_workers is not None and num_workers < 1:
        raise UserError(f"{num_workers} workers: use at least 1 (--preprocessing_num_workers)")
    if not group.is_leader:
        _follow(plans, paths, tokenizer, group, cache_dir, num_workers, chunk_size)
        return {}
    try:
        built = _lead(plans, paths, tokenizer, group, cache_dir, num_workers, chunk_size, overwrite, verify,
                      flags or {name: "the input" for name in plans})
    except BaseException as e:  # whoever waits on the leader learns why, in one line
        if group.store is not None:
            if group.poll("plan") is None:
                group.say("plan", f"failed: {_why(e)}")
            group.say("done", f"failed: {_why(e)}")
        raise
    group.say("done", "done")
    return built


def ensure_dataset(plan: DatasetPlan, dataset: str, tokenizer, num_workers: Optional[int] = None,
                   chunk_size: int = 2500, overwrite: bool = False, verify: str = "once",
                   flag: str = "the input") -> Optional[BuildReport]:
    """Make the dataset at `dataset` match `plan` in this process (a group of one, without a lock); its
    BuildReport, or None when it already did."""
    built = ensure_datasets({"dataset": plan}, {"dataset": dataset}, tokenizer, BuildGroup.alone("dataset"),
                            num_workers=num_workers, chunk_size=chunk_size, overwrite=overwrite, verify=verify,
                            flags={"dataset": flag})["dataset"]
    return None if built is None else built.report
