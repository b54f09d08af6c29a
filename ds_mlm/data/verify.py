"""Checking token data against their checksums (issue 13: flipped bytes in data.bin went unnoticed until training
failed with a misleading message, or never, when the new ids were still in the vocabulary).

Each shard's header holds the crc32 of its data.bin and of its offsets, computed from the bytes as they were
written (store.py). They are compared with the files (`--verify_data`):

    once     (default) the first time each host opens a shard, remembered in DATASET/.verified/<host>.json keyed by
             the stat of both files (inode, size, mtime, ctime): a rebuilt or rewritten shard is checked again
    always   at every open
    never    not at all (the header, file sizes and offsets are still checked at every open)

The check reads the whole shard: crc32 runs at ~2 GB/s here, so about 7 ms for the 14 MB store of the 30 MB Thai
benchmark corpus from the page cache (bench/shards.py measures it; a cold disk is slower, at its read speed).
A damaged shard found while preparing a run is one warning line naming it, and it is rebuilt from its input.

    python -m ds_mlm.data.verify CACHE_DIR_OR_DATASET...

checks every shard of every dataset there, whatever the stamps say: one line per damaged shard (its stamps are
dropped, so the next run checks it again and rebuilds it), exit status 1; else one summary line, status 0.
"""

import argparse
import os
import socket
import time
from typing import Dict, List, Optional, Sequence, Tuple

import orjson

from ds_mlm import atomic
from ds_mlm.data.manifest import MANIFEST, STAMPS, ShardedStore, read_manifest, shard_path
from ds_mlm.data.store import DATA, INDEX, StaleCacheError, TokenStore
from ds_mlm.errors import UserError, cli
from ds_mlm.output import setup_logging

POLICIES = ("once", "always", "never")


def _identity(shard: str) -> list:
    out = []
    for name in (DATA, INDEX):
        st = os.stat(os.path.join(shard, name))
        out += [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return out


class Stamps:
    """The shards of one dataset that this host has verified, as {name: identity} (module docstring)."""

    def __init__(self, dataset: str):
        self.path = os.path.join(dataset, STAMPS, f"{socket.gethostname()}.json")
        try:
            with open(self.path, "rb") as f:
                self.seen: Dict[str, list] = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            self.seen = {}
        self.changed = False

    def fresh(self, name: str, identity: list) -> bool:
        return identity is not None and self.seen.get(name) == identity

    def set(self, name: str, identity) -> None:
        """Remember `name` as checked with this identity, or (None) as not checked."""
        if self.seen.get(name, False) != identity:
            self.seen[name], self.changed = identity, True

    def save(self) -> None:
        """Merge into the file as it is now (another builder on this host may have written it meanwhile; a lost
        update would only cost one more check), atomically."""
        if not self.changed:
            return
        mine, self.seen = self.seen, {}
        Stamps.__init__(self, os.path.dirname(os.path.dirname(self.path)))
        self.seen.update({k: v for k, v in mine.items() if v is not None})
        for name in [k for k, v in mine.items() if v is None]:
            self.seen.pop(name, None)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic.write_text(self.path, orjson.dumps({k: v for k, v in self.seen.items() if v is not None}).decode())
        self.changed = False


def check_shards(dataset: str, names: Sequence[str], policy: str = "once") -> List[Tuple[str, str]]:
    """Verify the shards `names` of `dataset` as `policy` says; [(name, why)] of the damaged ones."""
    if policy not in POLICIES:
        raise UserError(f"unknown --verify_data {policy!r}: use one of {', '.join(POLICIES)}")
    if policy == "never" or not names:
        return []
    stamps, damaged = Stamps(dataset), []
    for name in names:
        shard = shard_path(dataset, name)
        try:
            identity = _identity(shard)
            if policy == "once" and stamps.fresh(name, identity):
                continue
            TokenStore(shard).verify()
        except (StaleCacheError, OSError) as e:
            damaged.append((name, str(e)))
            stamps.set(name, None)
            continue
        stamps.set(name, identity)
    stamps.save()
    return damaged


def check_index(dataset: str, manifest: dict, policy: str = "once") -> Optional[str]:
    """Why the manifest's index file is damaged, or None (checked as `policy` says, stamped like a shard)."""
    if policy == "never":
        return None
    path, stamps = os.path.join(dataset, manifest["index"]), Stamps(dataset)
    try:
        st = os.stat(path)
        identity = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        if policy == "once" and stamps.fresh(manifest["index"], identity):
            return None
        ShardedStore(dataset).verify_index()
    except (StaleCacheError, OSError) as e:
        stamps.set(manifest["index"], None)
        stamps.save()
        return str(e)
    stamps.set(manifest["index"], identity)
    stamps.save()
    return None


def _datasets(paths: Sequence[str]) -> List[str]:
    found = []
    for path in paths:
        if os.path.isfile(os.path.join(path, MANIFEST)):
            found.append(path)
        elif os.path.isdir(path):
            found += sorted(os.path.join(path, e) for e in os.listdir(path)
                            if os.path.isfile(os.path.join(path, e, MANIFEST)))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_mlm.data.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="--datasets_cache_dir directories, or datasets (train/...) in them")
    args = parser.parse_args(argv)
    setup_logging()
    datasets = _datasets(args.paths)
    if not datasets:
        raise UserError(f"no token dataset (a directory with {MANIFEST}) in {' '.join(args.paths)}: give the "
                        "--datasets_cache_dir of a run")
    bad = 0
    for dataset in datasets:
        started, manifest = time.perf_counter(), read_manifest(dataset)
        names = [s["name"] for src in manifest["sources"] for s in src["shards"]]
        damaged = check_shards(dataset, names, "always")
        why = check_index(dataset, manifest, "always")
        if why:  # derived from the shards: the next run writes it again
            os.remove(os.path.join(dataset, MANIFEST))
            damaged.append(("index", why))
        for name, why in damaged:
            print(f"ds-mlm: damaged: {why}: the next run rebuilds {'it' if name == 'index' else 'this shard'}",
                  flush=True)
        bad += len(damaged)
        size = sum(os.path.getsize(os.path.join(shard_path(dataset, n), f)) for n in names for f in (DATA, INDEX)
                   if os.path.exists(os.path.join(shard_path(dataset, n), f)))
        print(f"{dataset}: {len(names)} shard(s), {size / 2**20:,.1f} MiB checked in "
              f"{time.perf_counter() - started:.2f} s: {len(damaged) or 'no'} damaged", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    cli(main)()
