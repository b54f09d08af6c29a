"""MLMCollator: masking seeded per (seed, epoch, sample index), BERT's 15% and 80/10/10, padding, whole words."""

import numpy as np
import pytest
import torch

from ds_mlm.collator import IGNORE_INDEX, MLMCollator, word_starts
from ds_mlm.errors import UserError
from ds_mlm.sampler import GlobalBatchSampler

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
SPECIAL = [BOS, PAD, EOS, UNK, MASK]


def collator(vocab=1000, **kw):
    return MLMCollator(mask_token_id=MASK, pad_token_id=PAD, vocab_size=vocab, special_token_ids=SPECIAL, **kw)


def make_samples(n, low, high, vocab=1000, seed=0):
    """`n` samples <s> x </s> of random regular tokens, lengths in [low, high)."""
    rng = np.random.default_rng(seed)
    return [torch.tensor([BOS, *rng.integers(5, vocab, rng.integers(low, high) - 2), EOS]) for _ in range(n)]


def rows(batch, samples):
    """Per sample, its unpadded (input_ids, labels)."""
    return [(batch["input_ids"][r, :len(s)], batch["labels"][r, :len(s)]) for r, s in enumerate(samples)]


def shares(batch, samples):
    """(selected / eligible, <mask> / selected, changed to another token / selected, unchanged / selected)."""
    ids, labels = batch["input_ids"], batch["labels"]
    original = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=PAD)
    original = torch.nn.functional.pad(original, (0, ids.shape[1] - original.shape[1]), value=PAD)
    eligible = (original > MASK) & (batch["attention_mask"] == 1)
    picked = labels != IGNORE_INDEX
    n = picked.sum().item()
    masked, same = (ids == MASK) & picked, (ids == original) & picked
    return (n / eligible.sum().item(), masked.sum().item() / n, (picked & ~masked & ~same).sum().item() / n,
            same.sum().item() / n)


def test_masking_depends_only_on_seed_epoch_index_and_position():
    samples = make_samples(12, 10, 80)
    c = collator(seed=11)
    whole = rows(c(samples, list(range(100, 112)), epoch=3), samples)
    order = [7, 2, 11, 5]  # another batch: other neighbours, other order, another padded width
    part = rows(c([samples[i] for i in order], [100 + i for i in order], epoch=3), [samples[i] for i in order])
    for (ids, labels), i in zip(part, order):
        assert torch.equal(ids, whole[i][0]) and torch.equal(labels, whole[i][1])
    assert any((labels != IGNORE_INDEX).any() for _, labels in whole)
    # a fresh collator with the same seed (a resumed run, an eval pass) masks identically
    again = rows(collator(seed=11)(samples, list(range(100, 112)), epoch=3), samples)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, whole))


def test_epochs_seeds_and_indices_change_the_masking():
    samples = make_samples(16, 100, 200)
    base = collator(seed=1)(samples, list(range(16)), epoch=0)
    for other in (collator(seed=1)(samples, list(range(16)), epoch=1),
                  collator(seed=2)(samples, list(range(16)), epoch=0),
                  collator(seed=1)(samples, list(range(16, 32)), epoch=0)):
        same = (other["labels"] != IGNORE_INDEX) == (base["labels"] != IGNORE_INDEX)
        agree = same[base["attention_mask"] == 1].float().mean().item()
        assert agree < 0.8  # independent masks agree at 1 - 2 * 0.15 * 0.85 ~ 0.745 of the positions


def test_masking_is_the_same_whatever_the_world_size():
    samples = make_samples(40, 5, 30)
    c = collator(seed=5)
    masked = {}
    for micro, world in ((8, 1), (4, 2), (2, 4)):
        seen = {}
        for rank in range(world):
            sampler = GlobalBatchSampler(40, 8, micro, rank, world, seed=3)
            for _ in range(12):  # 2.4 epochs of 5 global batches
                epoch, (indices,), _ = sampler.next_step()
                batch = c([samples[i] for i in indices], indices, epoch)
                for r, i in enumerate(indices):
                    seen[epoch, i] = batch["input_ids"][r, :len(samples[i])].tolist()
        masked[world] = seen
    assert masked[1] == masked[2] == masked[4] and len(masked[1]) == 12 * 8


