"""Data-parallel runs with PyTorch's own distributed stack.

``torchrun`` (one node or many) and SLURM's ``srun`` start one process per device and tell
each its place through environment variables; :func:`environment` reads them and
:func:`init_process_group` joins the default process group (NCCL on GPU, gloo on CPU) with a
timeout, so a rank that dies ends the others with an error instead of a hang. The helpers
below are what the commands need on top: which rank writes, how a dataset is split across
ranks, how per-rank results come back to rank 0, and leaving the group at the end.

Training under DDP is :mod:`instseg.engine.trainer`'s; distributed evaluation is
:func:`instseg.engine.inference.evaluate_model` (it shards the images and scores on rank 0);
the CPU-capable SyncBN is :class:`instseg.layers.norm.SyncBatchNorm2d`.
"""

from __future__ import annotations

import datetime
import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import DistributedError

T = TypeVar("T")
# How long a collective waits for the other ranks before failing (seconds).
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a multi-process launch."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" or "slurm"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError as exc:
        raise DistributedError(
            f"environment variable {key}={environ[key]!r} is not an integer"
        ) from exc


# Per launcher: the variables of the rank, the world size and the rank on its node.
_LAUNCH_VARIABLES = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
}


def environment(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """The launch this process belongs to, or None for a plain single-process run.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address);
    under SLURM (``srun`` without torchrun) ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` and
    ``SLURM_LOCALID`` give the same, and ``MASTER_ADDR`` / ``MASTER_PORT`` must name the
    rendezvous (the sbatch script sets them). The step's task count, which only ``srun``
    sets, is read rather than ``SLURM_NTASKS``, so a plain ``python`` in an sbatch script
    of several tasks stays a single-process run. A world of one is a single-process run.
    """
    environ = os.environ if environ is None else environ
    for launcher, (rank_key, world_key, local_key) in _LAUNCH_VARIABLES.items():
        if rank_key in environ and world_key in environ:
            local = _int(environ, local_key) if local_key in environ else 0
            env = DistEnv(_int(environ, rank_key), _int(environ, world_key), local, launcher)
            break
    else:
        return None
    if launcher == "slurm" and env.world_size > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in environ]
        if missing:
            raise DistributedError(
                f"SLURM launch of {env.world_size} tasks without {' and '.join(missing)}: "
                "export the rendezvous address in the sbatch script"
            )
    if not 0 <= env.rank < env.world_size:
        raise DistributedError(f"rank {env.rank} is outside a world of {env.world_size}")
    return env if env.world_size > 1 else None


def init_process_group(
    env: DistEnv, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Join the default process group of ``env``: NCCL for CUDA devices, gloo otherwise;
    collectives fail after ``timeout_s`` seconds instead of hanging on a dead rank.

    ``torch._dynamo`` is imported first. DDP imports it, and an import made while the
    default group exists keeps about ten references to the group for good, so that
    :func:`leave_process_group` cannot free it: gloo's worker threads then live into
    interpreter shutdown, where one still releasing the last collective's tensors (which
    takes the GIL) aborts the process ("terminate called without an active exception",
    seen under load after a NaN stop). Imported before, it holds none, and leaving the
    group joins the threads.
    """
    if dist.is_initialized():
        return
    importlib.import_module("torch._dynamo")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th item from ``rank`` on, so
    shares differ in size by at most one and their union is ``items``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return list(items[rank::world_size])


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere; ``[obj]`` without a
    process group. Objects are pickled (gloo and NCCL alike)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Leave the default process group (at the end of a command), if joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
