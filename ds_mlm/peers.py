"""Who is still there: each rank's heartbeat in the job's store, waits that poll the store instead of sitting in a
collective, and the one line that names a peer that stopped answering.

    peers = Peers(store, rank, world_size, stale_seconds)   # distributed.init makes one per process and starts it
    peers.wait(key, "rank 0's checkpoint conversion", watch=[0])   # a value some rank will set; gives up on silence
    peers.gather(name, value, senders)     # {rank: value} of `senders`, through the store
    peers.barrier(name)                    # every rank got here
    peers.silent()                         # [(rank, host)] of the ranks whose heartbeat stopped

Why: a collective waits at most the process group's timeout (--distributed_timeout_minutes), so work that only some
ranks do (hashing the inputs, checksums, an export, a checkpoint conversion) must not be waited for inside one, or a
short timeout would turn it into a false alarm. These waits poll the store and give up only when the rank they wait
for has stopped answering: its heartbeat (a thread that adds 1 to `alive/<rank>` every BEAT_SECONDS) has not moved
for stale_seconds. A stopped process (SIGSTOP), a hung node or a cut link stops its heartbeat; a busy one does not.

Store layout (keys under ds_mlm/peers/<torchelastic attempt>/): host/<rank> = hostname, alive/<rank> = beat count,
<name> = a value set once, <name>/count = arrivals at a barrier; after a loss, lost = rank 0's word on who was lost
("rank 1 on n2"), lost/read = how many other ranks have read it (or measured for themselves).
"""

import itertools
import logging
import os
import pickle
import socket
import threading
import time
from datetime import timedelta
from typing import Optional

from ds_mlm.errors import PeerLost

log = logging.getLogger(__name__)
BEAT_SECONDS = 2.0
SAY_WAITING_EVERY = 300.0


def _pauses(longest: float = 1.0):
    """20 ms at first (a quick answer is not delayed), growing to `longest` (a long wait keeps the store quiet)."""
    pause = 0.02
    while True:
        yield pause
        pause = min(pause * 1.5, longest)


