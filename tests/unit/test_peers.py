"""peers.py: waits through the job's store that end with the value, or name the rank whose heartbeat stopped.
End to end (a stopped rank while training and while building, through two launchers): tests/integration/test_peers.py.
"""

import pickle
import socket
import time
from datetime import timedelta

import pytest

from ds_mlm import peers as peersmod
from ds_mlm.errors import PeerLost
from ds_mlm.peers import Peers

from conftest import free_port


@pytest.fixture
def store():
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=10), wait_for_workers=False)


def test_a_wait_ends_with_the_value_or_names_the_silent_rank(store, monkeypatch):
    monkeypatch.setattr(peersmod, "BEAT_SECONDS", 0.05)
    rank0, rank1 = Peers(store, 0, 2, stale_seconds=0.3).start(), Peers(store, 1, 2, stale_seconds=0.3).start()
    try:
        name = rank0.unique("decide")
        rank1.unique("decide")
        rank0.put(name, "rank 0's word")
        assert rank1.gather("plans", None, [], "nothing") == {}
        assert pickle.loads(rank1.wait(name, "rank 0's word")) == "rank 0's word"
        rank0.stop()  # alive, silent: as a stopped process or a cut link
        time.sleep(0.1)
        with pytest.raises(PeerLost, match=f"rank 1: rank 0 on {socket.gethostname()} stopped answering \\(no "
                                           "heartbeat for 0 s, --distributed_timeout_minutes\\) while this rank "
                                           "waited for rank 0's export"):
            rank1.wait("never-set", "rank 0's export")
        assert rank1.silent(window=0.2) == [(0, socket.gethostname())]
        assert rank1.describe_lost() == f"rank 0 on {socket.gethostname()}"
    finally:
        rank0.stop()
        rank1.stop()


class Gone:
    """A store whose host has exited: every call fails."""

    def __getattr__(self, name):
        def fail(*args):
            raise RuntimeError("Connection reset by peer")
        return fail


def test_rank_0_publishes_who_was_lost_and_a_survivor_that_learns_after_rank_0_exited_names_the_same(store,
                                                                                                    monkeypatch):
    """A survivor held in a collective with rank 0 learns of the loss only when rank 0 exits, taking the store with it:
    its heartbeat has read rank 0's word meanwhile, so it names the lost rank, not rank 0."""
    monkeypatch.setattr(peersmod, "BEAT_SECONDS", 0.05)
    rank0, rank2 = Peers(store, 0, 3, stale_seconds=0.3).start(), Peers(store, 2, 3, stale_seconds=0.3).start()
    store.set(f"{rank0.prefix}/host/1", "n2")  # rank 1 started, then its host died: no heartbeat
    try:
        assert rank0.describe_lost() == "rank 1 on n2"
        started = time.monotonic()
        rank0.linger(seconds=5)  # until rank 2 (every rank but the lost one) has read it, by its heartbeat
        assert time.monotonic() - started < 1
        rank0.stop()
        rank2.stop()
        rank2.store = Gone()  # rank 0 has exited
        assert [r for r, _ in rank2.silent(window=0.1)] == [0]  # measuring now would blame rank 0
        assert rank2.describe_lost() == "rank 1 on n2"
        assert store.add(f"{rank0.prefix}/lost/read", 0) == 1  # read once, counted once
        started = time.monotonic()
        rank0.linger(seconds=0.3, readers=2)  # a survivor that never reads it: bounded
        assert 0.3 <= time.monotonic() - started < 1.5
    finally:
        rank0.stop()
        rank2.stop()


def test_rank_0_that_finds_nobody_silent_publishes_nothing(store, monkeypatch):
    """Its empty answer must not stop the others from measuring for themselves."""
    monkeypatch.setattr(peersmod, "BEAT_SECONDS", 0.05)
    rank0, rank1 = Peers(store, 0, 2, stale_seconds=0.3).start(), Peers(store, 1, 2, stale_seconds=0.3).start()
    try:
        assert rank0.describe_lost() == ""
        assert not store.check([f"{rank0.prefix}/lost"])
    finally:
        rank0.stop()
        rank1.stop()
