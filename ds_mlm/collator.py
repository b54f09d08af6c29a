"""Masked-LM batches: padding, and dynamic masking seeded per sample from (seed, epoch, sample index).

As fairseq's MaskTokensDataset does, the masking of a sample depends only on (seed, epoch, its index in the dataset,
the position), never on the batch or the rank it lands in: a resumed or re-sharded run masks the same tokens, and an
evaluation pass (fixed seed, epoch 0) masks identically every time. The random numbers come from a counter-based
hash (splitmix64) computed in a numba kernel, so there is no per-token Python and no RNG state to carry.

The scheme is BERT's, as in transformers.DataCollatorForLanguageModeling: each regular token is selected with
probability `mlm_probability`; a selected token becomes <mask> 80% of the time, a random regular token 10%, and stays
10%. Special tokens and padding are never selected. Labels are the original ids at selected positions, -100 elsewhere.
"""

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numba
import numpy as np
import torch

from ds_mlm.errors import UserError

IGNORE_INDEX = -100


@numba.njit(inline="always")
def _mix(x):
    """splitmix64's finaliser: a uint64 -> uint64 bijection with good avalanche."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(inline="always")
def _uniform(x):
    return np.float64(x >> np.uint64(11)) * (1.0 / 9007199254740992.0)  # top 53 bits -> [0, 1)


@numba.njit(cache=True)
def _mask_kernel(ids, lengths, sample_keys, prob, mask_id, is_special, regular_ids, labels):
    golden = np.uint64(0x9E3779B97F4A7C15)
    for b in range(ids.shape[0]):
        key = sample_keys[b]
        for p in range(lengths[b]):
            token = ids[b, p]
            if is_special[token]:
                continue
            h = _mix(key + np.uint64(p) * golden)
            if _uniform(h) >= prob:
                continue
            labels[b, p] = token
            h = _mix(h + golden)
            action = _uniform(h)
            if action < 0.8:
                ids[b, p] = mask_id
            elif action < 0.9:
                h = _mix(h + golden)
                ids[b, p] = regular_ids[np.int64(h % np.uint64(regular_ids.shape[0]))]


def sample_keys(seed: int, epoch: int, indices: Sequence[int]) -> np.ndarray:
    """One 64-bit key per sample from (seed, epoch, index); numpy's SeedSequence does the mixing."""
    base = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)
    idx = np.asarray(indices, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around is the point
        x = base[0] ^ (idx * np.uint64(0x9E3779B97F4A7C15) + base[1])
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass
class MLMCollator:
    mask_token_id: int
    """Id of <mask>."""
    pad_token_id: int
    """Id of <pad>; padded positions get attention 0 and label -100."""
    vocab_size: int
    """Number of ids the model embeds (len(tokenizer))."""
    special_token_ids: Sequence[int]
    """Ids never masked nor drawn as random replacements (<s>, </s>, <pad>, <unk>, <mask>, added specials)."""
    mlm_probability: float = 0.15
    """Share of regular tokens selected for prediction."""
    seed: int = 42
    """Seed of the masking; with (epoch, sample index) it fixes every sample's mask."""
    pad_to_multiple_of: Optional[int] = None
    """Pad the batch length up to a multiple of this (8 suits tensor cores)."""
    _is_special: np.ndarray = field(init=False, repr=False)
    _regular: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise UserError(f"--mlm_probability {self.mlm_probability} must be between 0 and 1 (0.15 is usual)")
        self._is_special = np.zeros(self.vocab_size, dtype=np.bool_)
        self._is_special[[i for i in self.special_token_ids if 0 <= i < self.vocab_size]] = True
        self._regular = np.flatnonzero(~self._is_special).astype(np.int64)
        if len(self._regular) == 0:
            raise UserError("the tokenizer has no regular tokens to mask: train a tokenizer with a vocabulary")

    @classmethod
    def from_tokenizer(cls, tokenizer, **kw) -> "MLMCollator":
        specials = set(tokenizer.all_special_ids) | {tokenizer.pad_token_id, tokenizer.mask_token_id}
        return cls(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                   vocab_size=len(tokenizer), special_token_ids=sorted(i for i in specials if i is not None), **kw)

    def pad(self, samples: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, L] padded with pad_token_id, lengths [B])."""
        lengths = np.fromiter((len(s) for s in samples), dtype=np.int64, count=len(samples))
        width = int(lengths.max()) if len(samples) else 0
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = np.full((len(samples), width), self.pad_token_id, dtype=np.int64)
        for row, s in enumerate(samples):
            ids[row, :len(s)] = s.numpy() if torch.is_tensor(s) else s
        return ids, lengths

    def __call__(self, samples: Sequence[torch.Tensor], indices: Sequence[int], epoch: int) -> dict:
        if len(samples) != len(indices):
            raise ValueError(f"{len(samples)} samples but {len(indices)} indices")
        ids, lengths = self.pad(samples)
        labels = np.full_like(ids, IGNORE_INDEX)
        _mask_kernel(ids, lengths, sample_keys(self.seed, epoch, indices), self.mlm_probability, self.mask_token_id,
                     self._is_special, self._regular, labels)
        attention = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attention),
                "labels": torch.from_numpy(labels)}
