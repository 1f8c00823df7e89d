"""Prove that replicas agree: a bitwise fingerprint of every tensor, compared across ranks."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import PlaitError


def _fingerprint(t: torch.Tensor) -> int:
    # Hash a copy: .numpy() on the tensor itself would pin its storage (ZeRO-3 frees and regrows it).
    data = t.detach().reshape(-1).view(torch.uint8).cpu().clone().numpy()
    return zlib.crc32(data)


def check_consistency(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Raise on every rank if any parameter or buffer differs (bitwise) from the group's rank 0.

    The message names the first differing tensor and the rank that holds a different copy.
    """
    named = list(module.named_parameters()) + list(module.named_buffers())
    device = named[0][1].device if named else torch.device("cpu")
    prints = torch.tensor([_fingerprint(t) for _, t in named], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(prints) for _ in range(world)]
    dist.all_gather(gathered, prints, group=group)
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    for r in range(1, world):
        differ = torch.nonzero(gathered[r] != gathered[0]).flatten().tolist()
        if differ:
            more = f" (and {len(differ) - 1} more tensors)" if len(differ) > 1 else ""
            raise PlaitError(
                f"replicas differ: {named[differ[0]][0]!r} on rank {ranks[r]} is not bitwise equal "
                f"to rank {ranks[0]}'s{more}"
            )
