"""Packing tokenized sentences into training samples: numba kernels over flat arrays, streaming-exact.

Input is always flat: `tokens`, the ids of all sentences back to back, and `offsets` (int64, n_sentences + 1) with
sentence i = tokens[offsets[i]:offsets[i + 1]]. Output is flat the same way: `block_tokens` and `block_offsets`
(starting at 0), one entry per sample. No Python list is ever built per sentence or per block.

Full-sentence packing (thai2transformers' `MemmapConcatFullSentenceTextDataset`): a block is

    <s> s1 SEP s2 SEP ... sk </s>            at most block_size ids; usable = block_size - 2 between <s> and </s>

filled greedily in order: a sentence (with one SEP before it, unless it opens the block) is appended while the block
stays within `usable` ids, otherwise the block is closed and the sentence opens the next one. Sentences are kept
whole. Fixed defects of the ancestor: the last block gets <s> and </s> too, and a sentence longer than `usable` is
cut into pieces of `usable` ids, each packed as a sentence of its own ("split", the default: nothing is lost), or
dropped ("skip", the ancestor's behaviour, exactly: like its `add_to_block`, the too-long sentence first closes the
open block, which is written, then is dropped; the next sentence opens a new block), or cut to its first `usable`
ids ("truncate"). Empty sentences are ignored (counted; the ancestor appended a lone separator for them).

Line by line (`MemmapLineByLineTextDataset`): one sample `<s> s </s>` per sentence; a sentence longer than `usable`
follows the same policy (split into several samples, skipped, or truncated as the ancestor did).

Two ways to fill the blocks of full sentences (`packing`):

  - "sequential" (the ancestor's, above): greedy in corpus order; a block closes when the next sentence does not fit.
  - "best_fit" (the default): sentences enter a window of BEST_FIT_WINDOW consecutive sentences (pieces, once long
    ones are split). When the window is full, one block is made: it opens with the oldest sentence still waiting,
    then takes, again and again, the longest waiting sentence that still fits (the oldest of that length), until
    none fits; its sentences are then written in corpus order. So a block's sentences all lie within
    BEST_FIT_WINDOW consecutive sentences, every sentence is kept (as the long-sentence policy says: "skip" just
    drops the long one here), and blocks come out in the order of their first sentence. At the end of a shard the
    window is emptied block by block the same way, except that each block opens with the longest sentence waiting
    (first-fit-decreasing on what is left: the oldest rule would leave the long ones for last, without small ones
    to fill their blocks). The layout of a block is the same as above. A sentence costs its
    ids + 1 (its separator, or for the first one </s>), a block holds block_size - 1 of that.

Streaming: `Packer.feed` packs one chunk at a time and carries what is unfinished into the next call (sequential:
the open block's ids after <s>; best fit: its window, kept in arrays from call to call: packing_kernels.py), and
every decision depends only on the sentences and their positions, so packing chunk by chunk gives exactly the blocks
of packing everything at once, whatever the chunks. The kernels live in packing_kernels.py.
"""

from typing import Optional

import numpy as np

from ds_mlm.data.packing_kernels import (SKIP, SPLIT, TRUNCATE, N_STATS, BestFitState, PackStats, pack_best_fit,
                                         pack_line_by_line, pack_sequential)

CONCAT = "MemmapConcatFullSentenceTextDataset"
LINE_BY_LINE = "MemmapLineByLineTextDataset"
POLICIES = {"split": SPLIT, "skip": SKIP, "truncate": TRUNCATE}
PACKINGS = ("best_fit", "sequential")
# 4096 sentences: ~100-500 KB of text, a few documents. Measured (shared corpora, 16k BPE): fill grows with the window
# to ~2048 and barely beyond (30 MB of Thai news at 128: 99.45 % at 256, 99.70 % at 2048, 99.71 % at 4096).
BEST_FIT_WINDOW = 4096
MAX_WINDOW = 1 << 20  # best fit keeps a row of 32 bytes per sentence of the window


