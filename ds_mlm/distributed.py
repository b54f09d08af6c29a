"""Process-group set-up: rank, world size and local rank from the environment, whichever launcher set them.

The deepspeed launcher, torchrun and `python -m torch.distributed.launch` all export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. A bare `python -m ds_mlm.run_mlm` sets none of them: it is a world of one process,
and we fill in the rendezvous defaults ourselves (DeepSpeed would otherwise try MPI discovery and fail).
"""

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank of this process on its node."""
    local_world_size: int
    """Number of processes on this node."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_info() -> DistInfo:
    """What the launcher told this process (a world of one when there is no launcher)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), local_world_size=local_world)


def set_single_process_defaults() -> None:
    """Without a launcher, make this process a world of one on a free loopback port."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init() -> DistInfo:
    """Join the process group through DeepSpeed (any accelerator), once."""
    set_single_process_defaults()
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # say it, rather than let DeepSpeed guess (and warn) on every rank
    import deepspeed  # imported here: building a dataset must not pay for it
    import deepspeed.ops

    # The shm all-reduce extension is only for inference, costs a 30-40 s compile, and leaks 66 MiB per rank in
    # /dev/shm under the launcher (shared/notes/deepspeed-on-cpu.md): training never needs it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_init_required=True, verbose=False)
    return env_info()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (just `[obj]` without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
