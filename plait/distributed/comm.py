"""Small helpers around torch.distributed collectives: flat buffers and errors that name ranks."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from plait.errors import CommError
from plait.observe.timing import span


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``group`` (the world when None)."""
    return dist.get_process_group_ranks(group or dist.group.WORLD)


def silent_peers(group: dist.ProcessGroup | None = None, grace_s: float = 1.0) -> list[int] | None:
    """After a failed collective: which peers of ``group`` do not answer within ``grace_s``?

    Each surviving rank posts a mark in the rendezvous store and looks for its peers' marks;
    a stalled or dead peer posts none. None when the store cannot be reached either.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        me = dist.get_rank()
        store.set(f"plait/alive/{me}", str(time.time()))
        peers = [r for r in group_ranks(group) if r != me]
        deadline = time.monotonic() + grace_s
        while True:
            silent = [r for r in peers if not _recent(store, r, grace_s)]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.05)
    except Exception:  # the store lived in a dead peer, or is gone with the group
        return None


def _recent(store, rank: int, grace_s: float) -> bool:
    key = f"plait/alive/{rank}"
    if not store.check([key]):
        return False
    return time.time() - float(store.get(key)) < 4 * grace_s


def describe_failure(what: str, group, exc: BaseException) -> str:
    silent = silent_peers(group)
    if silent:
        who = f"no answer from rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} (stalled or dead)"
    elif silent is None:
        who = f"the peers {group_ranks(group)} and the rendezvous store are unreachable"
    else:
        who = f"peers {group_ranks(group)} answer but the operation failed"
    return f"rank {dist.get_rank()}: {what} failed: {who}: {str(exc).splitlines()[0][:200]}"


def wait(work: dist.Work, what: str, group: dist.ProcessGroup | None = None, category: str = "comm") -> None:
    """Wait for an async op; a timeout or a dead peer becomes a CommError naming this rank,
    the operation, and the peer that did not answer.

    The wait is bounded by the process group's timeout (``dist.timeout`` in the config). The time
    blocked here is communication that was not hidden: it goes to ``category`` of the active
    ``plait.observe.timing`` recorder (pipeline stages waiting on a neighbour say ``"bubble"``).
    """
    try:
        with span(category, what):
            work.wait()
    except RuntimeError as exc:
        raise CommError(describe_failure(what, group, exc)) from None


def barrier(what: str, group=None) -> None:
    """A barrier whose failure names rank, operation and silent peer."""
    wait(dist.barrier(group=group, async_op=True), what, group)


def all_reduce(tensor: torch.Tensor, what: str, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A blocking all-reduce whose failure names rank, operation and silent peer."""
    wait(dist.all_reduce(tensor, op=op, group=group, async_op=True), what, group)
    return tensor


# torch 2.13 renamed the flat all-gather; keep working on the >= 2.4 range pyproject allows.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False):
    """Gather ``tensor`` from every rank of ``group`` into ``output`` ([world * n]), in rank order."""
    return _all_gather_flat(output, tensor, group=group, async_op=async_op)


_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def reduce_scatter_flat(output: torch.Tensor, tensor: torch.Tensor, group=None, async_op: bool = False):
    """Sum ``tensor`` ([world * n]) over ``group``; rank r keeps elements [r*n, (r+1)*n) in ``output``."""
    return _reduce_scatter_flat(output, tensor, group=group, async_op=async_op)


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


def data_bytes(obj) -> torch.Tensor:
    """``obj`` (plain data: None, booleans, numbers, strings, lists, dicts with string keys) as
    JSON bytes in a uint8 tensor: what a peer may be sent instead of a pickle."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def from_data_bytes(t: torch.Tensor):
    """The inverse of ``data_bytes`` (tuples come back as lists): nothing in it can run code."""
    return json.loads(bytes(t.cpu().tolist()))


def _group_device(group) -> torch.device:
    """Where a collective of ``group`` takes its tensors: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_ragged(tensor: torch.Tensor, what: str, group=None) -> list[torch.Tensor]:
    """Every rank's 1-D ``tensor`` (lengths may differ, dtypes must agree), in rank order, on
    the CPU: the lengths go first, then every rank's tensor padded to the longest."""
    device = _group_device(group)
    world = dist.get_world_size(group)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    wait(all_gather_flat(sizes, torch.tensor([tensor.numel()], device=device), group, async_op=True), what, group)
    longest = int(sizes.max())
    padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
    padded[: tensor.numel()] = tensor.reshape(-1)
    rows = torch.empty(world * longest, dtype=tensor.dtype, device=device)
    wait(all_gather_flat(rows, padded, group, async_op=True), what, group)
    rows = rows.view(world, longest).cpu()
    return [rows[r, : int(n)] for r, n in enumerate(sizes.tolist())]


def all_gather_data(obj, what: str, group=None) -> list:
    """Every rank's ``obj``, in rank order, sent as ``data_bytes``. Unlike ``all_gather_object``,
    which unpickles whatever a peer sends, nothing received can run code."""
    return [from_data_bytes(t) for t in all_gather_ragged(data_bytes(obj), what, group)]
