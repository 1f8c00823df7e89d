"""Activations between neighbouring stages: tensors of any shape and dtype, or tuples of them.

The first message of a step carries a header (status, then dtype code, rank and shape of each
tensor), so shapes are learned at run time; gradients flow back with the shapes sent forward.
Sends are non-blocking (a stage never waits for its neighbour to take a message). Receives are
posted ahead of need, so a message lands while the stage computes; taking one waits, bounded by
the process group's timeout.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from plait.distributed.comm import wait
from plait.errors import PlaitError
from plait.observe.timing import span

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
HEADER_WORDS = 64
OK, FAILED = 0, 1

Spec = tuple[torch.dtype, tuple[int, ...]]


def encode_header(tensors: tuple[torch.Tensor, ...], status: int = OK) -> torch.Tensor:
    words = [status, len(tensors)]
    for t in tensors:
        if t.dtype not in DTYPES:
            raise PlaitError(f"pipeline: cannot send activations of dtype {t.dtype}")
        words += [DTYPES.index(t.dtype), t.dim(), *t.shape]
    if len(words) > HEADER_WORDS:
        raise PlaitError(f"pipeline: activation shapes too large to describe ({len(words)} > {HEADER_WORDS} words)")
    return torch.tensor(words + [0] * (HEADER_WORDS - len(words)), dtype=torch.int64)


def decode_header(header: torch.Tensor) -> tuple[int, list[Spec]]:
    words = header.tolist()
    status, count, i, specs = words[0], words[1], 2, []
    for _ in range(count):
        dtype, ndim = DTYPES[words[i]], words[i + 1]
        specs.append((dtype, tuple(words[i + 2 : i + 2 + ndim])))
        i += 2 + ndim
    return status, specs


class Link:
    """The channel to one neighbouring stage (a global rank), on the pipeline group."""

    def __init__(self, peer: int, group: dist.ProcessGroup, device: torch.device, what: str):
        self.peer, self.group, self.device, self.what = peer, group, device, what
        self.pending: list[dist.Work] = []
        self.posted: deque[list[tuple[torch.Tensor, dist.Work]]] = deque()

    def send(self, tensors: tuple[torch.Tensor, ...], header: torch.Tensor | None = None) -> None:
        with span("comm", f"pipeline send to rank {self.peer} ({self.what})"):  # posting costs this thread
            if header is not None:
                self.pending.append(dist.isend(header.to(self.device), self.peer, group=self.group))
            for t in tensors:
                self.pending.append(dist.isend(t.detach().contiguous(), self.peer, group=self.group))

    def recv_header(self) -> tuple[int, list[Spec]]:
        what = f"pipeline receive from rank {self.peer} ({self.what})"
        with span("bubble", what):  # posting the receive waits for the peer too
            header = torch.empty(HEADER_WORDS, dtype=torch.int64, device=self.device)
            wait(dist.irecv(header, self.peer, group=self.group), what, self.group, "bubble")
        return decode_header(header.cpu())

    def post(self, specs: list[Spec]) -> None:
        """Post the receive of the next message now, so it lands while this stage computes."""
        with span("comm", f"pipeline receive from rank {self.peer} posted ({self.what})"):
            buffers = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in specs]
            self.posted.append([(t, dist.irecv(t, self.peer, group=self.group)) for t in buffers])

    def take(self) -> tuple[torch.Tensor, ...]:
        """The oldest posted message (messages on a link arrive in the order they were sent)."""
        for _, work in self.posted[0]:
            wait(work, f"pipeline receive from rank {self.peer} ({self.what})", self.group, "bubble")
        return tuple(t for t, _ in self.posted.popleft())

    def recv(self, specs: list[Spec]) -> tuple[torch.Tensor, ...]:
        self.post(specs)
        return self.take()

    def flush(self) -> None:
        """Wait until every message sent so far has left (before its buffers may be reused)."""
        for work in self.pending:
            wait(work, f"pipeline send to rank {self.peer} ({self.what})", self.group, "bubble")
        self.pending.clear()