class Packer:
    """Streaming packer: `feed(tokens, offsets)` chunk after chunk, then `finish()`; `stats` sums what it did."""

    def __init__(self, datasets_type: str, block_size: int, bos_id: int, eos_id: int, sep_id: int,
                 long_sentence: str = "split", dtype=np.uint32, packing: str = "best_fit",
                 window: Optional[int] = None):
        if datasets_type not in (CONCAT, LINE_BY_LINE):
            raise ValueError(f"unknown datasets_type {datasets_type!r}: use {CONCAT} or {LINE_BY_LINE}")
        if long_sentence not in POLICIES:
            raise ValueError(f"unknown long_sentence {long_sentence!r}: use one of {', '.join(POLICIES)}")
        if packing not in PACKINGS:
            raise ValueError(f"unknown packing {packing!r}: use one of {', '.join(PACKINGS)}")
        if block_size < 3:
            raise ValueError(f"block_size {block_size} cannot hold <s>, one id and </s>")
        window = BEST_FIT_WINDOW if window is None else window  # looked up now: a test may set a small one
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"best-fit window {window} must hold between 1 and {MAX_WINDOW:,} sentences")
        self.concat = datasets_type == CONCAT
        self.best_fit = self.concat and packing == "best_fit"
        self.block_size, self.policy, self.window = int(block_size), POLICIES[long_sentence], int(window)
        self.dtype = np.dtype(dtype)
        self.bos, self.eos, self.sep = (self.dtype.type(i) for i in (bos_id, eos_id, sep_id))
        self._counts = np.zeros(N_STATS, dtype=np.int64)
        self._carry = np.zeros(0, dtype=self.dtype)  # sequential: the open block's ids after <s>
        self._best = BestFitState(self.block_size, self.window, self.dtype) if self.best_fit else None

    @property
    def stats(self) -> PackStats:
        return PackStats.from_array(self._counts)

    def feed(self, tokens: np.ndarray, offsets: np.ndarray, final: bool = False):
        """Pack one chunk; returns (block_tokens, block_offsets) of the blocks it completed. Best fit reads the ids
        still waiting from the last two chunks' `tokens` (views, not copies): do not write into them afterwards."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        if offsets.size == 0 or offsets[0] < 0 or offsets[-1] > tokens.size or np.any(offsets[1:] < offsets[:-1]):
            raise ValueError("offsets must be non-decreasing, start at 0 or more and end within tokens")
        if not self.concat:
            return pack_line_by_line(tokens, offsets, self.block_size, self.bos, self.eos, self.policy, self._counts)
        if self.best_fit:
            best = self._best
            blocks, block_offsets, best.held = pack_best_fit(tokens, offsets, self.block_size, self.bos, self.eos,
                                                             self.sep, self.policy, self.window, best.ring,
                                                             best.fifo, best.bits, best.held, best.before,
                                                             best.last, best.state, final, self._counts)
            best.before, best.last = best.last, tokens[offsets[0]:offsets[-1]]  # a view: read while ids wait
            return blocks, block_offsets
        blocks, block_offsets, self._carry = pack_sequential(tokens, offsets, self.block_size, self.bos, self.eos,
                                                             self.sep, self.policy, self._carry, final, self._counts)
        return blocks, block_offsets

    def finish(self):
        """Close the last open block; returns its (block_tokens, block_offsets), empty when nothing was open."""
        return self.feed(np.zeros(0, dtype=self.dtype), np.zeros(1, dtype=np.int64), final=True)


def pack_full_sentences(tokens, offsets, block_size, bos_id, eos_id, sep_id, long_sentence="split",
                        packing="best_fit", window=None):
    """Pack all sentences at once: (block_tokens, block_offsets, stats); see the module docstring."""
    packer = Packer(CONCAT, block_size, bos_id, eos_id, sep_id, long_sentence, dtype=np.asarray(tokens).dtype,
                    packing=packing, window=window)
    blocks, block_offsets = packer.feed(tokens, offsets, final=True)
    return blocks, block_offsets, packer.stats


def pack_lines(tokens, offsets, block_size, bos_id, eos_id, long_sentence="split"):
    """One sample per sentence: (block_tokens, block_offsets, stats); see the module docstring."""
    packer = Packer(LINE_BY_LINE, block_size, bos_id, eos_id, eos_id, long_sentence, dtype=np.asarray(tokens).dtype)
    blocks, block_offsets = packer.feed(tokens, offsets)
    return blocks, block_offsets, packer.stats