def test_labels_padding_attention_and_specials():
    samples = make_samples(64, 3, 40)
    samples[5] = torch.tensor([BOS, UNK, PAD, MASK, EOS])  # nothing to mask
    c = collator(pad_to_multiple_of=8)
    batch = c(samples, list(range(64)), epoch=0)
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    longest = max(len(s) for s in samples)
    assert ids.shape == attention.shape == labels.shape == (64, -(-longest // 8) * 8)
    assert ids.dtype == attention.dtype == labels.dtype == torch.int64
    for (row_ids, row_labels), s, row in zip(rows(batch, samples), samples, range(64)):
        n = len(s)
        assert attention[row, :n].all() and not attention[row, n:].any()
        assert (ids[row, n:] == PAD).all() and (labels[row, n:] == IGNORE_INDEX).all()
        special = s <= MASK
        assert torch.equal(row_ids[special], s[special]) and (row_labels[special] == IGNORE_INDEX).all()
        picked = row_labels != IGNORE_INDEX
        assert torch.equal(row_labels[picked], s[picked])  # labels are the original tokens
        assert torch.equal(row_ids[~picked], s[~picked])  # nothing unselected changed
        assert (row_ids[picked & (row_ids != s)] >= 0).all()
    assert (labels[5] == IGNORE_INDEX).all()
    unpadded = collator()(samples, list(range(64)), epoch=0)
    assert unpadded["input_ids"].shape == (64, longest)
    assert torch.equal(unpadded["labels"], labels[:, :longest])  # padding does not change the masking


def test_rates_are_bert_within_tight_bounds():
    samples = make_samples(500, 1500, 2500, seed=1)  # ~1M eligible tokens, ~150k selected
    selected, masked, random, unchanged = shares(collator(seed=0)(samples, list(range(500)), epoch=0), samples)
    # bounds >= 5.5 standard deviations (sd: 0.00036, 0.0010, 0.00077, 0.00077); the seeds are fixed anyway
    assert abs(selected - 0.15) < 0.002
    assert abs(masked - 0.8) < 0.0055
    assert abs(random - 0.1 * (1 - 1 / 995)) < 0.0045  # a random token can be the original one
    assert abs(unchanged - (0.1 + 0.1 / 995)) < 0.0045
    # other probabilities are honoured too
    c = collator(seed=0, mlm_probability=0.4, mask_replace_prob=0.5, random_replace_prob=0.3)
    selected, masked, random, _ = shares(c(samples[:100], list(range(100)), epoch=0), samples[:100])
    assert abs(selected - 0.4) < 0.004 and abs(masked - 0.5) < 0.006 and abs(random - 0.3 * 994 / 995) < 0.006


def test_selections_are_independent_and_random_tokens_uniform():
    vocab = 50
    samples = make_samples(400, 400, 600, vocab=vocab, seed=2)
    batch = collator(vocab=vocab, seed=3)(samples, list(range(400)), epoch=7)
    picked = (batch["labels"] != IGNORE_INDEX)[:, 1:-1].numpy()
    valid = (batch["attention_mask"] == 1)[:, 2:-1].numpy()  # neighbours both inside a sample body
    both = (picked[:, :-1] & picked[:, 1:])[valid[:, :picked.shape[1] - 1]].mean()
    assert abs(both - 0.15 ** 2) < 0.002  # neighbours are selected independently (sd ~0.0002)
    ids, original = batch["input_ids"], torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=PAD)
    replaced = (batch["labels"] != IGNORE_INDEX) & (ids != MASK) & (ids != original)
    counts = np.bincount(ids[replaced].numpy(), minlength=vocab)
    assert counts[:5].sum() == 0  # never a special token
    expected = replaced.sum().item() / 45 * 44 / 45  # uniform over the 45 regular ids, minus draws of the original
    chi2 = ((counts[5:] - expected) ** 2 / expected).sum()
    assert chi2 < 100  # 44 degrees of freedom: mean 44, sd 9.4


def test_rates_match_transformers_data_collator(bpe_tokenizer_dir):
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    vocab = len(tokenizer)
    rng = np.random.default_rng(4)
    samples = [torch.tensor([tokenizer.bos_token_id, *rng.integers(5, vocab, rng.integers(500, 1500)),
                             tokenizer.eos_token_id]) for _ in range(400)]  # ~400k eligible tokens
    ours = shares(MLMCollator.from_tokenizer(tokenizer, seed=0)(samples, list(range(400)), epoch=0), samples)
    hf = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)(samples)
    hf["attention_mask"] = (torch.arange(hf["input_ids"].shape[1]) < torch.tensor([len(s) for s in samples])[:, None])
    theirs = shares(hf, samples)
    # each share is within 5 standard deviations of the difference of two independent estimates
    for a, b, sd in zip(ours, theirs, (0.00056, 0.0015, 0.0011, 0.0011)):
        assert abs(a - b) < 5 * sd, (ours, theirs)


