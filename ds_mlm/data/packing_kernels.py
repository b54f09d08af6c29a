"""The numba kernels of packing.py (which describes the packings and holds the API): flat arrays in, flat arrays out.

Every kernel adds what it did to `stats`, an int64 array laid out as PackStats' fields. Best fit keeps its state
between calls in arrays the caller owns (`BestFitState`), so a call never rebuilds what the previous one left:

    ring   int64 (R, 4), R a power of two >= the window: piece number p lives in row p & (R - 1), its columns
           LOC (the stream position of its first id: ids are numbered across calls, in the order fed), LEN (its
           ids), AFTER (the next waiting piece of the same cost, -1 at the end), USED (1 once in a block)
    fifo   int64 (block_size, 2): per cost (ids + 1), HEAD and TAIL of its waiting pieces, oldest first, -1 if none
    bits   uint64, bit c set while a piece of cost c waits (the tightest fit is the highest set bit <= the room)
    last   the ids of the previous call (a view of its `tokens`, not a copy), `before` those of the call before it:
           pieces still waiting are read from there, so a chunk's ids are not copied while the window spans at
           most three calls (the build: 2500 sentences a call, a window of 4096)
    held   ids of the stream positions [LOC of the oldest waiting piece, first position of `before`), each at
           position & (held.size - 1): the ids still waiting of older calls, copied there from `before` when it is
           let go (grown by doubling)
    state  int64 (6,): pieces numbered so far, the oldest waiting piece, pieces waiting, the stream position next,
           the stream positions of before[0] and last[0]
"""

from dataclasses import dataclass, fields

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import leading_zeros
from numba.extending import intrinsic

SPLIT, SKIP, TRUNCATE = 0, 1, 2
LOC, LEN, AFTER, USED = 0, 1, 2, 3
HEAD, TAIL = 0, 1
ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


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


N_STATS = len(fields(PackStats))
SENTENCES, EMPTY, TOKENS, BLOCKS, BLOCK_TOKENS, SKIPPED, SPLITS, TRUNCATED, DROPPED, PADDING = range(N_STATS)


