"""Which samples each rank reads, micro-batch after micro-batch, epoch after epoch, resumable in O(1).

The global order of an epoch is a pseudorandom permutation of `range(num_samples)` keyed by (seed, epoch) alone, so
it does not depend on the world size (Megatron's consumed-samples idea). The stream of *global* micro-batches of
`micro_batch_size * world_size` samples is cut from that permutation, and rank r reads the contiguous slice r of
each global micro-batch:

    epoch order:  p[0] ... p[G-1] | p[G] ... p[2G-1] | ...     G = micro_batch_size * world_size
    rank r reads: p[r*m : (r+1)*m]  p[G+r*m : G+(r+1)*m]        m = micro_batch_size

The incomplete tail of each epoch (`num_samples % G` samples) is dropped: every rank must read a full micro-batch
at every step. The next epoch uses a fresh permutation, so a dropped sample is read in later epochs.

The permutation is random-access (a keyed Feistel network with cycle walking, the idea behind TensorFlow's
`index_shuffle` and Grain's samplers): position i of epoch e is computed on its own in O(1) time and memory. The
order is never materialised (no O(num_samples) array per rank and epoch), and resuming anywhere is a jump, never a
replay of the skipped batches (HF users waited 28 hours for a resume that iterated over 660k batches,
transformers#11284). It is pure integer arithmetic, so it does not change with the numpy or torch version.

The position is `(epoch, epoch_offset)`: the epoch, and how many samples of its order all ranks have read.
`consumed_samples` counts the global samples read since the start of training. A `state_dict()` resumes exactly (the
same batches) at the same world size and micro-batch size; at another one the global order is the same and reading
goes on from the same place in it.
"""

import numpy as np
from numba import njit

from ds_mlm.errors import UserError
from ds_mlm.hashing import GOLDEN, U64, epoch_key, mix64

_ROUNDS = 6  # Luby-Rackoff: 4 rounds make a strong pseudorandom permutation; 2 more cost nothing


@njit(cache=True)
def _round_keys(seed, epoch, rounds):
    """The Feistel round keys of one epoch: a function of (seed, epoch) only."""
    keys = np.empty(rounds, dtype=np.uint64)
    base = epoch_key(seed, epoch)
    for r in range(rounds):
        keys[r] = mix64(base + np.uint64(r + 1) * GOLDEN)
    return keys


@njit(cache=True)
def _feistel_positions(start, count, n, half_bits, keys, out):
    """out[k] = the keyed permutation of range(n) at position start + k."""
    half = np.uint64(half_bits)
    low = (np.uint64(1) << half) - np.uint64(1)
    un = np.uint64(n)
    for k in range(count):
        x = np.uint64(start + k)
        while True:  # cycle walking: the network permutes range(4**half_bits) >= n; walk until back inside range(n)
            left = x >> half
            right = x & low
            for key in keys:
                left, right = right, left ^ (mix64(right ^ key) & low)
            x = (left << half) | right
            if x < un:
                break
        out[k] = np.int64(x)