class Peers:
    """See the module docstring."""

    def __init__(self, store, rank: int, world_size: int, stale_seconds: float):
        self.store, self.rank, self.world_size, self.stale_seconds = store, rank, world_size, stale_seconds
        self.prefix = f"ds_mlm/peers/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._stop = threading.Event()
        self._thread = None
        self._calls = itertools.count()  # every rank makes the same calls in the same order: one name per call
        self._verdict = None  # rank 0's word on who was lost, once read (it can outlive the store: describe_lost)
        self._acked = False
        self._published = None  # rank 0: how many ranks its published answer names as lost (None: it published none)
        self._ack_lock = threading.Lock()  # the heartbeat and the main thread may both ack: count one

    def unique(self, name: str) -> str:
        return f"{name}#{next(self._calls)}"

    def start(self) -> "Peers":
        self.store.set(f"{self.prefix}/host/{self.rank}", socket.gethostname())
        self._thread = threading.Thread(target=self._beat, name="ds-mlm-peers-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the heartbeat; it lets go of the store within a beat (bounded: a store call has its own timeout)."""
        self._stop.set()
        if getattr(self, "_thread", None) is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=BEAT_SECONDS + 1)

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"{self.prefix}/alive/{self.rank}", 1)
                if self.rank != 0 and self._verdict is None:
                    self._read_verdict()  # this rank may be held in a collective with rank 0 until rank 0 exits
            except Exception:  # noqa: BLE001 (the store is gone: the main thread's next wait says so)
                return
            self._stop.wait(BEAT_SECONDS)

    def _read_verdict(self) -> None:
        key = f"{self.prefix}/lost"
        if self.store.check([key]):
            self._verdict = self.store.get(key).decode()
            self._ack()

    def _ack(self) -> None:
        with self._ack_lock:
            if not self._acked:
                self.store.add(f"{self.prefix}/lost/read", 1)
                self._acked = True

    # -- asking the store -------------------------------------------------------------------------------------------

    def _call(self, method: str, *args):
        try:
            return getattr(self.store, method)(*args)
        except Exception:  # noqa: BLE001 (the store's network errors have no common public type)
            raise PeerLost(f"rank {self.rank}: lost the job's store, which lives with rank 0 on "
                            f"{os.environ.get('MASTER_ADDR', '?')}: rank 0 died, hangs or cannot be reached; its "
                            "log says why") from None

    def host(self, rank: int) -> str:
        key = f"{self.prefix}/host/{rank}"
        try:
            return self.store.get(key).decode() if self.store.check([key]) else "?"
        except Exception:  # noqa: BLE001 (naming the host is a courtesy)
            return "?"

    def _beats(self, rank: int) -> int:
        return self._call("add", f"{self.prefix}/alive/{rank}", 0)

    def watching(self, watch):
        """A check to call while waiting: raises a UserError naming a watched rank whose heartbeat stopped."""
        last = {r: (None, time.monotonic()) for r in watch if r != self.rank}

        def check(what: str) -> None:
            for r in last:
                beats = self._beats(r)
                if beats != last[r][0]:
                    last[r] = (beats, time.monotonic())
                elif time.monotonic() - last[r][1] > self.stale_seconds:
                    raise PeerLost(f"rank {self.rank}: rank {r} on {self.host(r)} stopped answering (no heartbeat "
                                    f"for {self.stale_seconds:.0f} s, --distributed_timeout_minutes) while this rank "
                                    f"waited for {what}: that host hangs, died or lost its network")
        return check

    # -- waits ------------------------------------------------------------------------------------------------------

    def wait(self, name: str, what: str, watch=(0,)) -> bytes:
        """The value some rank sets under `name`; gives up when a rank in `watch` stops answering."""
        key, check, pauses = f"{self.prefix}/{name}", self.watching(watch), _pauses()
        started = said = time.monotonic()
        while not self._call("check", [key]):
            check(what)
            if time.monotonic() - said > SAY_WAITING_EVERY:
                log.warning("rank %d: still waiting for %s (%.0f s)", self.rank, what, time.monotonic() - started)
                said = time.monotonic()
            time.sleep(next(pauses))
        return self._call("get", key)

    def put(self, name: str, value) -> None:
        self._call("set", f"{self.prefix}/{name}", pickle.dumps(value))

    def gather(self, name: str, value, senders, what: str) -> dict:
        """{rank: value} of every rank in `senders` (each sets its own; the others pass None)."""
        name = self.unique(name)
        if self.rank in senders:
            self.put(f"{name}/{self.rank}", value)
        return {r: pickle.loads(self.wait(f"{name}/{r}", what, watch=[r])) for r in senders}

    def barrier(self, name: str, what: str) -> None:
        """Every rank reached `name` (a wait that names whoever is silent, not a collective's timeout)."""
        key = f"{self.prefix}/{self.unique(name)}/count"
        check, pauses = self.watching(range(self.world_size)), _pauses()
        self._call("add", key, 1)
        while self._call("add", key, 0) < self.world_size:
            check(what)
            time.sleep(next(pauses))

    # -- after a collective gave up ---------------------------------------------------------------------------------

    def silent(self, window=None) -> list:
        """[(rank, host)] of the ranks whose heartbeat did not move over `window` seconds (default 3 beats);
        [(0, MASTER_ADDR)] when the store itself does not answer."""
        window = 3 * BEAT_SECONDS if window is None else window
        try:
            self.store.set_timeout(timedelta(seconds=window + 5))
            before = {r: self._beats(r) for r in range(self.world_size) if r != self.rank}
            time.sleep(window)
            return [(r, self.host(r)) for r, beats in before.items() if self._beats(r) == beats]
        except Exception:  # noqa: BLE001 (PeerLost from _call, or anything: the store is what stopped answering)
            return [(0, os.environ.get("MASTER_ADDR", "?"))]

    def describe_lost(self) -> str:
        """"rank 2 on n3" (the peers that stopped answering), for the lost-peer line. Rank 0, whose process serves the
        store, publishes what it found under `lost`, and every other rank's heartbeat reads it: a rank held in a
        collective with rank 0 learns of the loss only when rank 0 exits, and would find the store gone and name rank
        0. Each other rank adds 1 to `lost/read` once it has read or measured; rank 0 waits for that (`linger`)."""
        if self.rank != 0 and self._verdict is None:
            try:
                self._read_verdict()
            except Exception:  # noqa: BLE001 (the store is gone: measuring says so)
                pass
        if self._verdict is not None:
            return self._verdict
        lost = self.silent()
        said = ", ".join(f"rank {r} on {host}" for r, host in lost) if lost else ""
        try:
            if self.rank != 0:
                self._ack()
            elif said:  # nobody silent: each survivor measures for itself
                self.store.set(f"{self.prefix}/lost", said.encode())
                self._published = len(lost)
        except Exception:  # noqa: BLE001 (a courtesy to the others: this rank's own line is decided)
            pass
        return said

    def linger(self, seconds: float, readers: Optional[int] = None) -> None:
        """Rank 0, after publishing who was lost: keep serving the store until `readers` other ranks (by default every
        rank its answer did not name) have read it or measured for themselves, for at most `seconds`. A no-op on a
        rank that published nothing."""
        if self._published is None:
            return
        readers = self.world_size - 1 - self._published if readers is None else readers
        deadline, pauses = time.monotonic() + seconds, _pauses(0.2)
        try:
            while self.store.add(f"{self.prefix}/lost/read", 0) < readers and time.monotonic() < deadline:
                time.sleep(next(pauses))
        except Exception:  # noqa: BLE001 (nobody left to read it)
            pass