def test_from_tokenizer_never_masks_any_special_token(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<_>"]})  # the ancestor's space token
    space = tokenizer.convert_tokens_to_ids("<_>")
    c = MLMCollator.from_tokenizer(tokenizer, seed=0)
    assert (c.mask_token_id, c.pad_token_id, c.vocab_size) == (tokenizer.mask_token_id, tokenizer.pad_token_id,
                                                                len(tokenizer))
    assert space in c.special_token_ids
    rng = np.random.default_rng(0)
    samples = [torch.tensor([0, *rng.choice([space, *range(5, 2000)], 300), 2]) for _ in range(200)]
    batch = c(samples, list(range(200)), epoch=0)
    original = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=1)
    assert (batch["labels"][original == space] == IGNORE_INDEX).all()
    randomised = (batch["input_ids"] != original) & (batch["input_ids"] != tokenizer.mask_token_id)
    assert randomised.sum() > 500 and not torch.isin(batch["input_ids"][randomised],
                                                     torch.tensor(c.special_token_ids)).any()


def test_whole_word_masking(bpe_tokenizer_dir, sample_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    starts = word_starts(tokenizer)
    assert starts[tokenizer.convert_tokens_to_ids("Ġthe")] and starts[tokenizer.mask_token_id]
    lines = (sample_dirs[0] / "botchan.txt").read_text(encoding="utf-8").splitlines()
    samples = [torch.tensor(tokenizer(line)["input_ids"]) for line in lines if len(line) > 40][:600]
    per_word = MLMCollator.from_tokenizer(tokenizer, whole_word_mask=True, seed=0)
    per_token = MLMCollator.from_tokenizer(tokenizer, seed=0)
    split_words = {False: 0, True: 0}
    selected_words = words = 0
    for wwm, c in ((True, per_word), (False, per_token)):
        batch = c(samples, list(range(len(samples))), epoch=0)
        for row, s in enumerate(samples):
            picked = (batch["labels"][row, :len(s)] != IGNORE_INDEX).tolist()
            word = []
            for j, token in enumerate(s.tolist() + [tokenizer.eos_token_id]):  # a sentinel closes the last word
                if word and (starts[token] or j == len(s)):
                    split_words[wwm] += len({picked[k] for k in word}) > 1
                    if wwm:
                        words += 1
                        selected_words += picked[word[0]]
                    word = []
                if j < len(s) and token not in c.special_token_ids:
                    word.append(j)
    assert split_words[True] == 0 and split_words[False] > 100  # whole words, where tokens alone split words
    assert abs(selected_words / words - 0.15) < 0.01  # ~10k words: sd 0.0036


def test_accepts_arrays_of_any_integer_type():
    samples = make_samples(6, 5, 20)
    expected = collator(seed=1)(samples, range(6), epoch=2)
    for convert in (lambda s: s.numpy().astype(np.uint16), lambda s: s.to(torch.int32), lambda s: s.tolist()):
        got = collator(seed=1)([convert(s) for s in samples], np.arange(6), epoch=2)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="mlm_probability 1.5 must be between 0 and 1"):
        collator(mlm_probability=1.5)
    with pytest.raises(UserError, match="sum <= 1"):
        collator(mask_replace_prob=0.9, random_replace_prob=0.2)
    with pytest.raises(UserError, match="pad_to_multiple_of 0"):
        collator(pad_to_multiple_of=0)
    with pytest.raises(UserError, match="no valid mask token id.*<mask>"):
        MLMCollator(mask_token_id=None, pad_token_id=PAD, vocab_size=100, special_token_ids=SPECIAL)
    with pytest.raises(UserError, match=r"special token ids \[0, 1, 2, 3, 4, 100\] are not all inside"):
        MLMCollator(mask_token_id=MASK, pad_token_id=PAD, vocab_size=100, special_token_ids=SPECIAL + [100])
    with pytest.raises(UserError, match="token id 1000 is outside the tokenizer's 1000 ids.*overwrite_cache"):
        collator()([torch.tensor([0, 5, 1000, 2])], [0], epoch=0)
