"""Pad a micro-batch and mask it for masked language modelling, with the masking seeded per sample.

Masking follows BERT/RoBERTa as HF's `DataCollatorForLanguageModeling` does (same distribution): each token that is
neither special nor padding is selected with probability `mlm_probability`; a selected token becomes `<mask>` with
probability `mask_replace_prob` (0.8), a random token of the regular vocabulary (never a special token) with
probability `random_replace_prob` (0.1), and stays unchanged otherwise. `labels` hold the original token at the
selected positions and -100 everywhere else.

HF's collator draws from one RNG stream, so its masks depend on the batch order, the world size and every earlier
call. Here every decision is a counter-based hash (splitmix64) of (seed, epoch, sample index, position), as the
seeding of fairseq's `MaskTokensDataset`: a sample is masked the same way whichever batch, rank or run it lands in.
A resumed or re-sharded run masks the same tokens, each epoch masks afresh (dynamic masking), and an evaluation
with a fixed (seed, epoch) masks identically every time. The work is one numba loop over the tokens.

Whole-word masking (optional, `word_start`): a word is a token that starts a word and the tokens after it that do
not; the selection is decided once per word (by the hash at its first token) and covers all its tokens, each of
which is then replaced 80/10/10 on its own (as HF's `DataCollatorForWholeWordMask`).
"""

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from numba import njit

from ds_mlm.errors import UserError
from ds_mlm.hashing import GOLDEN, U64, epoch_key, mix64

IGNORE_INDEX = -100  # the label torch's cross-entropy ignores by default
_SELECT, _REPLACE, _RANDOM = np.uint64(1), np.uint64(2), np.uint64(3)  # one hash stream per decision
_UNIT = float(1 << 53)  # a decision compares a hash's top 53 bits with probability * 2**53


@njit(cache=True, nogil=True)
def _sample_keys(seed, epoch, indices):
    """One 64-bit key per sample from (seed, epoch, sample index)."""
    keys = np.empty(indices.size, dtype=np.uint64)
    base = epoch_key(seed, epoch)
    for i in range(indices.size):
        keys[i] = mix64(base ^ mix64(np.uint64(indices[i]) + GOLDEN))
    return keys


@njit(cache=True, nogil=True)  # the loader thread masks while the training thread computes
def _mask_kernel(flat, offsets, keys, is_special, word_start, regular, mask_id, select_below, replace_below,
                 random_below, input_ids, attention_mask, labels):
    """Copy sample b (flat[offsets[b]:offsets[b+1]]) into row b of the outputs, pre-filled as padding, and mask it."""
    n_regular = np.uint64(regular.size)
    for b in range(offsets.size - 1):
        begin = offsets[b]
        selected = False
        for j in range(offsets[b + 1] - begin):
            token = flat[begin + j]
            input_ids[b, j] = token
            attention_mask[b, j] = 1
            if is_special[token]:
                continue
            counter = keys[b] + np.uint64(j) * GOLDEN
            if word_start[token] or j == 0 or is_special[flat[begin + j - 1]]:  # a new word: decide once for it
                selected = (mix64(counter ^ _SELECT) >> np.uint64(11)) < select_below
            if not selected:
                continue
            labels[b, j] = token
            u = mix64(counter ^ _REPLACE) >> np.uint64(11)
            if u < replace_below:
                input_ids[b, j] = mask_id
            elif u < random_below:
                input_ids[b, j] = regular[mix64(counter ^ _RANDOM) % n_regular]


