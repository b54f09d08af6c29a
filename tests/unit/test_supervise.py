"""ds_mlm/supervise.py's exit-status rule, fast: a stopped job never says 0, and ranks that saved say 75. The
supervisor itself, on real process trees: tests/integration/test_supervise.py."""

import signal

import pytest

from ds_mlm.signals import EXIT_PREEMPTED
from ds_mlm.supervise import LAUNCHER_FAILED, Job, exit_status


@pytest.mark.parametrize("status, stop, orphans, expected", [
    (0, None, [], 0),  # a run that finished
    (3, None, [], 3),  # a rank's one-line error, passed on
    (-signal.SIGKILL, None, [], 128 + signal.SIGKILL),  # the launcher killed, nothing of its job left running
    (EXIT_PREEMPTED, signal.SIGTERM, [], EXIT_PREEMPTED),  # stopped here: the ranks saved
    (0, signal.SIGTERM, [EXIT_PREEMPTED], EXIT_PREEMPTED),  # deepspeed.launcher.launch killed: its runner says 0
    (LAUNCHER_FAILED, signal.SIGINT, [], 128 + signal.SIGINT),  # torchrun's generic 1 after a stop: never 0 or 1
    (0, signal.SIGTERM, [], 128 + signal.SIGTERM),
    # launch.py killed, its orphaned rank saved and ended before the runner's 0 was seen with it running: no stop was
    # begun here, and still the job is resumable (CI saw 0 here)
    (0, None, [EXIT_PREEMPTED], EXIT_PREEMPTED),
    (3, None, [EXIT_PREEMPTED], 3),  # a real failure beside a saved rank: the failure is the news
])
def test_exit_status(status, stop, orphans, expected):
    job = Job(command=["x"], status=status, stop=stop)
    job.orphans_ended = list(orphans)
    assert exit_status(job) == expected