class BestFitState:
    """The arrays best fit carries from one call to the next (module docstring), empty: nothing waits yet."""

    def __init__(self, block_size: int, window: int, dtype):
        rows = 1 << max(window - 1, 0).bit_length()  # a power of two >= window: a window's pieces never share a row
        self.ring = np.zeros((rows, 4), dtype=np.int64)
        self.fifo = np.full((block_size, 2), -1, dtype=np.int64)
        self.bits = np.zeros((block_size - 1) // 64 + 1, dtype=np.uint64)
        self.held = np.zeros(1, dtype=dtype)
        self.before = self.last = np.zeros(0, dtype=dtype)
        self.state = np.zeros(6, dtype=np.int64)


@intrinsic
def memcpy_ids(typingctx, dst, d, src, s, m):
    """memcpy of src[s:s + m] to dst[d:d + m], unchecked (copy_ids checks): numba's slice assignment copies id by id,
    ~5x slower (5 M uint16 ids in slices of 92: 4.1 ms vs 0.8 ms), as long as all the rest of the sequential kernel."""
    if dst.dtype != src.dtype:  # a typing error when compiled: the byte count assumes one item size
        return None

    def codegen(context, builder, sig, args):
        dst_array = context.make_array(sig.args[0])(context, builder, args[0])
        src_array = context.make_array(sig.args[2])(context, builder, args[2])
        itemsize = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        cgutils.raw_memcpy(builder, builder.gep(dst_array.data, [args[1]]), builder.gep(src_array.data, [args[3]]),
                           args[4], itemsize)
        return context.get_dummy_value()

    return types.void(dst, types.int64, src, types.int64, types.int64), codegen


@njit(cache=True)
def copy_ids(dst, d, src, s, m):
    """dst[d:d + m] = src[s:s + m] (arrays of one dtype, not overlapping), as one memcpy."""
    if m > 0:
        if d < 0 or s < 0 or d + m > dst.size or s + m > src.size:
            raise IndexError("copy_ids out of bounds")
        memcpy_ids(dst, d, src, s, m)


@njit(cache=True)
def take(a, b, usable, policy, stats):
    """Account for sentence tokens[a:b]; return the end of what is kept (a when the sentence is dropped)."""
    n = b - a
    if n == 0:
        stats[EMPTY] += 1
        return a
    stats[SENTENCES] += 1
    stats[TOKENS] += n
    if n <= usable:
        return b
    if policy == SKIP:
        stats[SKIPPED] += 1
        stats[DROPPED] += n
        return a
    if policy == TRUNCATE:
        stats[TRUNCATED] += 1
        stats[DROPPED] += n - usable
        return a + usable
    stats[SPLITS] += 1
    return b


@njit(cache=True)
def close_block(out, pos, out_offsets, nb, block_size, eos, stats):
    """Write </s> after the open block (which starts at out_offsets[nb]); return the new write position."""
    out[pos] = eos
    pos += 1
    stats[BLOCKS] += 1
    stats[BLOCK_TOKENS] += pos - out_offsets[nb]
    stats[PADDING] += block_size - (pos - out_offsets[nb])
    out_offsets[nb + 1] = pos
    return pos


@njit(cache=True)
def pack_sequential(tokens, offsets, block_size, bos, eos, sep, policy, carry, final, stats):
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
    copy_ids(out, pos, carry, 0, carry.size)
    pos += carry.size
    used = carry.size  # ids in the open block after <s>
    for i in range(n):
        a = offsets[i]
        b = take(a, offsets[i + 1], usable, policy, stats)
        if a == b and policy == SKIP and used > 0 and offsets[i + 1] > a:
            # the ancestor's add_to_block: a line that does not fit closes the open block, THEN is found too long
            pos = close_block(out, pos, out_offsets, nb, block_size, eos, stats)
            nb += 1
            out[pos] = bos
            pos += 1
            used = 0
        while a < b:  # pieces of at most `usable` ids (one piece unless the sentence is split)
            m = min(usable, b - a)
            if used > 0 and used + 1 + m > usable:
                pos = close_block(out, pos, out_offsets, nb, block_size, eos, stats)
                nb += 1
                out[pos] = bos
                pos += 1
                used = 0
            if used > 0:
                out[pos] = sep
                pos += 1
                used += 1
            copy_ids(out, pos, tokens, a, m)
            pos += m
            used += m
            a += m
    if final and used > 0:
        pos = close_block(out, pos, out_offsets, nb, block_size, eos, stats)
        nb += 1
        used = 0
    new_carry = out[pos - used:pos].copy()
    return out[:out_offsets[nb]], out_offsets[:nb + 1], new_carry


@njit(cache=True)
def highest_at_most(bits, limit):
    """The highest set bit of the bitmap `bits` (uint64 words) at position <= limit, or -1."""
    if limit < 0:
        return -1
    w = limit >> 6
    word = bits[w] & (ALL_ONES >> np.uint64(63 - (limit & 63)))  # bits 0 .. limit & 63 of the word
    while word == 0:
        w -= 1
        if w < 0:
            return -1
        word = bits[w]
    return w * 64 + 63 - np.int64(leading_zeros(word))


@njit(cache=True)
def copy_ring(dst, d, held, p, m):
    """dst[d:d + m] = the ids of stream positions p .. p + m - 1 in `held` (which may wrap around its end)."""
    mask = held.size - 1
    s = p & mask
    first = min(m, held.size - s)
    copy_ids(dst, d, held, s, first)
    copy_ids(dst, d + first, held, 0, m - first)


@njit(cache=True)
def hold(held, p, src, a, m):
    """Store src[a:a + m] as the ids of stream positions p .. p + m - 1 in `held`."""
    mask = held.size - 1
    s = p & mask
    first = min(m, held.size - s)
    copy_ids(held, s, src, a, first)
    copy_ids(held, 0, src, a + first, m - first)


@njit(cache=True)
def pack_best_fit(tokens, offsets, block_size, bos, eos, sep, policy, window, ring, fifo, bits, held, before, last,
                  state, final, stats):
    """Best-fit packing of one chunk (packing.py's docstring), continuing from `ring`, `fifo`, `bits`, `held`,
    `before`, `last` and `state` (this module's docstring), which it updates. Returns (block_tokens, block_offsets,
    held): `held` is a new array when it had to grow; the caller then keeps `last` as `before` and this call's ids
    tokens[offsets[0]:offsets[-1]] as `last`."""
    usable = block_size - 2
    cap = block_size - 1  # a piece costs its ids + 1; a block holds cap of that
    mask = ring.shape[0] - 1
    n = offsets.size - 1
    base = offsets[0]
    total = offsets[n] - base
    count, oldest, waiting, start = state[0], state[1], state[2], state[3]  # tokens[base] is stream position start
    before_from, last_from = state[4], state[5]
    held_from = ring[oldest & mask, LOC] if waiting > 0 else start
    most = waiting + n + total // usable + 1  # the pieces this call can write
    out = np.empty(start - held_from + total + 2 * most + 1, dtype=tokens.dtype)
    out_offsets = np.empty(most + 1, dtype=np.int64)
    out_offsets[0] = 0
    members = np.empty(cap // 2 + 1, dtype=np.int64)
    nb = 0
    pos = 0
    i = 0
    a = b = base  # what is left of the sentence being cut into pieces
    while True:
        while a >= b and i < n:
            a = offsets[i]
            b = take(a, offsets[i + 1], usable, policy, stats)
            i += 1
        draining = a >= b
        if not draining:  # one more piece enters the window
            m = min(usable, b - a)
            c = m + 1
            r = count & mask
            ring[r, LOC], ring[r, LEN], ring[r, AFTER], ring[r, USED] = start + a - base, m, -1, 0
            tail = fifo[c, TAIL]
            if tail < 0:
                fifo[c, HEAD] = count
                bits[c >> 6] |= np.uint64(1) << np.uint64(c & 63)
            else:
                ring[tail & mask, AFTER] = count
            fifo[c, TAIL] = count
            count += 1
            waiting += 1
            a += m
            if count - oldest < window:
                continue
        elif not final or waiting == 0:
            break
        # one block: the oldest waiting piece (the longest, once the last piece is in), then the longest that fits,
        # again and again; the oldest waiting piece heads the queue of its cost
        if not draining:
            c = ring[oldest & mask, LEN] + 1
            first = oldest
        else:  # emptying the window: nothing waits for a later piece, so the longest go first (decreasing)
            c = highest_at_most(bits, cap)
            first = fifo[c, HEAD]
        k = 0
        room = cap
        while first >= 0:
            r = first & mask
            following = ring[r, AFTER]
            fifo[c, HEAD] = following
            if following < 0:
                fifo[c, TAIL] = -1
                bits[c >> 6] &= ~(np.uint64(1) << np.uint64(c & 63))
            ring[r, USED] = 1
            waiting -= 1
            members[k] = first
            k += 1
            room -= c
            c = highest_at_most(bits, room)
            first = fifo[c, HEAD] if c >= 0 else -1
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
            r = members[t] & mask
            if t > 0:
                out[pos] = sep
                pos += 1
            p, m = ring[r, LOC], ring[r, LEN]
            if p >= start:  # in this call's tokens
                copy_ids(out, pos, tokens, base + p - start, m)
            elif p >= last_from:  # the previous call's
                copy_ids(out, pos, last, p - last_from, m)
            elif p >= before_from:  # the call before
                copy_ids(out, pos, before, p - before_from, m)
            else:
                copy_ring(out, pos, held, p, m)
            pos += m
        pos = close_block(out, pos, out_offsets, nb, block_size, eos, stats)
        nb += 1
        while oldest < count and ring[oldest & mask, USED] == 1:
            oldest += 1
    # `before` is let go: its ids still waiting go to `held`, which then holds [keep_from, last_from)
    end = start + total
    keep_from = ring[oldest & mask, LOC] if waiting > 0 else end
    if last_from - keep_from > held.size:  # grown by doubling: a few times per stream
        size = held.size
        while size < last_from - keep_from:
            size *= 2
        earlier = np.empty(max(before_from - keep_from, 0), dtype=held.dtype)  # the waiting ids of older calls
        copy_ring(earlier, 0, held, keep_from, earlier.size)
        held = np.empty(size, dtype=held.dtype)
        hold(held, keep_from, earlier, 0, earlier.size)
    lo = max(keep_from, before_from)
    hold(held, lo, before, lo - before_from, max(last_from - lo, 0))
    state[0], state[1], state[2], state[3], state[4], state[5] = count, oldest, waiting, end, last_from, start
    return out[:pos], out_offsets[:nb + 1], held


@njit(cache=True)
def pack_line_by_line(tokens, offsets, block_size, bos, eos, policy, stats):
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
        b = take(a, offsets[i + 1], usable, policy, stats)
        while a < b:
            m = min(usable, b - a)
            out[pos] = bos
            copy_ids(out, pos + 1, tokens, a, m)
            pos = close_block(out, pos + 1 + m, out_offsets, nb, block_size, eos, stats)
            nb += 1
            a += m
    return out[:pos], out_offsets[:nb + 1]