def _help(default, text: str, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(eq=False)  # word_start is an array: collators compare by identity
class MLMCollator:
    """`collator(samples, indices, epoch)` -> {"input_ids", "attention_mask", "labels"}; see the module docstring."""

    mask_token_id: int = _help(None, "Id of <mask>.")
    pad_token_id: int = _help(None, "Id of <pad>: fills each row past its sample's end.")
    vocab_size: int = _help(None, "Number of token ids (len(tokenizer), added tokens included).")
    special_token_ids: Sequence[int] = _help((), "Ids never masked nor drawn as random tokens (<mask>, <pad> added).")
    mlm_probability: float = _help(0.15, "Share of the non-special tokens selected for the loss.")
    seed: int = _help(42, "Masking seed: with (epoch, sample index, position) it decides every mask.")
    pad_to_multiple_of: Optional[int] = _help(None, "Pad the batch length up to a multiple of this (8 suits GPUs).")
    mask_replace_prob: float = _help(0.8, "Share of the selected tokens replaced by <mask>.")
    random_replace_prob: float = _help(0.1, "Share of the selected tokens replaced by a random regular token.")
    word_start: Optional[np.ndarray] = _help(None, "Whole-word masking: per id, does the token start a word? "
                                                   "(None: every token is a word of its own.)", repr=False)

    def __post_init__(self):
        for name in ("mask_token_id", "pad_token_id", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise UserError(f"the tokenizer gives no valid {name.replace('_', ' ')} ({value!r}): use a "
                                "tokenizer with <mask> and <pad> tokens (e.g. one written by ds-mlm-train-tokenizer)")
        specials = sorted({int(t) for t in self.special_token_ids if t is not None}
                          | {int(self.mask_token_id), int(self.pad_token_id)})
        if specials[0] < 0 or specials[-1] >= self.vocab_size:
            raise UserError(f"special token ids {specials} are not all inside the vocabulary of {self.vocab_size} "
                            "ids: the tokenizer is inconsistent; rebuild it")
        self.special_token_ids = tuple(specials)
        if not 0.0 < self.mlm_probability < 1.0:
            raise UserError(f"--mlm_probability {self.mlm_probability} must be between 0 and 1 (0.15 is usual)")
        if not (self.mask_replace_prob >= 0 and self.random_replace_prob >= 0
                and self.mask_replace_prob + self.random_replace_prob <= 1):
            raise UserError(f"mask_replace_prob {self.mask_replace_prob} and random_replace_prob "
                            f"{self.random_replace_prob} must be >= 0 with a sum <= 1 (0.8 and 0.1 are usual)")
        if self.pad_to_multiple_of is not None and (isinstance(self.pad_to_multiple_of, bool) or not isinstance(
                self.pad_to_multiple_of, (int, np.integer)) or self.pad_to_multiple_of < 1):
            raise UserError(f"pad_to_multiple_of {self.pad_to_multiple_of!r} must be a positive integer (e.g. 8)")
        self._is_special = np.zeros(self.vocab_size, dtype=np.bool_)
        self._is_special[specials] = True
        self._regular = np.flatnonzero(~self._is_special).astype(np.int64)
        if self._regular.size == 0:
            raise UserError("every token of the vocabulary is special: nothing can be masked; check the tokenizer")
        if self.word_start is None:
            self._word_start = np.ones(self.vocab_size, dtype=np.bool_)
        else:
            self._word_start = np.asarray(self.word_start, dtype=np.bool_)
            if self._word_start.shape != (self.vocab_size,):
                raise UserError(f"word_start has shape {self._word_start.shape}, expected ({self.vocab_size},)")
        # The random-token band lies just above the <mask> band on the same uniform draw.
        self._select_below = np.uint64(round(self.mlm_probability * _UNIT))
        self._replace_below = np.uint64(round(self.mask_replace_prob * _UNIT))
        self._random_below = np.uint64(round((self.mask_replace_prob + self.random_replace_prob) * _UNIT))

    @classmethod
    def from_tokenizer(cls, tokenizer, whole_word_mask: bool = False, **kw) -> "MLMCollator":
        """A collator for an HF tokenizer: its <mask> and <pad>, len(tokenizer) ids, all its special tokens."""
        if whole_word_mask:
            kw["word_start"] = word_starts(tokenizer)
        return cls(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                   vocab_size=len(tokenizer), special_token_ids=tokenizer.all_special_ids, **kw)

    def __call__(self, samples: Sequence, indices: Sequence[int], epoch: int) -> dict:
        """Pad `samples` (1-D integer tensors or arrays) and mask them; samples[i] is dataset sample indices[i]."""
        if len(samples) != len(indices):
            raise ValueError(f"{len(samples)} samples but {len(indices)} indices")
        arrays = [np.asarray(s).reshape(-1) for s in samples]
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, dtype=np.int64)
        if flat.size:
            low, high = int(flat.min()), int(flat.max())
            if low < 0 or high >= self.vocab_size:
                raise UserError(f"token id {high if high >= self.vocab_size else low} is outside the tokenizer's "
                                f"{self.vocab_size} ids: the token store was built with another tokenizer; "
                                "rebuild it with --overwrite_cache")
        width = int(lengths.max()) if lengths.size else 0
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((len(arrays), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(arrays), width), dtype=np.int64)
        labels = np.full((len(arrays), width), IGNORE_INDEX, dtype=np.int64)
        keys = _sample_keys(np.uint64(int(self.seed) & U64), np.uint64(int(epoch) & U64),
                            np.asarray(indices, dtype=np.int64).reshape(-1))
        _mask_kernel(flat, offsets, keys, self._is_special, self._word_start, self._regular,
                     np.int64(self.mask_token_id), self._select_below, self._replace_below, self._random_below,
                     input_ids, attention_mask, labels)
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                "labels": torch.from_numpy(labels)}


def word_starts(tokenizer) -> np.ndarray:
    """Per token id, does it start a word? Byte-level BPE marks a word start with 'Ġ', SentencePiece with '▁', and
    WordPiece marks the other tokens with '##'; a vocabulary without marks is word-level (each token is a word).
    Special tokens count as starts. Text without spaces (Thai) makes long 'words' under BPE or SentencePiece:
    there, whole-word masking suits word-level tokenizers."""
    tokens = [str(t or "") for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    if sum(t.startswith("##") for t in tokens) > len(tokens) // 10:  # a WordPiece vocabulary
        starts = np.array([not t.startswith("##") for t in tokens], dtype=np.bool_)
    else:
        starts = np.array([t.startswith(("Ġ", "▁")) for t in tokens], dtype=np.bool_)
        if starts.sum() < len(tokens) // 10:  # no word-start marks: a word-level vocabulary (newmm, syllables)
            starts[:] = True
    starts[list(tokenizer.all_special_ids)] = True
    return starts
