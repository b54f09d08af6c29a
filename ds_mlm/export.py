"""The trained model as a self-contained HuggingFace directory, in fp32, from a live engine or a saved checkpoint.

Layout (the ancestor's, so its users' scripts keep working):

    {output_dir}/roberta_thai/             config.json, model.safetensors (fp32), tokenizer files:
                                           `AutoModelForMaskedLM.from_pretrained(dir)` and `pipeline("fill-mask", dir)`
    {output_dir}/roberta_thai_tokenizer/   the tokenizer alone

The weights are the fp32 master weights, not the bf16/fp16 copies the forward pass uses. In a live run every rank
calls `export_model` (gathering ZeRO partitions is collective) and rank 0 writes. From a checkpoint (any ZeRO stage,
no launcher needed):

    python -m ds_mlm.export --checkpoint OUT/checkpoint-500 --output_dir EXPORT [--tokenizer_dir T] [--force]

A directory is written beside its final name (NAME.tmp-HOST-PID) and renamed into place (atomic.py), so a crash
never leaves half an export, and the next export removes what a killed one left. A full disk is one line saying the
checkpoint is intact. A checkpoint without its COMPLETE marker was interrupted while saving: exporting it needs
--force.

Export never destroys what it did not write. Each directory it writes holds `.ds-mlm-export.json`:
{"format": "ds-mlm export", "step", "source" (the checkpoint, or "the run"), "files": [every file it wrote]}.
Before anything is read at length, `check_destination` refuses, in one line, a destination directory that holds a
file no export listed there (a user's file, or a directory without the marker), and an export of an older step
over a newer export; `--force` replaces them and says what it replaces. The final export of a run replaces the
run's own earlier export whatever its step (also one made by a ds-mlm older than the marker, recognised by holding
only names this export writes). (`zero_to_fp32.py --safe_serialization` fails on RoBERTa's tied embeddings; we
fill a fresh model instead and let `save_pretrained` handle the ties.)
"""

import argparse
import errno
import glob
import json
import logging
import os
import tempfile
from typing import Optional

import torch

from ds_mlm import atomic, distributed, preflight
from ds_mlm.errors import UserError, cli
from ds_mlm.optim import param_groups
from ds_mlm.output import setup_logging

log = logging.getLogger(__name__)

MODEL_DIR = "roberta_thai"
TOKENIZER_DIR = "roberta_thai_tokenizer"
MARKER = ".ds-mlm-export.json"
MODEL_FILES = {"config.json", "model.safetensors", "generation_config.json"}  # what save_pretrained writes
SHOWN = 3  # foreign files named in a refusal (all are counted)


# -- fp32 weights from a live engine ----------------------------------------------------------------------------

def _zero0_masters(optimizer) -> dict:
    """id(low-precision param) -> its fp32 master, for ZeRO-0 mixed precision (DeepSpeed's FP16 optimizers)."""
    low = getattr(optimizer, "fp16_groups", None)
    if low is None:
        return {}
    masters = {}
    if hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer: one master per param
        for group16, group32 in zip(low, optimizer.fp32_groups):
            masters.update({id(p): m for p, m in zip(group16, group32)})
    elif hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer: one flat master per group
        for group16, flat in zip(low, optimizer.fp32_groups_flat):
            for p, m in zip(group16, torch.split(flat, [p.numel() for p in group16])):
                masters[id(p)] = m.view_as(p)
    return masters


