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
the open block's ids after <s>; best fit: the sentences still waiting in the window, with their positions), and
every decision depends only on the sentences and their positions, so packing chunk by chunk gives exactly the blocks
of packing everything at once, whatever the chunks.
"""

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
from numba import njit

CONCAT = "MemmapConcatFullSentenceTextDataset"
LINE_BY_LINE = "MemmapLineByLineTextDataset"
POLICIES = {"split": 0, "skip": 1, "truncate": 2}
_SPLIT, _SKIP, _TRUNCATE = 0, 1, 2
PACKINGS = ("best_fit", "sequential")
# 4096 sentences: ~100-500 KB of text, a few documents. Measured (shared corpora, 16k BPE): fill grows with the window
# to ~2048 and barely beyond (30 MB of Thai news at 128: 99.45 % at 256, 99.70 % at 2048, 99.71 % at 4096).
BEST_FIT_WINDOW = 4096


@dataclass
class PackStats:
    """What packing did, summed over every chunk fed."""

    sentences: int = 0
    """Non-empty sentences read."""
    empty: int = 0
    """Sentences without any id (ignored)."""
    tokens: int = 0
    """Ids of the sentences read (specials and separators excluded)."""
    blocks: int = 0
    """Samples written."""
    block_tokens: int = 0
    """Ids written, <s>, </s> and separators included."""
    skipped: int = 0
    """Sentences longer than a block that were dropped (long_sentence="skip")."""
    split: int = 0
    """Sentences longer than a block that were cut into several pieces (long_sentence="split")."""
    truncated: int = 0
    """Sentences longer than a block cut to one block (long_sentence="truncate")."""
    dropped_tokens: int = 0
    """Ids lost by skipping or truncating."""
    padding: int = 0
    """Padding a batch of full-length rows would need: the sum over blocks of block_size - len(block)."""

    @classmethod
    def from_array(cls, counts: np.ndarray) -> "PackStats":
        return cls(*(int(c) for c in counts))


_N_STATS = len(fields(PackStats))
_SENTENCES, _EMPTY, _TOKENS, _BLOCKS, _BLOCK_TOKENS, _SKIPPED, _SPLITS, _TRUNCATED, _DROPPED, _PADDING = range(_N_STATS)


@njit(cache=True)
def _take(a, b, usable, policy, stats):
    """Account for sentence tokens[a:b]; return the end of what is kept (a when the sentence is dropped)."""
    n = b - a
    if n == 0:
        stats[_EMPTY] += 1
        return a
    stats[_SENTENCES] += 1
    stats[_TOKENS] += n
    if n <= usable:
        return b
    if policy == _SKIP:
        stats[_SKIPPED] += 1
        stats[_DROPPED] += n
        return a
    if policy == _TRUNCATE:
        stats[_TRUNCATED] += 1
        stats[_DROPPED] += n - usable
        return a + usable
    stats[_SPLITS] += 1
    return b


@njit(cache=True)
def _close(out, pos, out_offsets, nb, block_size, eos, stats):
    """Write </s> after the open block (which starts at out_offsets[nb]); return the new write position."""
    out[pos] = eos
    pos += 1
    stats[_BLOCKS] += 1
    stats[_BLOCK_TOKENS] += pos - out_offsets[nb]
    stats[_PADDING] += block_size - (pos - out_offsets[nb])
    out_offsets[nb + 1] = pos
    return pos


@njit(cache=True)
def _pack_concat(tokens, offsets, block_size, bos, eos, sep, policy, carry, final, stats):
    """Full-sentence packing of one chunk; `carry` is the open block left by the previous chunk (ids after <s>).

    Returns (block_tokens, block_offsets, new_carry); with final=True the open block is closed and new_carry is empty.
    """
    usable = block_size - 2
    n = offsets.size - 1
    total = offsets[n] - offsets[0]
    # Every piece of at most `usable` ids closes at most one block and brings at most one separator.
    max_blocks = n + total // usable + 2
    out = np.empty(carry.size + total + 3 * max_blocks, dtype=tokens.dtype)
    out_offsets = np.zeros(max_blocks + 1, dtype=np.int64)
    nb = 0
    out[0] = bos
    pos = 1
    out[pos:pos + carry.size] = carry
    pos += carry.size
    used = carry.size  # ids in the open block after <s>
    for i in range(n):
        a = offsets[i]
        b = _take(a, offsets[i + 1], usable, policy, stats)
        if a == b and policy == _SKIP and used > 0 and offsets[i + 1] > a:
            # the ancestor's add_to_block: a line that does not fit closes the open block, THEN is found too long
            pos = _close(out, pos, out_offsets, nb, block_size, eos, stats)
            nb += 1
            out[pos] = bos
            pos += 1
            used = 0
        while a < b:  # pieces of at most `usable` ids (one piece unless the sentence is split)
            m = min(usable, b - a)
            if used > 0 and used + 1 + m > usable:
                pos = _close(out, pos, out_offsets, nb, block_size, eos, stats)
                nb += 1
                out[pos] = bos
                pos += 1
                used = 0
            if used > 0:
                out[pos] = sep
                pos += 1
                used += 1
            out[pos:pos + m] = tokens[a:a + m]
            pos += m
            used += m
            a += m
    if final and used > 0:
        pos = _close(out, pos, out_offsets, nb, block_size, eos, stats)
        nb += 1
        used = 0
    new_carry = out[pos - used:pos].copy()
    return out[:out_offsets[nb]], out_offsets[:nb + 1], new_carry


@njit(cache=True)
def _highest_at_most(bits, limit):
    """The highest set bit of the bitmap `bits` (uint64 words) at position <= limit, or -1."""
    if limit < 0:
        return -1
    w = limit >> 6
    b = limit & 63
    word = bits[w]
    if b < 63:
        word &= (np.uint64(1) << np.uint64(b + 1)) - np.uint64(1)
    zero = np.uint64(0)
    while True:
        if word != zero:
            hi = 0  # binary search for the top bit
            if word >> np.uint64(32) != zero:
                word >>= np.uint64(32)
                hi += 32
            if word >> np.uint64(16) != zero:
                word >>= np.uint64(16)
                hi += 16
            if word >> np.uint64(8) != zero:
                word >>= np.uint64(8)
                hi += 8
            if word >> np.uint64(4) != zero:
                word >>= np.uint64(4)
                hi += 4
            if word >> np.uint64(2) != zero:
                word >>= np.uint64(2)
                hi += 2
            if word >> np.uint64(1) != zero:
                hi += 1
            return w * 64 + hi
        w -= 1
        if w < 0:
            return -1
        word = bits[w]


@njit(cache=True)
def _pack_best_fit(tokens, offsets, block_size, bos, eos, sep, policy, window, carry, carry_offsets, carry_index,
                   next_index, final, stats):
    """Best-fit packing of one chunk (module docstring). `carry`/`carry_offsets`/`carry_index`: the sentences still
    waiting from earlier chunks and their positions; `next_index`: the position of the chunk's first piece.

    Returns (block_tokens, block_offsets, carry, carry_offsets, carry_index, next_index) for the next call."""
    usable = block_size - 2
    cap = block_size - 1  # a sentence costs its ids + 1; a block holds cap of that
    n = offsets.size - 1
    total = offsets[n] - offsets[0]
    n_carry = carry_offsets.size - 1
    most = n_carry + n + total // usable + 1
    src = np.empty(most, dtype=np.int8)  # 0: the carry, 1: this chunk
    start = np.empty(most, dtype=np.int64)
    length = np.empty(most, dtype=np.int64)
    index = np.empty(most, dtype=np.int64)
    for k in range(n_carry):
        src[k], start[k], length[k], index[k] = 0, carry_offsets[k], carry_offsets[k + 1] - carry_offsets[k], \
            carry_index[k]
    m = n_carry
    for i in range(n):  # the chunk's sentences as pieces of at most `usable` ids
        a = offsets[i]
        b = _take(a, offsets[i + 1], usable, policy, stats)
        while a < b:
            size = min(usable, b - a)
            src[m], start[m], length[m], index[m] = 1, a, size, next_index
            next_index += 1
            m += 1
            a += size
    # per cost (ids + 1), a FIFO of waiting pieces linked by `after`; `bits` marks the costs with one waiting
    head = np.full(cap + 1, -1, dtype=np.int64)
    tail = np.full(cap + 1, -1, dtype=np.int64)
    after = np.full(max(m, 1), -1, dtype=np.int64)
    bits = np.zeros(cap // 64 + 1, dtype=np.uint64)
    used = np.zeros(max(m, 1), dtype=np.bool_)
    members = np.empty(cap // 2 + 2, dtype=np.int64)
    out = np.empty(carry.size + total + 3 * m + 3, dtype=tokens.dtype)
    out_offsets = np.zeros(m + 1, dtype=np.int64)
    nb = 0
    pos = 0
    oldest = 0
    waiting = 0
    j = 0
    while True:
        draining = j >= m
        if not draining:  # one more piece enters the window
            c = length[j] + 1
            if tail[c] < 0:
                head[c] = j
                bits[c >> 6] |= np.uint64(1) << np.uint64(c & 63)
            else:
                after[tail[c]] = j
            tail[c] = j
            waiting += 1
            j += 1
            if index[j - 1] - index[oldest] + 1 < window:
                continue
        elif not final or waiting == 0:
            break
        # one block: the oldest waiting piece (the longest, once the shard's last piece is in), then the longest
        # that fits, again and again
        k = 0
        room = cap
        if not draining:
            c = length[oldest] + 1
            first = oldest
        else:  # emptying the window: nothing waits for a later piece, so the longest go first (decreasing)
            c = _highest_at_most(bits, cap)
            first = head[c]
        while first >= 0:
            head[c] = after[first]
            if head[c] < 0:
                tail[c] = -1
                bits[c >> 6] &= ~(np.uint64(1) << np.uint64(c & 63))
            used[first] = True
            waiting -= 1
            members[k] = first
            k += 1
            room -= c
            c = _highest_at_most(bits, room)
            first = head[c] if c >= 0 else -1
        for t in range(1, k):  # corpus order inside the block (pieces are numbered in corpus order); k is small
            p = members[t]
            u = t - 1
            while u >= 0 and members[u] > p:
                members[u + 1] = members[u]
                u -= 1
            members[u + 1] = p
        out_offsets[nb] = pos
        out[pos] = bos
        pos += 1
        for t in range(k):
            p = members[t]
            if t > 0:
                out[pos] = sep
                pos += 1
            if src[p] == 0:
                out[pos:pos + length[p]] = carry[start[p]:start[p] + length[p]]
            else:
                out[pos:pos + length[p]] = tokens[start[p]:start[p] + length[p]]
            pos += length[p]
        pos = _close(out, pos, out_offsets, nb, block_size, eos, stats)
        nb += 1
        while oldest < j and used[oldest]:
            oldest += 1
    # the pieces still waiting go to the next call, in corpus order
    keep = 0
    kept = 0
    for p in range(oldest, m):
        if not used[p]:
            keep += 1
            kept += length[p]
    new_carry = np.empty(kept, dtype=tokens.dtype)
    new_offsets = np.zeros(keep + 1, dtype=np.int64)
    new_index = np.empty(keep, dtype=np.int64)
    q = 0
    w = 0
    for p in range(oldest, m):
        if not used[p]:
            if src[p] == 0:
                new_carry[w:w + length[p]] = carry[start[p]:start[p] + length[p]]
            else:
                new_carry[w:w + length[p]] = tokens[start[p]:start[p] + length[p]]
            w += length[p]
            new_index[q] = index[p]
            q += 1
            new_offsets[q] = w
    return out[:pos], out_offsets[:nb + 1], new_carry, new_offsets, new_index, next_index


@njit(cache=True)
def _pack_lines(tokens, offsets, block_size, bos, eos, policy, stats):
    """Line by line: `<s> sentence </s>` per sentence (per piece of `usable` ids when a long sentence is split)."""
    usable = block_size - 2
    n = offsets.size - 1
    total = offsets[n] - offsets[0]
    max_blocks = n + total // usable + 1
    out = np.empty(total + 2 * max_blocks, dtype=tokens.dtype)
    out_offsets = np.zeros(max_blocks + 1, dtype=np.int64)
    nb = 0
    pos = 0
    for i in range(n):
        a = offsets[i]
        b = _take(a, offsets[i + 1], usable, policy, stats)
        while a < b:
            m = min(usable, b - a)
            out[pos] = bos
            out[pos + 1:pos + 1 + m] = tokens[a:a + m]
            pos = _close(out, pos + 1 + m, out_offsets, nb, block_size, eos, stats)
            nb += 1
            a += m
    return out[:pos], out_offsets[:nb + 1]


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
        if window < 1:
            raise ValueError(f"best-fit window {window} must hold at least one sentence")
        self.concat = datasets_type == CONCAT
        self.best_fit = self.concat and packing == "best_fit"
        self.block_size, self.policy, self.window = int(block_size), POLICIES[long_sentence], int(window)
        self.dtype = np.dtype(dtype)
        self.bos, self.eos, self.sep = (self.dtype.type(i) for i in (bos_id, eos_id, sep_id))
        self._counts = np.zeros(_N_STATS, dtype=np.int64)
        self._carry = np.zeros(0, dtype=self.dtype)
        self._carry_offsets = np.zeros(1, dtype=np.int64)  # best fit: the waiting sentences and their positions
        self._carry_index = np.zeros(0, dtype=np.int64)
        self._next_index = 0

    @property
    def stats(self) -> PackStats:
        return PackStats.from_array(self._counts)

    def feed(self, tokens: np.ndarray, offsets: np.ndarray, final: bool = False):
        """Pack one chunk; returns (block_tokens, block_offsets) of the blocks it completed."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        if offsets.size == 0 or offsets[0] < 0 or offsets[-1] > tokens.size or np.any(offsets[1:] < offsets[:-1]):
            raise ValueError("offsets must be non-decreasing, start at 0 or more and end within tokens")
        if not self.concat:
            return _pack_lines(tokens, offsets, self.block_size, self.bos, self.eos, self.policy, self._counts)
        if self.best_fit:
            (blocks, block_offsets, self._carry, self._carry_offsets, self._carry_index,
             self._next_index) = _pack_best_fit(tokens, offsets, self.block_size, self.bos, self.eos, self.sep,
                                                self.policy, self.window, self._carry, self._carry_offsets,
                                                self._carry_index, self._next_index, final, self._counts)
            return blocks, block_offsets
        blocks, block_offsets, self._carry = _pack_concat(tokens, offsets, self.block_size, self.bos, self.eos,
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
