"""MLM masking: deterministic per (seed, epoch, sample index), BERT's 80/10/10, never specials or padding."""

import numpy as np
import pytest
import torch
from transformers import DataCollatorForLanguageModeling

from ds_mlm.collator import IGNORE_INDEX, MLMCollator
from ds_mlm.errors import UserError

VOCAB, SPECIAL = 1000, [0, 1, 2, 3, 4]


def collator(**kw):
    return MLMCollator(mask_token_id=4, pad_token_id=1, vocab_size=VOCAB, special_token_ids=SPECIAL, **kw)


def samples(n, rng, low=20, high=60):
    out = []
    for _ in range(n):
        body = rng.integers(5, VOCAB, size=rng.integers(low, high))
        out.append(torch.tensor([0, *body, 2]))
    return out


def test_masking_depends_only_on_seed_epoch_and_index():
    rng = np.random.default_rng(0)
    data = samples(8, rng)
    c = collator(seed=11)
    whole = c(data, list(range(100, 108)), epoch=3)
    order = [5, 2, 7]
    part = c([data[i] for i in order], [100 + i for i in order], epoch=3)
    for row, i in enumerate(order):
        n = len(data[i])
        assert torch.equal(part["input_ids"][row, :n], whole["input_ids"][i, :n])
        assert torch.equal(part["labels"][row, :n], whole["labels"][i, :n])
    assert not torch.equal(c(data, list(range(100, 108)), epoch=4)["labels"], whole["labels"])
    assert not torch.equal(collator(seed=12)(data, list(range(100, 108)), epoch=3)["labels"], whole["labels"])


def test_labels_padding_and_specials():
    rng = np.random.default_rng(1)
    data = samples(64, rng, 5, 40)
    batch = collator(pad_to_multiple_of=8)(data, list(range(64)), epoch=0)
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[1] % 8 == 0 and ids.shape == attn.shape == labels.shape
    for row, s in enumerate(data):
        n = len(s)
        assert attn[row, :n].all() and not attn[row, n:].any()
        assert (ids[row, n:] == 1).all() and (labels[row, n:] == IGNORE_INDEX).all()
        assert ids[row, 0] == 0 and ids[row, n - 1] == 2  # specials stay
        picked = labels[row, :n] != IGNORE_INDEX
        assert torch.equal(labels[row, :n][picked], s[picked])  # labels are the original ids
        assert torch.equal(ids[row, :n][~picked], s[~picked])  # nothing else changed


def test_rates_match_bert_and_the_transformers_collator():
    rng = np.random.default_rng(2)
    data = samples(400, rng, 200, 300)  # ~100k regular tokens: the bounds below are > 6 standard deviations wide
    batch = collator(mlm_probability=0.15)(data, list(range(400)), epoch=0)
    original = collator().pad(data)[0]
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    regular = (original >= 5)
    picked = labels != IGNORE_INDEX
    rate = picked.sum() / regular.sum()
    masked = (ids == 4) & picked
    kept = (ids == original) & picked
    replaced = picked & ~masked & ~kept
    assert abs(rate - 0.15) < 0.007
    assert abs(masked.sum() / picked.sum() - 0.8) < 0.015
    assert abs(replaced.sum() / picked.sum() - 0.1) < 0.012
    assert (ids[replaced] >= 5).all()  # random replacements are regular tokens

    class Tok:  # the few attributes DataCollatorForLanguageModeling reads
        mask_token, mask_token_id, pad_token_id, pad_token = "<mask>", 4, 1, "<pad>"

        def __len__(self):
            return VOCAB

        def convert_tokens_to_ids(self, t):
            return 4

        def get_special_tokens_mask(self, ids, already_has_special_tokens=True):
            return [int(i in SPECIAL) for i in ids]

        def pad(self, *a, **k):
            raise NotImplementedError

    torch.manual_seed(0)
    hf = DataCollatorForLanguageModeling(Tok(), mlm_probability=0.15)
    _, hf_labels = hf.torch_mask_tokens(torch.from_numpy(original.copy()))
    hf_rate = (hf_labels != IGNORE_INDEX).sum().item() / regular.sum()
    assert abs(hf_rate - rate) < 0.01


def test_bad_probability():
    with pytest.raises(UserError, match="mlm_probability"):
        collator(mlm_probability=1.5)
