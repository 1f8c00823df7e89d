"""Small helpers around torch.distributed collectives: flat buffers and errors that name ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from plait.errors import CommError


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``group`` (the world when None)."""
    return dist.get_process_group_ranks(group or dist.group.WORLD)


def wait(work: dist.Work, what: str, group: dist.ProcessGroup | None = None) -> None:
    """Wait for an async op; a timeout or a dead peer becomes a CommError naming this rank.

    The wait is bounded by the process group's timeout (``dist.timeout`` in the config).
    """
    try:
        work.wait()
    except RuntimeError as exc:
        raise CommError(
            f"rank {dist.get_rank()}: {what} failed waiting for peers {group_ranks(group)}: "
            f"{str(exc).splitlines()[0]}"
        ) from None


# torch 2.13 renamed the flat all-gather; keep working on the >= 2.4 range pyproject allows.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False):
    """Gather ``tensor`` from every rank of ``group`` into ``output`` ([world * n]), in rank order."""
    return _all_gather_flat(output, tensor, group=group, async_op=async_op)


def broadcast_tensors(tensors: Sequence[torch.Tensor], src_group_rank: int, group=None) -> None:
    """Broadcast ``tensors`` in place from the group's rank ``src_group_rank``, one message per dtype."""
    src = dist.get_global_rank(group or dist.group.WORLD, src_group_rank)
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for same in by_kind.values():
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        wait(dist.broadcast(flat, src=src, group=group, async_op=True), "initial broadcast", group)
        offset = 0
        for t in same:
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