def _checked_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"sampler {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class ResumableDistributedSampler:
    """This rank's micro-batches of sample indices, as `(epoch, indices)` forever; see the module docstring.

        sampler = ResumableDistributedSampler(len(dataset), micro_batch_size, rank, world_size, seed)
        sampler.load_state_dict(saved)           # optional: jump to a checkpoint's position
        for epoch, indices in sampler:           # indices: list[int] of length micro_batch_size
            ...
        saved = sampler.state_dict()

    The position advances as a micro-batch is handed out, so a `state_dict()` taken after the trainer used k
    micro-batches resumes at micro-batch k + 1. Each sample is read by at most one rank per epoch.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 42, shuffle: bool = True):
        self.num_samples = _checked_int("num_samples", num_samples, 0)
        self.micro_batch_size = _checked_int("micro_batch_size", micro_batch_size, 1)
        self.world_size = _checked_int("world_size", world_size, 1)
        self.rank = _checked_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise UserError(f"sampler rank {rank} is not below world_size {world_size}: check RANK and WORLD_SIZE")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise UserError(f"--seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.global_batch_size = self.micro_batch_size * self.world_size
        if self.num_samples < self.global_batch_size:
            raise UserError(f"the training set has {self.num_samples} samples, fewer than one global micro-batch of "
                            f"{self.global_batch_size} (micro-batch size {self.micro_batch_size} x {self.world_size} "
                            "processes): add text to --train_dir, lower --per_device_train_batch_size, or use fewer "
                            "processes")
        # A Feistel network permutes an even number of bits: the smallest domain 4**half_bits >= num_samples.
        self._half_bits = max(1, ((self.num_samples - 1).bit_length() + 1) // 2)
        self._keys_epoch, self._keys = None, None
        self.epoch = 0
        self.epoch_offset = 0
        self.consumed_samples = 0

    @property
    def micro_batches_per_epoch(self) -> int:
        """Global micro-batches in one epoch (each rank reads this many micro-batches); the ragged tail is dropped."""
        return self.num_samples // self.global_batch_size

    # -- the order ----------------------------------------------------------------------------------------------------

    def global_indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) of epoch `epoch`'s global order, as int64 sample indices (any world size)."""
        if not 0 <= start <= stop <= self.num_samples:
            raise ValueError(f"positions [{start}, {stop}) outside an epoch of {self.num_samples} samples")
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        if self._keys_epoch != epoch:  # derived once per epoch
            self._keys = _round_keys(np.uint64(self.seed & U64), np.uint64(epoch & U64), _ROUNDS)
            self._keys_epoch = epoch
        out = np.empty(stop - start, dtype=np.int64)
        _feistel_positions(start, stop - start, self.num_samples, self._half_bits, self._keys, out)
        return out

    def _rank_slice(self, epoch: int, offset: int) -> list:
        begin = offset + self.rank * self.micro_batch_size
        return self.global_indices(epoch, begin, begin + self.micro_batch_size).tolist()

    def __iter__(self):
        """(epoch, this rank's indices), forever, from the current position; the state advances before each yield."""
        while True:
            epoch, offset = self.epoch, self.epoch_offset
            indices = self._rank_slice(epoch, offset)
            self.epoch_offset += self.global_batch_size
            self.consumed_samples += self.global_batch_size
            self._roll_epoch()
            yield epoch, indices

    def epoch_iterator(self, epoch: int):
        """This rank's micro-batches of one whole epoch (a finite pass); the training position is left alone."""
        for b in range(self.micro_batches_per_epoch):
            yield self._rank_slice(epoch, b * self.global_batch_size)

    def _roll_epoch(self) -> None:
        # Eagerly: a checkpoint taken at the end of an epoch then names the next one, whatever the next world size.
        if self.epoch_offset + self.global_batch_size > self.num_samples:
            self.epoch, self.epoch_offset = self.epoch + 1, 0

    # -- checkpointing ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "epoch": self.epoch, "epoch_offset": self.epoch_offset,
                "seed": self.seed, "num_samples": self.num_samples, "shuffle": self.shuffle,
                "micro_batch_size": self.micro_batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Jump to a saved position in O(1). The state must come from the same training set, seed and shuffle."""
        if not isinstance(state, dict) or "consumed_samples" not in state:
            raise UserError("the checkpoint's sampler state has no consumed_samples: the checkpoint is not from "
                            "ds-mlm or is damaged; resume from another checkpoint or start over with "
                            "--overwrite_output_dir")
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise UserError(f"the checkpoint was trained on {state['num_samples']} samples but this training set "
                            f"has {self.num_samples}: the training data, tokenizer or --max_seq_length changed; "
                            "restore them to resume, or start a new run with --overwrite_output_dir or a new "
                            "--output_dir")
        if state.get("seed", self.seed) != self.seed:
            raise UserError(f"the checkpoint was trained with --seed {state['seed']} but this run has --seed "
                            f"{self.seed}: resume with --seed {state['seed']}")
        if bool(state.get("shuffle", self.shuffle)) != self.shuffle:
            raise UserError(f"the checkpoint was trained with shuffle={state['shuffle']} but this run has "
                            f"shuffle={self.shuffle}: resume with the same setting")
        consumed = _checked_int("consumed_samples", state["consumed_samples"], 0)
        if "epoch" in state:
            epoch = _checked_int("epoch", state["epoch"], 0)
            offset = _checked_int("epoch_offset", state.get("epoch_offset", 0), 0)
            if offset > self.num_samples:
                raise UserError(f"the checkpoint's sampler position {offset} is past the end of an epoch of "
                                f"{self.num_samples} samples: the checkpoint is damaged; resume from another one")
        else:  # a bare Megatron-style counter: every epoch so far had this run's global micro-batch size
            epoch, offset = divmod(consumed, self.micro_batches_per_epoch * self.global_batch_size)
        self.epoch, self.epoch_offset, self.consumed_samples = epoch, offset, consumed
        self._roll_epoch()  # another world size may not fit one more global micro-batch in this epoch
