"""The model: `RobertaForMaskedLM` from an architecture preset, a config JSON, or warm-start weights.

The presets carry the ancestor's shapes (thai2transformers' roberta-base/large configs), plus `roberta-tiny` for tests
and CPU demos. The special-token ids follow the ancestor's layout: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
Before training, the tokenizer and the config must agree (special ids, vocabulary) and `max_seq_length` must fit the
position embeddings: each mismatch is a one-line UserError that says which value to change.
"""

import os

import torch.nn.functional as F
from transformers import RobertaConfig, RobertaForMaskedLM

from ds_mlm.collator import IGNORE_INDEX
from ds_mlm.errors import UserError

_COMMON = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, hidden_dropout_prob=0.1,
               attention_probs_dropout_prob=0.1, hidden_act="gelu", bos_token_id=0, pad_token_id=1,
               eos_token_id=2, initializer_range=0.02)
PRESETS = {
    "roberta-tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "roberta-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "roberta-large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}
SPECIAL = ("bos", "pad", "eos")  # the ids a RobertaConfig records; unk and mask are checked against the tokenizer only


class RobertaForMLMPretraining(RobertaForMaskedLM):
    """RobertaForMaskedLM whose training forward projects only the masked positions onto the vocabulary.

    `model(input_ids=..., attention_mask=..., labels=...)` returns (sum of the masked tokens' cross-entropy in fp32,
    number of masked tokens). The vocabulary projection is most of a small model's work (hidden 128, 8000 ids:
    2 M of the 2.8 M multiply-adds per token) and 85 % of the positions carry no label, so it is skipped there.
    Same parameters, same names: checkpoints and exports are plain RobertaForMaskedLM. Without labels it is the
    parent's forward, logits for every position.
    """

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = labels != IGNORE_INDEX
        logits = self.lm_head(hidden[picked])
        # fp32 cross-entropy: under bf16/fp16 the logits are low precision, their log-softmax must not be
        return F.cross_entropy(logits.float(), labels[picked], reduction="sum"), picked.sum()


def _load_json_config(path: str) -> RobertaConfig:
    try:
        return RobertaConfig.from_json_file(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read model config {path}: {e}; give a RobertaConfig JSON file") from None


def make_config(architecture: str, config_name, tokenizer) -> RobertaConfig:
    """The model config for a preset or a JSON file, with vocab_size and special ids taken from the tokenizer."""
    config = _load_json_config(config_name) if config_name else RobertaConfig(**_COMMON, **PRESETS[architecture])
    config.vocab_size = len(tokenizer)  # the ancestor sets it from the tokenizer, added tokens included
    return config


def check_compatible(config: RobertaConfig, tokenizer, max_seq_length: int) -> None:
    """The sanity checks of the ancestor, as one-line errors."""
    for name in SPECIAL:
        want, have = getattr(config, f"{name}_token_id"), getattr(tokenizer, f"{name}_token_id")
        if want != have:
            raise UserError(f"the tokenizer's {name} token id is {have} but the model config expects {want}: "
                            f"use a tokenizer with <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4 "
                            f"(ds-mlm-train-tokenizer writes one), or a --config_name with {name}_token_id={have}")
    if tokenizer.mask_token_id is None:
        raise UserError("the tokenizer has no mask token: add <mask> to it (ds-mlm-train-tokenizer does)")
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} "
                        "embeddings: use the tokenizer the model was trained with, or start from scratch")
    limit = config.max_position_embeddings - config.pad_token_id - 1  # RoBERTa positions start after the pad id
    if max_seq_length > limit:
        raise UserError(f"--max_seq_length {max_seq_length} does not fit max_position_embeddings "
                        f"{config.max_position_embeddings} (RoBERTa needs max_seq_length + pad_token_id + 1 <= "
                        f"max_position_embeddings): use --max_seq_length {limit} or less")


def _warm_start_dir(model_name_or_path, model_dir):
    path = model_name_or_path or model_dir
    if path is None:
        return None
    if not os.path.isdir(path):
        raise UserError(f"warm start directory {path} does not exist: give a directory with config.json and "
                        "model.safetensors or pytorch_model.bin")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "pytorch_model.bin")):
        raise UserError(f"{path} holds neither model.safetensors nor pytorch_model.bin: give the directory of a "
                        "saved model (e.g. an earlier ds-mlm export)")
    return path


def resolve_config(model_args, tokenizer, max_seq_length: int) -> RobertaConfig:
    """The config of the model to train (the warm-start model's, or the preset's / JSON's), checked against the
    tokenizer and max_seq_length. Cheap: no weights are read, so run_mlm calls it before writing anything."""
    warm = _warm_start_dir(model_args.model_name_or_path, model_args.model_dir)
    if warm is not None and os.path.exists(os.path.join(warm, "config.json")):
        config = _load_json_config(os.path.join(warm, "config.json"))
    else:  # a fresh model, or the ancestor's --model_dir holding only weights: the preset's shapes
        config = make_config(model_args.architecture, model_args.config_name, tokenizer)
    check_compatible(config, tokenizer, max_seq_length)
    if warm is not None and config.vocab_size != len(tokenizer):
        raise UserError(f"the warm-start model {warm} has {config.vocab_size} embeddings but the tokenizer "
                        f"{len(tokenizer)} tokens: use the tokenizer that model was trained with")
    return config


def build_model(model_args, tokenizer, max_seq_length: int) -> RobertaForMLMPretraining:
    """A fresh model from the preset or config, or the warm-start weights; checked against the tokenizer."""
    config = resolve_config(model_args, tokenizer, max_seq_length)
    warm = _warm_start_dir(model_args.model_name_or_path, model_args.model_dir)
    if warm is not None:
        return RobertaForMLMPretraining.from_pretrained(warm, config=config, local_files_only=True)
    return RobertaForMLMPretraining(config)


def count_parameters(config: RobertaConfig) -> int:
    """Parameters of the model a config describes, without allocating it (built on the meta device)."""
    import torch

    with torch.device("meta"):
        model = RobertaForMaskedLM(config)
    return sum(p.numel() for p in model.parameters())  # tied embeddings/lm_head counted once
