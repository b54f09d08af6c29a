"""Pretrain a RoBERTa masked language model with DeepSpeed: the story of one run.

    deepspeed ds_mlm/run_mlm.py --tokenizer_name_or_path T --train_dir D --eval_dir E --output_dir O ...
    torchrun --nproc_per_node 2 ds_mlm/run_mlm.py ...      python -m ds_mlm.run_mlm ...   (a world of one)

Flags are those of thai2transformers' / HuggingFace's run_mlm.py (`--help` lists them). The run: parse, join the
process group, check everything that can be checked, lock the output directory, build or open the token stores
(one builder per job), plan the run, choose the checkpoint to resume (refusing what does not fit), build the model
and its DeepSpeed engine, train (a signal ends it with a checkpoint and status 75), export, evaluate.
"""

import os
import sys

if __package__ in (None, ""):  # run as a file (deepspeed ds_mlm/run_mlm.py): import the package, not its siblings
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from dataclasses import dataclass  # noqa: E402

# Only what parsing needs at the top: `--help` and a bad flag answer without importing torch, transformers or
# DeepSpeed (seconds); each step of the run imports what it uses when it gets there (bench/startup.py measures it).
from ds_mlm.args import parse_args  # noqa: E402
from ds_mlm.errors import cli, exit_without_teardown  # noqa: E402

log = logging.getLogger(__name__)


@contextlib.contextmanager
def run_lock(dist, output_dir: str):
    """One training run per --output_dir for the job's lifetime (rank 0 holds it; lock.py says why it is safe on NFS)."""
    from ds_mlm import preflight
    from ds_mlm.lock import DirLock

    lock = DirLock(output_dir, "training run", flag="--output_dir")

    def take():
        preflight.writable_dir(output_dir, "--output_dir")
        lock.acquire()

    dist.decide(take)
    try:
        yield
    finally:
        if dist.is_main:
            lock.release()


def main(argv=None) -> int:
    return run(*parse_args(argv))


def run(model_args, data_args, train_args) -> int:
    """The run of parsed arguments; its exit status."""
    from ds_mlm import distributed, preflight
    from ds_mlm.export import check_destination, own_names
    from ds_mlm.model import count_parameters, resolve_config
    from ds_mlm.output import setup_logging
    from ds_mlm.data.prepare import prepare_datasets
    from ds_mlm.tokenization import load_tokenizer

    # A build-only run in a world of one never pays for DeepSpeed; every other run joins the process group first.
    single = distributed.env_info().world_size == 1  # mpirun/srun name their world with their own variables
    dist = distributed.env_info() if (data_args.build_dataset_only and single) else \
        distributed.init(train_args.distributed_timeout_minutes)
    setup_logging(dist.rank)

    # Everything that can be checked is checked before anything is written: a bad flag never touches a cache or a
    # checkpoint of an earlier run.
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path, model_args.tokenizer_type,
                               add_space_token=model_args.add_space_token, use_fast=model_args.use_fast_tokenizer)
    cache_dir = data_args.datasets_cache_dir or os.path.join(train_args.output_dir, "datasets_cache")
    if data_args.build_dataset_only:
        resolve_config(model_args, tokenizer, data_args.max_seq_length)  # a bad model flag stops the build too
        prepare_datasets(data_args, tokenizer, dist, cache_dir)
        log.info("--build_dataset_only: token stores are ready in %s", cache_dir)
        return 0

    job = plan_run((model_args, data_args, train_args), tokenizer, dist)
    check_destination(job.plan.output_dir, final_names=own_names(tokenizer))  # the final export will not be refused
    with run_lock(dist, train_args.output_dir):
        if dist.local_rank == 0:
            preflight.free_space(train_args.output_dir, preflight.checkpoint_bytes(
                count_parameters(job.model_config), job.plan.precision != "fp32"), "--output_dir",
                "one checkpoint and the final model")
        job.checkpointer.choose(job.plan)  # a refusal comes before an hours-long dataset build
        train_ds, eval_ds = prepare_datasets(data_args, tokenizer, dist, cache_dir, job.tokenizer_id)
        trainer = setup_training(job, tokenizer, train_ds, eval_ds)
        return train(trainer, tokenizer, train_args.save_on_signal)


@dataclass(frozen=True)
class Run:
    """A run before its data are known: what `plan_run` derives from the flags, the tokenizer and the world."""

    args: tuple
    """(model_args, data_args, train_args) as parse_args returned them."""
    model_config: object
    """The model's transformers config (model.resolve_config)."""
    plan: object
    """The run plan, without the step count (plan.make_plan)."""
    checkpointer: object
    """The checkpoint policy of --output_dir (checkpointer.Checkpointer)."""
    dist: object
    """The process group's DistInfo."""
    tokenizer_id: str
    """The tokenizer's fingerprint (data.spec.tokenizer_fingerprint: it serialises the tokenizer, so computed once)."""


def plan_run(args, tokenizer, dist) -> Run:
    """The model config, the plan (its warnings said once) and the checkpointer of a run."""
    from ds_mlm import precision
    from ds_mlm.checkpointer import Checkpointer
    from ds_mlm.data.spec import tokenizer_fingerprint
    from ds_mlm.model import resolve_config
    from ds_mlm.plan import make_plan

    model_args, data_args, train_args = args
    config = resolve_config(model_args, tokenizer, data_args.max_seq_length)
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    plan, warning = make_plan(model_args, data_args, train_args, precision.this_device(), dist.world_size, config,
                              tokenizer_id)
    if dist.is_main:
        for line in filter(None, [warning, _eval_warning(train_args, data_args)]):
            log.warning(line)
    return Run(args, config, plan, Checkpointer.from_args(dist, train_args), dist, tokenizer_id)


