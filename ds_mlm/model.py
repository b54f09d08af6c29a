"""The model: `RobertaForMaskedLM` from an architecture preset, a config JSON, or warm-start weights.

The presets carry the ancestor's shapes (thai2transformers' roberta-base/large configs), plus `roberta-tiny` for tests
and CPU demos. The special-token ids follow the ancestor's layout: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
Before training, the tokenizer and the config must agree (special ids, vocabulary) and `max_seq_length` must fit the
position embeddings: each mismatch is a one-line UserError that says which value to change.

Shapes for tensor cores (`--pad_vocab_multiple`, default 64): the embedding / LM-head rows are padded with zero rows
up to a multiple (2,000 -> 2,048; 50,265 -> 50,304), so the decoder matmul has aligned dimensions. The padded rows are
never an input (ids come from the tokenizer) and never a logit (the forward cuts them off before the softmax), so they
get no gradient and the numbers are those of the unpadded model; exports cut them away (`unpad_state_dict`).
`--attn_implementation` picks transformers' attention kernel (sdpa by default).
"""

import importlib.util
import os

import torch
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


MASKED_ROWS_MULTIPLE = 32  # the LM head's rows per micro-batch are padded to a multiple of this (_masked_loss)


class RobertaForMLMPretraining(RobertaForMaskedLM):
    """RobertaForMaskedLM whose training forward projects only the masked positions onto the vocabulary.

    `model(input_ids=..., attention_mask=..., labels=...)` returns (sum of the masked tokens' cross-entropy in fp32,
    number of masked tokens). The vocabulary projection is most of a small model's work (hidden 128, 8000 ids:
    2 M of the 2.8 M multiply-adds per token) and 85 % of the positions carry no label, so it is skipped there.
    Same parameters, same names: checkpoints and exports are plain RobertaForMaskedLM. Without labels it is the
    parent's forward, logits for every position. Logits stop at `real_vocab_size` (rows past it: see `pad_vocab`).
    """

    def __init__(self, config):
        super().__init__(config)
        self.real_vocab_size = real_vocab_size(config)  # len(tokenizer): rows past it are cut off the logits

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            out.logits = out.logits[..., :self.real_vocab_size]
            return out
        hidden = self.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._masked_loss(hidden, labels)

    # The masked positions are a data-dependent shape: if the whole model is compiled (engine.compile()), this part
    # stays eager, so the compiled graph keeps fixed shapes (a graph break here would recompile for every new count
    # of masked tokens). ds-mlm's --torch_compile compiles the encoder only (trainer.py).
    @torch.compiler.disable
    def _masked_loss(self, hidden, labels):
        picked = labels != IGNORE_INDEX
        rows, targets = hidden[picked], labels[picked]
        # The row count rounded up with ignored zero rows (no loss, zero gradients): a handful of head shapes in a
        # run instead of a new one nearly every step, each of which costs oneDNN a JIT-compiled bf16 kernel kept
        # for the process's life (+5 MiB per shape measured on CPU: the peak RSS grew ~13 MiB a step without it).
        extra = -rows.shape[0] % MASKED_ROWS_MULTIPLE
        if extra:
            rows = torch.cat([rows, rows.new_zeros(extra, rows.shape[1])])
            targets = torch.cat([targets, targets.new_full((extra,), IGNORE_INDEX)])
        logits = self.lm_head(rows)[:, :self.real_vocab_size]
        # fp32 cross-entropy: under bf16/fp16 the logits are low precision, their log-softmax must not be
        return F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX), picked.sum()


# -- tensor-core shapes ----------------------------------------------------------------------------------------------

VOCAB_ROWS = ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight", "lm_head.decoder.bias",
              "lm_head.bias")  # the tensors with one row per token id (decoder ones are tied to the other two)


def real_vocab_size(config) -> int:
    """The tokenizer's length: config.vocab_size, unless pad_vocab recorded it beside the padded row count."""
    return getattr(config, "unpadded_vocab_size", None) or config.vocab_size


