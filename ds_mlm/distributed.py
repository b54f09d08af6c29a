"""Process-group set-up: rank, world size and local rank from the environment, whichever launcher set them.

The deepspeed launcher, torchrun and `python -m torch.distributed.launch` export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT and the processes-per-node count (LOCAL_SIZE or LOCAL_WORLD_SIZE). Under mpirun or srun
(the deepspeed launcher's `--launcher openmpi|mpich|impi|mvapich|slurm`) each process has its scheduler's variables
instead: we translate them, and MASTER_ADDR must be given (launch.sh passes it). A bare `python -m ds_mlm.run_mlm`
has none: a world of one process on a free loopback port (DeepSpeed would otherwise try MPI discovery and fail).
The processes of a node share its CPU cores: without OMP_NUM_THREADS each takes cores / processes-per-node threads.
"""

import os
import pickle
import re
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from ds_mlm import errors
from ds_mlm.args import DISTRIBUTED_TIMEOUT_MINUTES
from ds_mlm.errors import UserError
from ds_mlm.peers import Peers

DEFAULT_PORT = "29500"  # torch's and DeepSpeed's default: the same on every node without being told
JOB_SCHEDULER_ENV = {  # name: (rank, world size, local rank, local world size) variables of each process
    "OpenMPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MVAPICH": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    "MPICH/Intel MPI": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "Slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None),  # STEP_: only inside an srun step
}


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job, and the job's collectives (each a no-op in a world without a process
    group). It is the one distributed helper: passed to whatever needs to talk to the other ranks."""

    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank of this process on its node."""
    local_world_size: int
    """Number of processes on this node."""

    @property
    def first_rank_on_node(self) -> int:
        return self.rank - self.local_rank  # launchers number the processes of a node contiguously

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes shared files and tells the story."""
        return self.rank == 0

    def barrier(self) -> None:
        barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        return all_gather_object(obj)

    def all_reduce(self, tensor, op: str = "sum"):
        """In place, over every rank (`op`: sum or max); returns the tensor."""
        return all_reduce(tensor, op)

    def decide(self, fn, *args, **kwargs):
        """Run `fn` on rank 0 only and give its result to every rank; a UserError it raises is raised on every rank
        (so a refusal is one line from each process, not rank 0's line and the others' lost-peer errors). The others
        wait through the store, not in a collective: however long `fn` takes, no timeout fires while rank 0 lives."""
        return decide(fn, *args, **kwargs)


def _slurm_tasks_on_this_node() -> int:
    """This node's entry of SLURM_STEP_TASKS_PER_NODE, which reads like "4(x2),3" (4, 4, 3 tasks)."""
    counts = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", os.environ.get("SLURM_STEP_TASKS_PER_NODE", "")):
        counts += [int(count)] * int(repeat or 1)
    node = int(os.environ.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else 1


def _scheduler_ranks():
    """(scheduler name, rank, world size, local rank, local world size) from mpirun's or srun's variables, or None."""
    for name, keys in JOB_SCHEDULER_ENV.items():
        if all(k in os.environ for k in keys if k is not None):
            rank, world, local = (int(os.environ[k]) for k in keys[:3])
            local_world = int(os.environ[keys[3]]) if keys[3] else _slurm_tasks_on_this_node()
            return name, rank, world, local, local_world
    return None


def env_info() -> DistInfo:
    """What the launcher told this process (a world of one when there is no launcher)."""
    if "RANK" not in os.environ and (found := _scheduler_ranks()) is not None:
        return DistInfo(*found[1:])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), local_world_size=local_world)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_rendezvous_env() -> None:
    """Make RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT describe this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return  # a torch-style launcher said it all
    found = _scheduler_ranks()
    if found is None:  # no launcher: a world of one
        for key in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(key, "0")
        for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            os.environ.setdefault(key, "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        return
    name, rank, world, local, local_world = found
    if world > 1 and "MASTER_ADDR" not in os.environ:
        raise UserError(f"started by {name} without MASTER_ADDR: export MASTER_ADDR=the address of rank 0's node "
                        "(and MASTER_PORT, default 29500) to every process, e.g. through launch.sh")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(local_world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", DEFAULT_PORT)


def share_cores(local_world_size: int) -> None:
    """Give this process its share of the node's cores, unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" in os.environ or local_world_size <= 1:
        return
    torch.set_num_threads(max(len(os.sched_getaffinity(0)) // local_world_size, 1))  # else each takes every core


def init(timeout_minutes: float = DISTRIBUTED_TIMEOUT_MINUTES) -> DistInfo:
    """Join the process group through DeepSpeed (any accelerator), once; a collective or store call that waits on a
    peer longer than `timeout_minutes` fails, and the line printed for it names the peer that stopped answering."""
    global _peers
    fill_rendezvous_env()
    share_cores(env_info().local_world_size)
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # say it, rather than let DeepSpeed guess (and warn) on every rank
    import deepspeed  # imported here: building a dataset must not pay for it
    import deepspeed.ops

    # The shm all-reduce extension is only for inference, costs a 30-40 s compile, and leaks 66 MiB per rank in
    # /dev/shm under the launcher (shared/notes/deepspeed-on-cpu.md): training never needs it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        # A rank waiting for its peers in the rendezvous sits in C++, where no Python handler runs: let a signal
        # end it at once (there is nothing to save yet) instead of waiting for the launcher's SIGKILL.
        handlers = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            deepspeed.init_distributed(dist_init_required=True, verbose=False,
                                       timeout=timedelta(minutes=timeout_minutes))
        except RuntimeError as e:  # torch's DistNetworkError is one
            if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
                raise UserError(f"MASTER_PORT {os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')} is "
                                f"already in use (another job, or one that has not finished exiting): give another "
                                f"port, e.g. MASTER_PORT={free_port()} (launcher: --master_port)") from None
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    # DeepSpeed's own groups (ZeRO's data-parallel group...) are made by new_group() without a timeout: torch gives
    # them its default (30 min for gloo), read from these module globals at each call. Make theirs ours.
    torch.distributed.distributed_c10d.default_pg_timeout = timedelta(minutes=timeout_minutes)
    torch.distributed.distributed_c10d.default_pg_nccl_timeout = timedelta(minutes=timeout_minutes)
    if _peers is None and job_store() is not None:
        info = env_info()
        _peers = Peers(job_store(), info.rank, info.world_size, timeout_minutes * 60).start()
        errors.lost_peer_hint = _peers.describe_lost  # the lost-peer line names who stopped answering
    return env_info()


_peers = None
LINGER_SECONDS = 10.0  # rank 0 after a loss: how long the other survivors get to read its word on who was lost


def decide(fn, *args, **kwargs):
    """DistInfo.decide (which see), for callers without a DistInfo."""
    outcome = None
    if not initialized() or torch.distributed.get_rank() == 0:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except UserError as e:
            outcome = ("error", str(e))
    if _peers is not None:
        name = _peers.unique("decide")
        if _peers.rank == 0:
            _peers.put(name, outcome)
        else:
            outcome = pickle.loads(_peers.wait(name, f"rank 0 to run {getattr(fn, '__name__', 'a step')}"))
    elif initialized():
        outcome = all_gather_object(outcome)[0]
    kind, value = outcome
    if kind == "error":
        raise UserError(value)
    return value


def gather_from(name: str, value, senders, what: str) -> dict:
    """{rank: value} of the ranks in `senders`, waited for through the store (see peers.py): for work that only
    those ranks do, which the others must not wait for inside a collective."""
    if _peers is not None:
        return _peers.gather(name, value, list(senders), what)
    return {r: v for r, v in enumerate(all_gather_object(value)) if r in set(senders)}


def watcher(ranks):
    """check(what): raises PeerLost naming a rank of `ranks` whose heartbeat stopped (a no-op without a store)."""
    return _peers.watching(ranks) if _peers is not None else (lambda what: None)


def wait_all(name: str, what: str) -> None:
    """Every rank got here (a barrier through the store: it waits as long as every rank keeps answering)."""
    if _peers is not None:
        _peers.barrier(name, what)
    else:
        barrier()


def shutdown() -> None:
    """Leave the process group once every rank is done: a process that exits with it alive can die in C++
    ("terminate called without an active exception") after its work is complete."""
    if initialized():
        torch.distributed.barrier()
        _forget_peers()
        torch.distributed.destroy_process_group()


def _forget_peers() -> None:
    """Stop the heartbeat and drop its store: a store kept alive past the group (rank 0 serves it from a C++ thread)
    ends the process in C++ at exit; a later init (a library caller's next run) starts its own, on its own store."""
    global _peers
    if _peers is not None:
        _peers.stop()
        _peers = errors.lost_peer_hint = None


def leave(error: Optional[BaseException] = None) -> None:
    """Leave the process group without waiting for the others: on an error, which the other ranks may not share (a
    barrier could wait forever), but without exiting with the group alive (which can end the process in C++ with
    another status than the error's). For a lost peer, who stopped answering is asked before the store goes; rank 0,
    whose process serves the store, then keeps it up (bounded) until the other survivors have read its word."""
    said = None
    if error is not None and errors.is_peer_loss(error) and errors.lost_peer_hint is not None:
        said = errors.lost_peer_hint()
    if said and _peers is not None:
        _peers.linger(LINGER_SECONDS)  # rank 0, which published `said`; the others go on at once
    _forget_peers()
    if said is not None:
        errors.lost_peer_hint = lambda: said
    if initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 (leaving anyway; the error being reported is what matters)
            pass


def initialized() -> bool:
    """Is there a process group to talk to?"""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()


def job_store():
    """The job's key-value store (the rendezvous store every rank is connected to), or None without a process group.

    It lives in rank 0's process (in the launcher's agent under torchrun): when that dies, every call on it fails."""
    if not initialized():
        return None
    return torch.distributed.distributed_c10d._get_default_store()  # no public accessor in torch 2.13


def all_reduce(tensor, op: str = "sum"):
    """In place, over every rank (`op`: sum or max; nothing to do without a process group); returns the tensor."""
    if initialized():
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(tensor, op=ops[op])
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (just `[obj]` without a process group)."""
    if not initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