def gather_fp32_state_dict(engine, dist: distributed.DistInfo) -> dict:
    """name -> full fp32 CPU tensor of every parameter and buffer (rank 0's dict; the others' hold the buffers only).
    Collective under ZeRO: call on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param
    from deepspeed.runtime.zero import GatheredParameters

    masters = _zero0_masters(engine.optimizer)
    keep = dist.rank == 0  # only rank 0 writes
    out = {}
    for name, p in engine.module.named_parameters():  # the same order on every rank
        full = safe_get_full_fp32_param(p)  # ZeRO-1/2/3 (and DeepSpeed's BF16 optimizer): the fp32 partitions
        if full is None and id(p) in masters:
            full = masters[id(p)]
        if full is None:  # plain fp32, or a frozen parameter
            with GatheredParameters([p]):  # a no-op unless ZeRO-3 partitioned it
                full = p.data.detach().clone()
        if keep:
            out[name] = full.detach().float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
    for name, b in engine.module.named_buffers():
        out[name] = b.detach().cpu().clone()
    return out


# -- fp32 weights from a checkpoint directory -------------------------------------------------------------------

def _load_model_states(checkpoint_dir: str) -> dict:
    files = sorted(glob.glob(os.path.join(checkpoint_dir, "*mp_rank_00_model_states.pt")))
    if not files:
        raise UserError(f"{checkpoint_dir} holds no DeepSpeed model states (mp_rank_00_model_states.pt): give a "
                        "checkpoint-N directory written by ds-mlm")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def state_dict_from_checkpoint(checkpoint_dir: str, model) -> dict:
    """name -> fp32 tensor, from a saved checkpoint of any ZeRO stage; `model` (a fresh one) names the params."""
    checkpoint_dir = os.path.normpath(checkpoint_dir)
    if glob.glob(os.path.join(checkpoint_dir, "*zero_pp_rank_*_optim_states.pt")):  # ZeRO-1/2/3 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        parent, tag = os.path.split(checkpoint_dir)
        return dict(get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag))
    states = _load_model_states(checkpoint_dir)  # ZeRO-0: the module, plus the fp32 masters under mixed precision
    out = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    opt = states.get("optimizer") or {}
    groups = opt.get("fp32_groups")
    if groups is None and "fp32_groups_flat" in opt:
        groups = [list(flat) for flat in opt["fp32_groups_flat"]]  # split below, by the params' sizes
    if groups is not None:
        named = {id(p): n for n, p in model.named_parameters()}
        ours = [g["params"] for g in param_groups(model, 0.0) if g["params"]]  # the order the optimizer saw
        for params, masters in zip(ours, groups):
            if len(masters) != len(params):  # a flat group: cut it by the params' sizes
                masters = torch.split(torch.cat([torch.as_tensor(m).reshape(-1) for m in masters]),
                                      [p.numel() for p in params])
            for p, m in zip(params, masters):
                out[named[id(p)]] = m.float().reshape(p.shape)
    return out


# -- writing -----------------------------------------------------------------------------------------------------

def _fill(model, tensors: dict) -> None:
    missing = [n for n, _ in model.named_parameters() if n not in tensors]
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} parameters of the model (first: {missing[0]}): "
                        "is config.json the one this checkpoint was trained with?")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tensors[name].shape != p.shape:
                raise UserError(f"parameter {name} has shape {tuple(tensors[name].shape)} in the checkpoint but "
                                f"{tuple(p.shape)} in config.json: use the config of that run")
            p.copy_(tensors[name])
        for name, b in model.named_buffers():
            if name in tensors and tensors[name].shape == b.shape:
                b.copy_(tensors[name])


def export_bytes(num_params: int) -> int:
    """About what an export takes: fp32 weights once (the tokenizer files are small), plus 10 % of slack."""
    return int(num_params * 4 * 1.1) + (16 << 20)


def _written(what: str, output_dir: str, write, intact: str) -> None:
    """Run `write`; a full disk (or another OS error) is one line saying what is still intact."""
    try:
        write()
    except (OSError, RuntimeError) as e:  # safetensors and torch report a full disk as RuntimeError, without errno
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "space" in str(e).lower()
        why = "the disk is full" if full else str(e).splitlines()[0][:200]
        raise UserError(f"could not write {what} in {output_dir} ({why}); {intact}") from None


# -- what is already there --------------------------------------------------------------------------------------

def _files_under(directory: str) -> list:
    return sorted(os.path.relpath(os.path.join(folder, name), directory)
                  for folder, _, names in os.walk(directory) for name in names)


def read_marker(directory: str) -> Optional[dict]:
    """The marker of an export directory, or None (none there, or not ours)."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == "ds-mlm export" else None