def unpadded_config(config):
    """A copy of a (padded) training config as exports write it: vocab_size = the tokenizer's length."""
    import copy

    out = copy.deepcopy(config)
    out.vocab_size = real_vocab_size(config)
    if hasattr(out, "unpadded_vocab_size"):
        del out.unpadded_vocab_size
    return out


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """vocab_size rounded up to a multiple (1 or 0: unchanged)."""
    return vocab_size if multiple <= 1 else -(-vocab_size // multiple) * multiple


def pad_vocab(model: RobertaForMaskedLM, multiple: int) -> int:
    """Grow the word embeddings and the LM head (tied) to padded_vocab_size rows, appending zero rows; returns the
    new row count. Zeros draw no random numbers: every other weight, and the dropout stream, stay those of the
    unpadded model. The config then holds vocab_size = the padded rows (the shapes a checkpoint holds) and
    unpadded_vocab_size = the real ones (what exports keep)."""
    rows = padded_vocab_size(model.config.vocab_size, multiple)
    extra = rows - model.config.vocab_size
    if extra <= 0:
        return model.config.vocab_size
    embeddings, head = model.roberta.embeddings.word_embeddings, model.lm_head
    if not (head.decoder.weight is embeddings.weight and head.decoder.bias is head.bias):
        raise ValueError("pad_vocab expects the LM head tied to the word embeddings (as RobertaForMaskedLM ties them)")
    with torch.no_grad():
        embeddings.weight = torch.nn.Parameter(torch.cat([embeddings.weight, embeddings.weight.new_zeros(
            extra, embeddings.embedding_dim)]))
        head.bias = torch.nn.Parameter(torch.cat([head.bias, head.bias.new_zeros(extra)]))
    embeddings.num_embeddings = head.decoder.out_features = rows
    head.decoder.weight, head.decoder.bias = embeddings.weight, head.bias
    model.config.unpadded_vocab_size, model.config.vocab_size = model.config.vocab_size, rows
    return rows


def unpad_state_dict(tensors: dict, vocab_size: int) -> dict:
    """The same tensors with the per-token ones cut to `vocab_size` rows (an export of a padded model)."""
    return {k: v[:vocab_size] if k in VOCAB_ROWS and v.shape[0] > vocab_size else v for k, v in tensors.items()}


def check_attention(name: str) -> None:
    """flash_attention_2 exists only with the flash_attn package on a CUDA GPU: say so before anything is written."""
    if name == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None
                                        or not torch.cuda.is_available()):
        raise UserError("--attn_implementation flash_attention_2 needs the flash_attn package and a CUDA GPU "
                        "(pip install flash-attn): use sdpa, the default, which runs PyTorch's fused attention "
                        "kernels (FlashAttention among them on CUDA)")


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
    check_attention(model_args.attn_implementation)
    config._attn_implementation = model_args.attn_implementation  # not saved in config.json: exports load as sdpa
    return config


def build_model(model_args, tokenizer, max_seq_length: int, config=None) -> RobertaForMLMPretraining:
    """A fresh model from the preset or config, or the warm-start weights; checked against the tokenizer; its
    vocabulary rows padded to --pad_vocab_multiple (built unpadded first, so the initial weights do not depend on it).
    `config`: resolve_config's result when the caller has it already (it is not resolved twice)."""
    config = config or resolve_config(model_args, tokenizer, max_seq_length)
    warm = _warm_start_dir(model_args.model_name_or_path, model_args.model_dir)
    if warm is not None:
        model = RobertaForMLMPretraining.from_pretrained(warm, config=config, local_files_only=True,
                                                         attn_implementation=model_args.attn_implementation)
    else:
        model = RobertaForMLMPretraining(config)
    pad_vocab(model, model_args.pad_vocab_multiple)
    return model


def count_parameters(config: RobertaConfig) -> int:
    """Parameters of the model a config describes, without allocating it (built on the meta device)."""
    import torch

    with torch.device("meta"):
        model = RobertaForMaskedLM(config)
    return sum(p.numel() for p in model.parameters())  # tied embeddings/lm_head counted once
