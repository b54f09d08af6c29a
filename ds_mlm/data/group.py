"""The processes that build one dataset cache together, talking through the job's rendezvous store (ensure.py).

    group = BuildGroup(leader, members, rank, store, "train and validation")
    group = BuildGroup.alone("dataset")  a world of one: no store, nothing to wait for
    group.say("plan", text)           the leader's word to all, under a key; members: group.wait_for("plan")
    group.poll("plan")                the word under a key, or None while there is none (never waits)
    group.beat()                      "still making progress" (rate-limited), from a builder's loop
    group.wait_for_members()          the leader waits for every member's "done" (or its error)

Waits poll the store, never a collective: a build of many hours never trips the process group's timeout. A
waiting rank notices the leader's death (the store lives with rank 0; a node-local leader's death ends its node
through the launcher) as one line, and the leader notices a member whose build heartbeat stops for STALE_SECONDS.
Both also watch the process heartbeat of the ranks they wait for (`watch`, peers.py): a stopped or cut-off rank is
named within --distributed_timeout_minutes. A living rank whose build hangs gives up by itself (data/workers.py's
stuck bound, lock.py's wait bound) and says so to the group. Without a store (a world of one) there is no one to wait
for: saying and beating are no-ops, and the leader's wait for its members ends at once.
"""

import logging
import os
import time

from ds_mlm.errors import UserError

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # the longest pause between two looks at the store; the first looks come sooner (_pauses)
SAY_WAITING_EVERY = 300.0
BEAT_SECONDS = 5.0
STALE_SECONDS = 300.0  # a builder whose heartbeat has not moved for this long is dead or stuck


def _pauses():
    """Pauses between polls: 20 ms at first (a step of seconds is not delayed by one), growing to POLL_SECONDS (a
    wait of hours does not keep rank 0's store busy)."""
    pause = 0.02
    while True:
        yield pause
        pause = min(pause * 1.5, POLL_SECONDS)


class BuildGroup:
    """The processes building one cache, talking through the job's rendezvous store (None: a world of one)."""

    def __init__(self, leader: int, members: list, rank: int, store, what: str, watch=None):
        self.leader, self.members, self.rank, self.store, self.what = leader, members, rank, store, what
        self.watch = watch or (lambda what: None)  # check(what): raises PeerLost when a member stopped answering
        # A restarted torchrun attempt keeps its agent's store: the restart count keeps an old attempt's word out.
        self.prefix = f"ds_mlm/dataset/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{leader}"
        self._beaten = 0.0

    @classmethod
    def alone(cls, what: str) -> "BuildGroup":
        """A world of one: this process leads and is the only member."""
        return cls(0, [0], 0, None, what)

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    def _store(self, method: str, *args):
        """A call on the store; losing it (rank 0 died) is one line, wherever it happens."""
        try:
            return getattr(self.store, method)(*args)
        except Exception:  # noqa: BLE001 (the store's network errors have no common public type)
            raise UserError(f"rank {self.rank}: lost the job's rendezvous store while rank {self.leader} was "
                            f"building the {self.what} dataset: rank 0 has died; its log says why") from None

    def say(self, key: str, word: str) -> None:
        if self.store is not None:
            self._store("set", f"{self.prefix}/{key}", word)

    def beat(self) -> None:
        """Tell the leader this process is making progress (rate-limited: call it as often as you like)."""
        now = time.monotonic()
        if self.store is not None and now - self._beaten >= BEAT_SECONDS:
            self._store("add", f"{self.prefix}/beat/{self.rank}", 1)
            self._beaten = now

    def poll(self, key: str):
        """The word under `key`, or None while there is none."""
        if self.store is None or not self._store("check", [f"{self.prefix}/{key}"]):
            return None
        return self._store("get", f"{self.prefix}/{key}").decode()

    def wait_for(self, key: str) -> str:
        """The leader's word under `key` ("failed: ..." is raised as the leader's error)."""
        if self.store is None:  # a world of one: no leader's word will ever come
            raise ValueError(f"rank {self.rank} waits for {key!r} in a group without a store")
        started = said = time.monotonic()
        pauses = _pauses()
        while (word := self.poll(key)) is None:
            self.watch(f"rank {self.leader}'s {key!r} for the {self.what} dataset")
            if time.monotonic() - said >= SAY_WAITING_EVERY and self.rank == self.leader + 1:  # one voice
                log.info("rank %d: still waiting for the %s dataset build (%.0f s)", self.rank, self.what,
                         time.monotonic() - started)
                said = time.monotonic()
            time.sleep(next(pauses))
        if word.startswith("failed: "):
            raise UserError(f"rank {self.rank}: the {self.what} dataset build on rank {self.leader} "
                            f"{word}")
        return word

    def wait_for_members(self) -> None:
        """Every other member's "done"; a member's failure, or its silence for STALE_SECONDS, is a UserError."""
        waiting = {r: (None, time.monotonic()) for r in self.members if r != self.rank}
        pauses = _pauses()
        while waiting:
            for rank in list(waiting):
                word = self.poll(f"member/{rank}")
                if word is not None and word != "done":
                    raise UserError(f"rank {rank} could not build its share of the {self.what} dataset: {word}")
                if word == "done":
                    del waiting[rank]
                    continue
                beats = self._store("add", f"{self.prefix}/beat/{rank}", 0)
                if beats != waiting[rank][0]:
                    waiting[rank] = (beats, time.monotonic())
                elif time.monotonic() - waiting[rank][1] > STALE_SECONDS:
                    raise UserError(f"rank {rank} made no progress on its share of the {self.what} dataset for "
                                    f"{STALE_SECONDS:.0f} s: it died or hangs; its log says why")
            if waiting:
                self.watch(f"the members' shares of the {self.what} dataset")
                self.beat()  # the leader waiting is the leader alive
                time.sleep(next(pauses))


