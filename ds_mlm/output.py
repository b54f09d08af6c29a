"""The output policy of ds-mlm: one channel per kind of output, configured once, at the entry points.

    news      `log = logging.getLogger(__name__)` in every module; no module sets a level or a handler when it is
              imported. `setup_logging(rank)` is called once by each command (run_mlm, export, train_tokenizer,
              data.verify): rank 0 tells the story at INFO, the other ranks speak only of trouble (WARNING), except
              the dataset build's who-builds / who-waits lines, news from every rank.
    progress  tqdm bars on stderr (the training loop, the tokenizer's reading); a log line during a bar goes
              through `tqdm.write`, so it does not land on the bar's line.
    metrics   metrics.MetricsWriter: train_log.jsonl and TensorBoard (rank 0), echoed on stdout as one line.
    results   `print` only at the command-line boundary: a command's own answer (export's "exported ...",
              data.verify's report, fill_mask's guesses) and errors.cli's one-line error.
"""

import logging
import sys

FORMAT, DATEFMT = "%(asctime)s [ds_mlm] %(message)s", "%H:%M:%S"
# the build's shares and waits: news from every rank
EVERY_RANK = ("ds_mlm.data.prepare", "ds_mlm.data.ensure", "ds_mlm.data.group")


def setup_logging(rank: int = 0, stream=None) -> None:
    """Configure logging for a command, once (rank 0 at INFO, the others at WARNING; see the module docstring).
    `stream`: sys.stdout as it is at the call (a caller may have replaced it), unless given."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=stream or sys.stdout,
                        format=FORMAT, datefmt=DATEFMT, force=True)
    for name in EVERY_RANK:
        logging.getLogger(name).setLevel(logging.INFO)
