"""Counter-based hashing, shared by the sampler and the collator: a random decision is a pure function of its
coordinates (seed, epoch, sample index, position), never of a random stream's history, so it comes out the same
whichever rank, batch or resumed run makes it."""

import numpy as np
from numba import njit

U64 = (1 << 64) - 1
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: splitmix64's increment


@njit(cache=True)
def mix64(x):
    """splitmix64's finaliser: a bijective 64-bit hash in which every input bit affects every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def epoch_key(seed, epoch):
    """One 64-bit key for (seed, epoch), both uint64."""
    return mix64(mix64(seed ^ GOLDEN) ^ epoch)



def seed_from(*values: int) -> int:
    """A 63-bit seed mixed from integers (e.g. seed, step, rank), for a generator that must be seeded afresh."""
    x = 0
    for v in values:
        x = (x ^ (int(v) & U64)) + int(GOLDEN) & U64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & U64  # mix64, in plain integers
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & U64
        x ^= x >> 31
    return x >> 1
