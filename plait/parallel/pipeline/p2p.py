"""Activations between neighbouring stages: tensors of any shape and dtype, or tuples of them.

The first message of a step from each chunk carries a header (status, then dtype code, rank and
shape of each tensor), so shapes are learned at run time; gradients flow back with the shapes
sent forward. Sends are non-blocking (a stage never waits for its neighbour to take a message).
In a step, a stage knows from the schedule every message each neighbour will send it, in the
order it sends them (``Link.expect``); it posts the receives in that order, each as soon as its
shape is known, so a message lands while the stage computes, and messages of either direction
and any chunk share one link without tags (so the same runs on gloo and NCCL). Taking one
waits, bounded by the process group's timeout.
"""

from __future__ import annotations


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


Key = tuple[str, int, int]
"""A message of a step: ("H", chunk, 0) the header of a chunk's activations, ("A", chunk, i) the
activations of micro-batch i into ``chunk``, ("G", chunk, i) the gradient of its output."""


class Link:
    """The channel to one neighbouring stage (a global rank), on the pipeline group."""

    def __init__(self, peer: int, group: dist.ProcessGroup, device: torch.device):
        self.peer, self.group, self.device = peer, group, device
        self.pending: list[dist.Work] = []
        self.order: list[Key] = []  # what the peer sends this step, in its order
        self.next = 0  # the first of them not yet posted
        self.specs: dict = {}  # ("A", chunk) or ("G", chunk, i) -> the shapes of that message
        self.posted: dict[Key, list[tuple[torch.Tensor, dist.Work]]] = {}

    def _what(self, kind: str) -> str:
        return f"rank {self.peer} ({'gradients' if kind == 'G' else 'activations'})"

    def send(self, tensors: tuple[torch.Tensor, ...], header: torch.Tensor | None = None,
             kind: str = "A") -> None:
        with span("comm", f"pipeline send to {self._what(kind)}"):  # posting costs this thread
            if header is not None:
                self.pending.append(dist.isend(header.to(self.device), self.peer, group=self.group))
            for t in tensors:
                self.pending.append(dist.isend(t.detach().contiguous(), self.peer, group=self.group))

    # -- outside a step (checking the cut, inference): activations only, taken as they come --
    def recv_header(self) -> tuple[int, list[Spec]]:
        what = f"pipeline receive from {self._what('A')}"
        with span("bubble", what):  # posting the receive waits for the peer too
            header = torch.empty(HEADER_WORDS, dtype=torch.int64, device=self.device)
            wait(dist.irecv(header, self.peer, group=self.group), what, self.group, "bubble")
        return decode_header(header.cpu())

    def recv(self, specs: list[Spec]) -> tuple[torch.Tensor, ...]:
        return self._waited(self._irecv(specs), "A")

    def _irecv(self, specs: list[Spec]) -> list[tuple[torch.Tensor, dist.Work]]:
        """Post the receive of one message: a buffer of each shape, and its pending work."""
        buffers = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in specs]
        return [(t, dist.irecv(t, self.peer, group=self.group)) for t in buffers]

    def _waited(self, posted: list[tuple[torch.Tensor, dist.Work]], kind: str) -> tuple[torch.Tensor, ...]:
        for _, work in posted:
            wait(work, f"pipeline receive from {self._what(kind)}", self.group, "bubble")
        return tuple(t for t, _ in posted)

    # -- in a step ------------------------------------------------------------------------
    def expect(self, order: list[Key]) -> None:
        """The messages the peer will send this step, in its order; headers are posted now."""
        if self.posted or self.next < len(self.order):
            raise PlaitError(f"pipeline: {len(self.order) - self.next + len(self.posted)} messages from rank "
                             f"{self.peer} were never taken in the last step")
        self.order, self.next, self.specs = order, 0, {}
        self._post_known()

    def known(self, key: Key, specs: list[Spec]) -> None:
        """The shapes of message ``key`` (a gradient's: those of the output sent for it)."""
        self.specs[key] = specs
        self._post_known()

    def _post_known(self) -> None:
        """Post the receives of the next messages, in order, as far as their shapes are known."""
        while self.next < len(self.order):
            key = self.order[self.next]
            kind, chunk, _ = key
            specs = [(torch.int64, (HEADER_WORDS,))] if kind == "H" else \
                self.specs.get(("A", chunk) if kind == "A" else key)
            if specs is None:
                return
            with span("comm", f"pipeline receive from {self._what(kind)} posted"):
                self.posted[key] = self._irecv(specs)
            self.next += 1

    def _wait(self, key: Key) -> tuple[torch.Tensor, ...]:
        return self._waited(self.posted.pop(key), key[0])

    def take(self, key: Key) -> tuple[torch.Tensor, ...]:
        """Message ``key``, waiting for it. Where its receive is not posted yet, the headers
        before it are (the peer sent them first): they are read, and what they describe posted."""
        while key not in self.posted:
            if self.next == len(self.order) or key not in self.order[self.next:]:
                raise PlaitError(f"pipeline: no message {key} from rank {self.peer} in this step's schedule")
            kind, chunk, _ = self.order[self.next]
            if kind != "A" or ("H", chunk, 0) not in self.posted:
                raise PlaitError(f"pipeline: message {key} from rank {self.peer} is taken before "
                                 f"{self.order[self.next]}, whose shape is not known yet")
            status, specs = decode_header(self._wait(("H", chunk, 0))[0].cpu())
            if status != OK:
                raise PlaitError(f"pipeline: rank {self.peer} failed; see its error")
            self.specs[("A", chunk)] = specs
            self._post_known()
        return self._wait(key)

    def flush(self) -> None:
        """Wait until every message sent so far has left (before its buffers may be reused)."""
        for work in self.pending:
            wait(work, f"pipeline send to rank {self.peer}", self.group, "bubble")
        self.pending.clear()
