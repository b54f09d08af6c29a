"""Metrics: window averages, the jsonl log (appended, cut back on resume), TensorBoard scalars, the stdout line."""

import json
import time

import pytest
import torch

from ds_mlm.metrics import LOG_FILE, MetricsWriter, Window, format_record, perplexity, train_fill


def read_scalars(logdir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_window_is_per_masked_token_and_restores_on_its_holder_only():
    w = Window(torch.device("cpu"))
    for loss_sum, masked in ((20.0, 10), (40.0, 10), (30.0, 20)):  # micro-batch sums of the masked tokens' CE
        w.add_loss(torch.tensor(loss_sum))
        w.add_step(masked=masked, tokens=100, samples=2, waited=0.5, flops=1e14)
    saved = w.state_dict()
    seconds = saved.pop("seconds")
    assert saved == {"loss_sum": 90.0, "masked": 40, "tokens": 300, "samples": 6, "flops": 3e14, "positions": 0,
                     "waited": 1.5}
    assert seconds >= 0
    other = Window(torch.device("cpu"))
    other.load_state_dict({**saved, "seconds": 1000.0}, holder=True)  # the window had run 1000 s before the stop
    summary = other.summary()
    assert summary["loss"] == 90.0 / 40  # per masked token, not the mean of the micro-batch means (2.5, not 2.25)
    assert 0.29 < summary["tokens_per_s"] <= 0.3 and 0.0059 < summary["samples_per_s"] <= 0.006  # 300 / 1000 s
    assert summary["data_wait"] == pytest.approx(1.5 / 1000, rel=1e-3)
    assert summary["tflops"] == pytest.approx(0.3, rel=1e-3)  # 3e14 FLOPs / 1000 s / 1 rank / 1e12
    assert other.summary(world_size=4)["tflops"] == 0.0  # reset; per device: divided by the ranks
    after = other.state_dict()
    assert after.pop("seconds") < 1.0  # reset: a new window starts now
    assert after == {"loss_sum": 0.0, "masked": 0, "tokens": 0, "samples": 0, "flops": 0.0, "positions": 0,
                     "waited": 0.0}
    not_holder = Window(torch.device("cpu"))
    not_holder.load_state_dict({**saved, "seconds": 10.0}, holder=False)  # another rank: the sums are rank 0's
    assert not_holder.masked == 0 and not_holder.loss_sum.item() == 0.0


def test_padding_is_the_share_of_computed_positions_and_survives_a_resume(tmp_path):
    w = Window(torch.device("cpu"))
    assert w.summary()["padding"] is None  # nothing computed: no share to report
    w.add_step(masked=5, tokens=90, samples=2, waited=0.0, positions=2 * 64)  # two rows of width 64
    w.add_step(masked=5, tokens=120, samples=1, waited=0.0, positions=128)
    saved = w.state_dict()
    assert saved["positions"] == 256
    resumed = Window(torch.device("cpu"))
    resumed.load_state_dict(saved, holder=True)
    assert resumed.summary()["padding"] == pytest.approx(1 - 210 / 256)
    older = {k: v for k, v in saved.items() if k != "positions"}  # a checkpoint written before the field existed
    resumed.load_state_dict(older, holder=True)
    assert resumed.positions == 0
    w = MetricsWriter(str(tmp_path / "out"), str(tmp_path / "runs"), rank=0)
    w.write({"step": 3, "loss": 7.0, "padding": 0.25, "train_fill": 0.98})
    w.close()
    scalars = read_scalars(tmp_path / "runs")
    assert scalars["train/padding"] == [(3, 0.25)] and scalars["data/train_fill"][0][1] == pytest.approx(0.98)
    assert "padding 25.0%" in format_record({"step": 3, "padding": 0.25})


class Store:
    def __init__(self, sizes):
        self.sizes, self.num_tokens = sizes, sum(sizes)

    def __len__(self):
        return len(self.sizes)


def test_train_fill_is_ids_over_positions_of_one_store_or_all_sources():
    assert train_fill(Store([128, 64]), 128) == pytest.approx(192 / 256)

    class Mix:
        sources = [Store([128, 64]), Store([32])]

    assert train_fill(Mix(), 128) == pytest.approx(224 / 384)  # every sample of every source, unweighted
    assert train_fill([[0, 5, 2]], 128) is None  # a plain list of samples: unknown, not 0


def test_writer_jsonl_tensorboard_and_resume_cut(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    w = MetricsWriter(str(out), str(runs), rank=0)
    started = time.time() - 0.001  # the log rounds to ms
    assert not out.exists()  # opened at the first write: a run that fails before it leaves the old log alone
    w.write({"step": 1, "loss": 7.0, "lr": 1e-4, "grad_norm": 2.0, "tokens_per_s": 10.0, "samples_per_s": 1.0})
    cut = w.position()
    w.write({"step": 2, "loss": 6.5, "lr": 2e-4, "grad_norm": None, "tokens_per_s": 11.0, "samples_per_s": 1.1})
    w.write({"step": 2, "eval_loss": 6.0, "perplexity": perplexity(6.0)})
    w.close()
    lines = [json.loads(x) for x in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 2] and lines[1]["grad_norm"] is None
    times = [r["time"] for r in lines]  # when each was written: bench/startup.py's first-step time
    assert started <= times[0] <= times[1] <= times[2] <= time.time() + 0.001
    scalars = read_scalars(runs)
    assert scalars["train/loss"] == [(1, 7.0), (2, 6.5)]
    assert [s for s, _ in scalars["train/grad_norm"]] == [1]  # None is not plotted
    assert scalars["eval/perplexity"][0][1] == pytest.approx(perplexity(6.0), rel=1e-6)
    assert {"train/lr", "train/tokens_per_s", "train/samples_per_s", "eval/loss"} <= set(scalars)
    from ds_mlm.metrics import TENSORBOARD_TAGS

    assert {TENSORBOARD_TAGS[k] for k in ("tflops", "mfu", "peak_memory_gib", "data_wait")} == {
        "train/tflops", "train/mfu", "train/peak_memory_gib", "train/data_wait"}

    # a resume from the checkpoint taken after step 1: the later records are redone, so they are cut off
    second = int(time.time())  # event files sort by name: the time in whole seconds, then a per-process counter
    while int(time.time()) == second:  # compared as text ("10" < "9"), so the resumed writer starts a new second
        time.sleep(0.05)
    w = MetricsWriter(str(out), str(runs), rank=0, truncate_at=cut, purge_from=2)
    w.write({"step": 2, "loss": 6.4, "lr": 2e-4, "grad_norm": 1.0, "tokens_per_s": 9.0, "samples_per_s": 1.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in map(json.loads, (out / LOG_FILE).read_text().splitlines())] == [(1, 7.0), (2, 6.4)]
    assert read_scalars(runs)["train/loss"] == [(1, 7.0), (2, pytest.approx(6.4))]  # TensorBoard purged the redone step


def test_other_ranks_write_nothing(tmp_path):
    w = MetricsWriter(str(tmp_path / "out"), str(tmp_path / "runs"), rank=1)
    w.write({"step": 1, "loss": 1.0})
    w.close()
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_sources_get_their_own_curves(tmp_path):
    w = MetricsWriter(str(tmp_path / "out"), str(tmp_path / "runs"), rank=0)
    w.write({"step": 3, "loss": 1.0, "samples_by_source": {"news": 10, "web": 6}})
    w.write({"step": 3, "eval_loss": 2.0, "perplexity": 7.4, "eval_loss/news": 1.5, "perplexity/news": 4.5,
             "eval_loss/web": 2.5, "perplexity/web": 12.2})
    w.close()
    scalars = read_scalars(tmp_path / "runs")
    assert scalars["data/samples/news"] == [(3, 10.0)] and scalars["eval/web/loss"] == [(3, 2.5)]
    assert format_record({"step": 3, "loss": 1.0, "samples_by_source": {"a": 1}, "data_wait": 0.004}) == \
        "step 3 | loss 1.0000 | data_wait 0.4%"


def test_stdout_line():
    line = format_record({"step": 12, "loss": 6.91234, "lr": 4.2e-05, "grad_norm": None, "tokens_per_s": 10412.3,
                          "time": 1.7e9})  # a timestamp is for the file, not the screen
    assert line == "step 12 | loss 6.9123 | lr 4.200e-05 | tokens_per_s 10,412"
    assert perplexity(1e6) == float("inf")
