"""errors.cli: a lost peer (its connection closed, or silent past --distributed_timeout_minutes) is one line naming it,
status 3, no traceback; the line is also left in $DS_MLM_LOST_FILE for launch.sh's last word."""

import pytest

from ds_mlm import errors
from ds_mlm.errors import EXIT_PEER_LOST, PeerLost, cli


def test_a_collective_timeout_is_one_line_naming_the_silent_peer(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("DS_MLM_LOST_FILE", str(tmp_path / "lost"))
    monkeypatch.setattr(errors, "lost_peer_hint", lambda: "rank 2 on n3")

    def main(argv):
        raise RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation "
                           "to complete\nmore lines")

    with pytest.raises(SystemExit) as ended:
        cli(main)([])
    assert ended.value.code == EXIT_PEER_LOST
    assert capsys.readouterr().err == ("[rank 0] ds-mlm: error: lost contact with rank 2 on n3 (RuntimeError: "
                                       "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for "
                                       "recv operation to complete): it died, hangs or its network is cut; its own "
                                       "log says why\n")
    assert (tmp_path / "lost").read_text() == "rank 0 lost contact with rank 2 on n3\n"


def test_a_peer_lost_while_waiting_exits_3(capsys, monkeypatch):
    monkeypatch.delenv("DS_MLM_LOST_FILE", raising=False)

    def main(argv):
        raise PeerLost("rank 1: rank 0 on n1 stopped answering")

    with pytest.raises(SystemExit) as ended:
        cli(main)([])
    assert ended.value.code == EXIT_PEER_LOST and "rank 0 on n1 stopped answering" in capsys.readouterr().err


def test_other_runtime_errors_keep_their_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        cli(lambda argv: (_ for _ in ()).throw(RuntimeError("a bug, timed out in the code")))([])
