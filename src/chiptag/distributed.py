"""torch.distributed for `torchrun --nproc_per_node K chiptag train ...` (one node or many).

What runs where:
  - every rank loads the labels and computes the same seeded split;
  - extraction is sharded: rank r extracts images r, r+K, r+2K, ... and the features are gathered, so each
    rank holds all of them; rank 0 writes the cache file;
  - the head phase on cached features is tiny and runs identically (same seed, same data) on every rank;
  - end-to-end phases train a DistributedDataParallel model; each rank sees its DistributedSampler shard of
    training.batch_size / K images per step, so the global batch (and the result) matches one process;
  - only rank 0 writes the run dir and talks to the tracker; the others use a scratch dir and stay quiet.
Without torchrun (no WORLD_SIZE in the environment) all of this reduces to a single process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup() -> torch.device | None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); -> this rank's device, or None
    when not launched by torchrun. CPU threads are split between the ranks of a node."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return torch.device("cpu")


def shard_extract(extract: Callable[[list], torch.Tensor], paths) -> torch.Tensor:
    """extract(paths) -> (N, dim) over this rank's strided shard, gathered back into the original order on
    every rank."""
    if not active():
        return extract(list(paths))
    k, r = world(), rank()
    mine = extract(list(paths)[r::k])
    parts: list = [None] * k
    dist.all_gather_object(parts, mine.cpu())  # gloo and nccl both take objects; features are small
    dim = next(p.shape[1] for p in parts if p.numel())
    out = torch.empty(len(paths), dim, dtype=parts[0].dtype)
    for i, p in enumerate(parts):
        out[i::k] = p
    return out


def mean(value: float) -> float:
    """The mean of a number over ranks (a per-rank training loss -> the global one; shards are equal)."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when distributed (frozen parameters are skipped by DDP itself)."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def scratch_dir() -> Path:
    """Where a non-zero rank writes what rank 0 keeps (checkpoint, summary): thrown away."""
    return Path(tempfile.mkdtemp(prefix=f"chiptag-rank{rank()}-"))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