def _eval_warning(train_args, data_args):
    if train_args.evaluation_strategy != "no" and not data_args.eval_dir:
        return (f"--evaluation_strategy {train_args.evaluation_strategy} without --eval_dir: nothing will be "
                "evaluated (give --eval_dir)")
    return None


def setup_training(run: Run, tokenizer, train_ds, eval_ds):
    """The plan with its data, the resume accepted (checkpointer), the engine and the trainer, the checkpoint restored."""
    from transformers import set_seed  # noqa: E402 (heavy imports only on the training path)

    from ds_mlm import atomic
    from ds_mlm.engine import build_engine
    from ds_mlm.model import build_model
    from ds_mlm.trainer import make_trainer

    model_args, data_args, train_args = run.args
    plan = run.plan.with_data(len(train_ds))
    run.checkpointer.accept(plan)
    if run.dist.is_main:  # only once the resume is accepted: a refused one leaves the old run's record alone
        os.makedirs(plan.output_dir, exist_ok=True)
        atomic.write_text(os.path.join(plan.output_dir, "ds_config.json"),
                          json.dumps(plan.ds_config, indent=2, sort_keys=True) + "\n")

    set_seed(plan.seed)  # same initial weights on every rank and every run with this seed
    model = build_model(model_args, tokenizer, data_args.max_seq_length, run.model_config)
    engine = build_engine(plan, model)
    eval_sets = eval_ds if isinstance(eval_ds, dict) or eval_ds is None else {"eval": eval_ds}
    trainer = make_trainer(plan, engine, tokenizer, train_ds, eval_sets, run.dist, run.checkpointer, train_args)
    run.checkpointer.restore(trainer)
    announce(plan, train_ds)
    return trainer


def train(trainer, tokenizer, save_on_signal: bool) -> int:
    """Train, export, evaluate; the exit status (75 once a signal's checkpoint is saved)."""
    from ds_mlm.export import export_model
    from ds_mlm.signals import EXIT_PREEMPTED, StopOnSignal

    plan, dist = trainer.plan, trainer.dist
    with StopOnSignal(save_on_signal, prefix=f"[rank {dist.rank}] " if dist.world_size > 1 else "") as stop:
        outcome = trainer.train(stop)
    if outcome == "preempted" or stop.requested:  # saved, leaving; signals are ignored from here (signals.py)
        return EXIT_PREEMPTED
    last = os.path.join(plan.output_dir, f"checkpoint-{trainer.global_step}")
    export_model(trainer.engine, tokenizer, plan.output_dir, dist,
                 intact=f"{last} is intact: free some space, then export it with python -m ds_mlm.export "
                        f"--checkpoint {last} --output_dir {plan.output_dir}", step=trainer.global_step)
    if trainer.eval_sets:
        metrics = trainer.final_evaluation()
        log.info("final evaluation: eval_loss=%.4f perplexity=%.4f", metrics["eval_loss"], metrics["perplexity"])
    return 0


def announce(plan, train_ds) -> None:
    if hasattr(train_ds, "describe"):  # the sources: files, tokens, samples, weight, epochs in this run
        log.info("%s", train_ds.describe(plan.max_steps * plan.global_batch))
    train_samples = len(train_ds)
    tokens_per_step = plan.global_batch * plan.seq_length
    log.info("global batch %d = micro %d x grad accumulation %d x %d processes (%s tokens/step at %d per sample)",
             plan.global_batch, plan.micro_batch, plan.grad_accumulation, plan.world_size, f"{tokens_per_step:,}",
             plan.seq_length)
    log.info("training %d steps (%.2f epochs of %d samples): token budget %s; ZeRO-%d, %s, lr %.3g, %s schedule, "
             "warm-up %d", plan.max_steps, plan.epochs, train_samples, f"{plan.max_steps * tokens_per_step:,}",
             plan.zero_stage, plan.precision, plan.learning_rate, plan.schedule, plan.warmup_steps)


def build_dataset(argv=None) -> int:
    """`ds-mlm-build-dataset ...`: the same flags, builds the token stores and stops."""
    return main([*(sys.argv[1:] if argv is None else argv), "--build_dataset_only"])


def _command(argv=None) -> int:
    args = parse_args(argv)  # --help and a bad flag end here, before torch is imported
    from ds_mlm import distributed
    from ds_mlm.signals import watch_launcher

    watch_launcher()  # a rank whose launcher has gone stops like a signalled one, never trains on as an orphan
    ours = not distributed.initialized()  # an in-process caller's group (a test's) is the caller's to keep
    try:
        code = run(*args)
    except BaseException as e:
        if ours:
            distributed.leave(e)  # the error decides the exit status, not a C++ abort of a group left alive
        raise
    if ours:
        distributed.shutdown()  # a process about to exit: leave the group cleanly
    return code


cli_main = cli(_command)
build_dataset_main = cli(build_dataset)

if __name__ == "__main__":
    exit_without_teardown()  # the run's atexit handlers, then out: no 1.7 s teardown of torch and DeepSpeed
    cli_main()