def _mark(directory: str, step: Optional[int], source: str) -> None:
    record = {"format": "ds-mlm export", "step": step, "source": source, "files": _files_under(directory)}
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump(record, f, indent=1)


def own_names(tokenizer) -> set:
    """The file names an export of `tokenizer` writes (a directory of an export older than the marker holds only
    these): the model's and whatever the tokenizer saves."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return MODEL_FILES | set(_files_under(tmp))


def check_destination(output_dir: str, step: Optional[int] = None, force: bool = False, final_names=None) -> list:
    """A UserError when exporting (`step`) into `output_dir` would replace files no export wrote there, or a newer
    export; with `force`, the list of what it replaces. `final_names` (own_names()): the run's final export, which
    replaces its own earlier export of any step, and a pre-marker one holding only these names."""
    replaced = []
    for name in (MODEL_DIR, TOKENIZER_DIR):
        target = os.path.join(output_dir, name)
        if not os.path.lexists(target):
            continue
        record = read_marker(target) if os.path.isdir(target) else None
        ours = set(record["files"]) | {MARKER} if record else final_names or set()
        foreign = [f for f in _files_under(target) if f not in ours] if os.path.isdir(target) else [name]
        if foreign:
            what = f"{target} holds {len(foreign)} file(s) that no export wrote ({', '.join(foreign[:SHOWN])}" + \
                   (", ...)" if len(foreign) > SHOWN else ")")
            if not force:
                raise UserError(f"{what}: exporting would delete them; move them away or choose another --output_dir"
                                + ("" if final_names else " (or pass --force to replace the directory)"))
            replaced.append(what)
        elif record and final_names is None and step is not None and (record.get("step") or -1) > step:
            what = f"{target} holds the export of step {record['step']} ({record.get('source')})"
            if not force:
                raise UserError(f"{what}, newer than step {step}: pass --force to replace it with the older one, or "
                                "choose another --output_dir")
            replaced.append(what)
    return replaced


def save_model_dir(model, tensors: dict, tokenizer, output_dir: str, intact: str = "nothing was changed",
                   step: Optional[int] = None, source: str = "the run") -> str:
    """Fill a fresh fp32 CPU `model` with `tensors`; write {output_dir}/roberta_thai and .../roberta_thai_tokenizer,
    each with its marker (`step`, `source`). The caller has checked the destination (check_destination)."""
    _fill(model, tensors)
    model_dir = os.path.join(output_dir, MODEL_DIR)
    os.makedirs(output_dir, exist_ok=True)
    preflight.free_space(output_dir, export_bytes(sum(p.numel() for p in model.parameters())), "--output_dir",
                         f"the exported model ({intact})")

    def write():
        with atomic.staging_dir(model_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _mark(tmp, step, source)
        with atomic.staging_dir(os.path.join(output_dir, TOKENIZER_DIR)) as tmp:
            tokenizer.save_pretrained(tmp)
            _mark(tmp, step, source)

    _written("the exported model", output_dir, write, intact)
    return model_dir


def export_model(engine, tokenizer, output_dir: str, dist: distributed.DistInfo, intact: str = "nothing was changed",
                 step: Optional[int] = None) -> str:
    """The run's final export: the engine's fp32 weights (at `step`) with the tokenizer. Call on every rank; rank 0
    writes. `intact`: what the one-line error of a failed write says is still good (the run's last checkpoint)."""
    tensors = gather_fp32_state_dict(engine, dist)
    model_dir = os.path.join(output_dir, MODEL_DIR)

    def save():
        from transformers import RobertaForMaskedLM

        from ds_mlm.model import real_vocab_size, unpad_state_dict, unpadded_config

        # the plain HF class (what downstream code loads), without the training's padding rows (model.pad_vocab)
        fresh = RobertaForMaskedLM(unpadded_config(engine.module.config)).float()
        check_destination(output_dir, step, final_names=own_names(tokenizer))
        save_model_dir(fresh, unpad_state_dict(tensors, real_vocab_size(engine.module.config)), tokenizer,
                       output_dir, intact, step=step)
        log.info("exported the fp32 model and tokenizer to %s (tokenizer alone: %s)", model_dir,
                 os.path.join(output_dir, TOKENIZER_DIR))

    # rank 0 writes; every rank says its error, and none waits for it inside a collective (a slow disk is no timeout)
    dist.decide(save)
    return model_dir


def _check_checkpoint(checkpoint_dir: str, force: bool) -> None:
    """A checkpoint cut short or damaged is one line, before anything is read at length."""
    from ds_mlm.checkpoint_files import MARKER, damage, is_complete, readable_archive

    if not is_complete(checkpoint_dir):
        if not force:
            raise UserError(f"{checkpoint_dir} has no {MARKER} marker: its save was interrupted and its files may be "
                            "partial; export an earlier checkpoint, or pass --force to export it anyway")
        log.warning("%s has no %s marker (--force): its files may be partial", checkpoint_dir, MARKER)
        for path in glob.glob(os.path.join(checkpoint_dir, "*.pt")):
            if not readable_archive(path):
                raise UserError(f"{path} is not a readable archive (cut short): export an earlier checkpoint")
        return
    why = damage(checkpoint_dir)
    if why:
        raise UserError(f"{checkpoint_dir} is damaged ({why}): export an earlier checkpoint")


def export_checkpoint(checkpoint_dir: str, output_dir: str, tokenizer_dir=None, force: bool = False) -> str:
    """Export a saved checkpoint-N directory (config.json and tokenizer are saved in it by the trainer)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

    from ds_mlm.tokenization import load_tokenizer

    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"--checkpoint {checkpoint_dir}: no such directory; give an OUTPUT_DIR/checkpoint-N directory")
    if not os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
        raise UserError(f"{checkpoint_dir} has no config.json: give a checkpoint-N directory written by ds-mlm")
    _check_checkpoint(checkpoint_dir, force)
    from ds_mlm.checkpoint_files import step_of

    step = step_of(checkpoint_dir)
    for what in check_destination(output_dir, step if step >= 0 else None, force):
        log.warning("--force: replacing %s", what)
    from ds_mlm.model import real_vocab_size, unpad_state_dict, unpadded_config

    config = AutoConfig.from_pretrained(checkpoint_dir, local_files_only=True)
    tokenizer = load_tokenizer(tokenizer_dir or checkpoint_dir, "auto")
    rows = real_vocab_size(config)  # the checkpoint's tensors may hold padding rows past it (model.pad_vocab)
    if len(tokenizer) != rows:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but {checkpoint_dir} was trained with {rows}: "
                        "give the tokenizer of that run (or leave out --tokenizer_dir)")
    fresh = MODEL_FOR_MASKED_LM_MAPPING[type(config)](config).float()
    try:
        tensors = unpad_state_dict(state_dict_from_checkpoint(checkpoint_dir, fresh), rows)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as e:  # a file damaged past our checks
        raise UserError(f"{checkpoint_dir} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                        "export an earlier checkpoint") from None
    unpadded = unpadded_config(config)
    return save_model_dir(MODEL_FOR_MASKED_LM_MAPPING[type(unpadded)](unpadded).float(), tensors, tokenizer, output_dir,
                          f"{checkpoint_dir} is intact", step=step if step >= 0 else None,
                          source=os.path.abspath(checkpoint_dir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_mlm.export",
                                     description="Export a ds-mlm checkpoint as an fp32 HuggingFace model directory.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-N directory under a run's --output_dir")
    parser.add_argument("--output_dir", required=True, help="where roberta_thai/ and roberta_thai_tokenizer/ go")
    parser.add_argument("--tokenizer_dir", help="the tokenizer to ship with it (default: the one in the checkpoint)")
    parser.add_argument("--force", action="store_true",
                        help="export a checkpoint whose save was interrupted, and replace a destination that holds "
                             "files no export wrote or a newer export (each replacement is named)")
    args = parser.parse_args(argv)
    setup_logging()
    model_dir = export_checkpoint(args.checkpoint, args.output_dir, args.tokenizer_dir, args.force)
    print(f"exported {args.checkpoint} to {model_dir}")
    return 0


cli_main = cli(main)

if __name__ == "__main__":
    cli_main()
