"""Which samples each rank reads, step after step: a seeded, epoch-aware, resumable distributed sampler.

The global order of an epoch is a permutation drawn from (seed, epoch) alone, so it does not depend on the number
of processes (Megatron's consumed-samples idea). That order is cut into global micro-batches of
`micro_batch_size * world_size` samples; rank r reads slice r of each. The ragged tail of an epoch (fewer samples than
one global micro-batch) is dropped, as DistributedSampler(drop_last=True) does.

The whole state is one number, `consumed_samples`: resuming jumps straight to it in O(1) (HF users waited 28 hours
for a resume that replayed 660k batches, transformers#11284).
"""

import numpy as np

from ds_mlm.errors import UserError


class ResumableDistributedSampler:
    def __init__(self, num_samples: int, micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 42,
                 shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.global_batch = micro_batch_size * world_size
        self.micro_batches_per_epoch = num_samples // self.global_batch
        if self.micro_batches_per_epoch == 0:
            raise UserError(f"{num_samples} samples cannot fill one micro-batch of {micro_batch_size} on each of "
                            f"{world_size} processes: add text, or lower --per_device_train_batch_size")
        self.samples_per_epoch = self.micro_batches_per_epoch * self.global_batch
        self.consumed_samples = 0
        self._cached = (None, None)  # (epoch, order): one permutation in memory at a time

    def order(self, epoch: int) -> np.ndarray:
        """The global order of `epoch`: the same for every rank and every world size."""
        if self._cached[0] != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                self._cached = (epoch, rng.permutation(self.num_samples))
            else:
                self._cached = (epoch, np.arange(self.num_samples))
        return self._cached[1]

    def position(self) -> tuple[int, int]:
        """(epoch, offset into that epoch's order) of the next global micro-batch."""
        return divmod(self.consumed_samples, self.samples_per_epoch)

    def __iter__(self):
        """This rank's micro-batches as (epoch, indices), epoch after epoch, from the current position on."""
        while True:
            epoch, offset = self.position()
            start = offset + self.rank * self.micro_batch_size
            indices = self.order(epoch)[start:start + self.micro_batch_size]
            self.consumed_samples += self.global_batch
            yield epoch, indices.tolist()

    def epoch_iterator(self, epoch: int):
        """One finite pass over `epoch` for this rank, leaving the training position alone."""
        order = self.order(epoch)
        for b in range(self.micro_batches_per_epoch):
            start = b * self.global_batch + self.rank * self.micro_batch_size
            yield order[start:start + self.micro_batch_size].tolist()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "num_samples": self.num_samples,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Jump to a saved position: O(1), nothing is replayed."""
        if state["num_samples"] != self.num_samples:
            raise UserError(f"the checkpoint was trained on {state['num_samples']} samples but the training set now "
                            f"has {self.num_samples}: resume with the same data, or start afresh with "
                            "--overwrite_output_dir")
        if state["seed"] != self.seed or state.get("shuffle", True) != self.shuffle:
            raise UserError(f"the checkpoint was trained with --seed {state['seed']}, this run has --seed {self.seed}: "
                            "resume with the same seed, or start afresh with --overwrite_output_dir")
        self.consumed_samples = int(state["consumed_samples"])
