"""Which samples each optimizer step trains on, and which of them this rank reads: the same global batches for any
number of processes, resumable in O(1).

The global order of an epoch is a pseudorandom permutation of `range(num_samples)` keyed by (seed, epoch) alone
(Megatron's consumed-samples idea). Optimizer step after optimizer step, the next `global_batch` positions of that
order are the step's samples; they are cut into micro-batches of `micro_batch` samples, and micro-batch j of the
step goes to rank j % world_size at accumulation step j // world_size:

    epoch order:   p[0] ... p[G-1] | p[G] ... p[2G-1] | ...           G = global batch = m x W x A
    step s:        micro-batches  p[sG + jm : sG + (j+1)m],  j = 0 .. W*A-1
    rank r reads:  j = r, r + W, r + 2W, ...  (A micro-batches, one per accumulation step)

So the global batch of step s is the same list of samples for every (W, m, A) with W x m x A = G, and micro-batch j
is the same slice whenever m is the same: a run resumed on another number of processes trains on the same samples,
and with the loss normalised over the whole global batch (trainer.py) it follows the same trajectory up to
floating-point reduction order. The incomplete tail of each epoch (`num_samples % G` samples) is dropped, and the
next epoch uses a fresh permutation, so a dropped sample is read in later epochs.

The permutation is random-access (a keyed Feistel network with cycle walking, the idea behind TensorFlow's
`index_shuffle` and Grain's samplers): position i of epoch e is computed on its own in O(1) time and memory. The
order is never materialised, and resuming anywhere is a jump, never a replay of the skipped batches (HF users waited
28 hours for a resume that iterated over 660k batches, transformers#11284). It is pure integer arithmetic, so it does
not change with the numpy or torch version.

The position is `(epoch, epoch_offset)`: the epoch, and how many samples of its order the run has trained on.
`consumed_samples` counts the samples since the start of training. The state holds nothing else, so it resumes on
any world size, micro-batch or accumulation; with another global batch the run goes on from the same place in the
same order, in steps of the new size.
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


class GlobalBatchSampler:
    """The samples of each optimizer step and this rank's micro-batches of them; see the module docstring.

        sampler = GlobalBatchSampler(len(dataset), global_batch, micro_batch, rank, world_size, seed)
        sampler.load_state_dict(saved)             # optional: jump to a checkpoint's position
        epoch, micro_batches, step_indices = sampler.next_step()   # A lists of micro_batch indices; all G of the step
        saved = sampler.state_dict()               # the position after the steps handed out
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 42, shuffle: bool = True):
        self.num_samples = _checked_int("num_samples", num_samples, 0)
        self.global_batch = _checked_int("global_batch", global_batch, 1)
        self.micro_batch = _checked_int("micro_batch", micro_batch, 1)
        self.world_size = _checked_int("world_size", world_size, 1)
        self.rank = _checked_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise UserError(f"sampler rank {rank} is not below world_size {world_size}: check RANK and WORLD_SIZE")
        if self.global_batch % (self.micro_batch * self.world_size):
            raise UserError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x "
                            f"{world_size} processes")
        self.accumulation = self.global_batch // (self.micro_batch * self.world_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise UserError(f"--seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        if self.num_samples < self.global_batch:
            raise UserError(f"the training set has {self.num_samples} samples, fewer than one global batch of "
                            f"{self.global_batch} (micro batch {self.micro_batch} x gradient accumulation "
                            f"{self.accumulation} x {self.world_size} processes): add text to --train_dir, or lower "
                            "--per_device_train_batch_size or --gradient_accumulation_steps")
        # A Feistel network permutes an even number of bits: the smallest domain 4**half_bits >= num_samples.
        self._half_bits = max(1, ((self.num_samples - 1).bit_length() + 1) // 2)
        self._keys_epoch, self._keys = None, None
        self.epoch = 0
        self.epoch_offset = 0
        self.consumed_samples = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch; the ragged tail is dropped."""
        return self.num_samples // self.global_batch

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

    def step_at(self, epoch: int, offset: int):
        """(this rank's A micro-batches as lists, every index of the step) of the step starting at `offset`."""
        step = self.global_indices(epoch, offset, offset + self.global_batch)
        m, w = self.micro_batch, self.world_size
        mine = [step[(a * w + self.rank) * m:(a * w + self.rank + 1) * m].tolist() for a in range(self.accumulation)]
        return mine, step

    def next_step(self):
        """(epoch, this rank's micro-batches, all indices of the step); the position advances past the step."""
        epoch = self.epoch
        micro_batches, step = self.step_at(epoch, self.epoch_offset)
        self.epoch_offset += self.global_batch
        self.consumed_samples += self.global_batch
        self._roll_epoch()
        return epoch, micro_batches, step

    def _roll_epoch(self) -> None:
        # Eagerly: a checkpoint taken at the end of an epoch then names the next one, whatever the next global batch.
        if self.epoch_offset + self.global_batch > self.num_samples:
            self.epoch, self.epoch_offset = self.epoch + 1, 0

    # -- checkpointing ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "epoch": self.epoch, "epoch_offset": self.epoch_offset,
                "seed": self.seed, "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Jump to a saved position in O(1). The state must come from the same training set, seed and shuffle."""
        if not isinstance(state, dict) or not {"consumed_samples", "epoch", "epoch_offset"} <= set(state):
            raise UserError("the checkpoint's sampler state is incomplete: the checkpoint is not from this ds-mlm or "
                            "is damaged; resume from another checkpoint or start over with --overwrite_output_dir")
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
        epoch = _checked_int("epoch", state["epoch"], 0)
        offset = _checked_int("epoch_offset", state["epoch_offset"], 0)
        if offset > self.num_samples:
            raise UserError(f"the checkpoint's sampler position {offset} is past the end of an epoch of "
                            f"{self.num_samples} samples: the checkpoint is damaged; resume from another one")
        self.epoch, self.epoch_offset, self.consumed_samples = epoch, offset, consumed
        self._roll_epoch()  # another global batch may not fit in what is left of this epoch
