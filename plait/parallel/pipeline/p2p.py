"""Activations between neighbouring stages: tensors of any shape and dtype, or tuples of them.

The first message of a step from each chunk carries a header (status, then dtype code, rank and
shape of each tensor), so shapes are learned at run time; gradients flow back with the shapes
sent forward. From the second step on, the receiver posts the first activations' receive with
the shapes of the step before, beside the header's, instead of after reading it (a receive posted
only then cost two transport round trips on busy cores, 3-4 ms of a 60 ms step, all of it
bubble); a sender whose shapes changed first sends a filler of the old shapes into it. Sends
are non-blocking (a stage never waits for its neighbour to take a message). In a step, a stage
knows from the schedule every message each neighbour will send it, in the order it sends them
(``Link.expect``); it posts the receives in that order, each as soon as its shape is known, so a
message lands while the stage computes, and messages of either direction and any chunk share
one link without tags (so the same runs on gloo and NCCL). Taking one waits, bounded by the
process group's timeout.
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


def spec_of(tensors) -> list[Spec]:
    return [(t.dtype, tuple(t.shape)) for t in tensors]


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
        self.sent: dict[int, list[Spec]] = {}  # chunk -> the shapes of its first activations sent last step
        self.predicted: dict[int, list[Spec]] = {}  # chunk -> those received last step: the peer's ``sent``
        self.speculative: int | None = None  # the chunk whose first activations are posted as predicted,
        # unconfirmed: nothing is posted after them until its header is read, so there is one at most

    def _what(self, kind: str) -> str:
        return f"rank {self.peer} ({'gradients' if kind == 'G' else 'activations'})"

    def send(self, tensors: tuple[torch.Tensor, ...], header: torch.Tensor | None = None,
             kind: str = "A") -> None:
        with span("comm", f"pipeline send to {self._what(kind)}"):  # posting costs this thread
            if header is not None:
                self.pending.append(dist.isend(header.to(self.device), self.peer, group=self.group))
            for t in tensors:
                self.pending.append(dist.isend(t.detach().contiguous(), self.peer, group=self.group))

    def send_first(self, tensors: tuple[torch.Tensor, ...], chunk: int) -> None:
        """A step's first activations from ``chunk``, after their header. The peer has posted a
        receive of the shapes sent last step (``predicted``): when these differ, a filler of
        those shapes goes first into it."""
        specs = spec_of(tensors)
        last, self.sent[chunk] = self.sent.get(chunk), specs
        filler = () if last in (None, specs) else \
            tuple(torch.zeros(shape, dtype=dtype, device=self.device) for dtype, shape in last)
        self.send(filler + tuple(tensors), encode_header(tensors))

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
        """Post the receives of the next messages, in order, as far as their shapes are known
        (a chunk's first activations as predicted: then nothing after them until confirmed, for
        a filler may come first)."""
        while self.next < len(self.order) and self.speculative is None:
            key = self.order[self.next]
            kind, chunk, i = key
            specs = [(torch.int64, (HEADER_WORDS,))] if kind == "H" else \
                self.specs.get(("A", chunk) if kind == "A" else key)
            if specs is None and kind == "A" and i == 0 and chunk in self.predicted:
                specs = self.predicted[chunk]
                self.speculative = chunk
            if specs is None:
                return
            with span("comm", f"pipeline receive from {self._what(kind)} posted"):
                self.posted[key] = self._irecv(specs)
            self.next += 1

    def _confirm(self, chunk: int) -> None:
        """Read ``chunk``'s header: its activations' shapes, and post what they let post."""
        status, specs = decode_header(self._wait(("H", chunk, 0))[0].cpu())
        if status != OK:
            raise PlaitError(f"pipeline: rank {self.peer} failed; see its error")
        self.specs[("A", chunk)] = self.predicted[chunk] = specs
        if chunk == self.speculative:
            self.speculative = None
            if spec_of(t for t, _ in self.posted[("A", chunk, 0)]) != specs:  # it takes the filler;
                self._wait(("A", chunk, 0))  # nothing was posted after it: the real one is next
                self.posted[("A", chunk, 0)] = self._irecv(specs)
        self._post_known()

    def _wait(self, key: Key) -> tuple[torch.Tensor, ...]:
        return self._waited(self.posted.pop(key), key[0])

    def take(self, key: Key) -> tuple[torch.Tensor, ...]:
        """Message ``key``, waiting for it. Where its receive is not posted yet, the headers
        before it are (the peer sent them first): they are read, and what they describe posted."""
        if key[0] == "A" and key[1] == self.speculative:
            self._confirm(key[1])
        while key not in self.posted:
            if self.next == len(self.order) or key not in self.order[self.next:]:
                raise PlaitError(f"pipeline: no message {key} from rank {self.peer} in this step's schedule")
            kind, chunk, _ = self.order[self.next]
            if self.speculative is not None:
                chunk = self.speculative
            elif kind != "A" or ("H", chunk, 0) not in self.posted:
                raise PlaitError(f"pipeline: message {key} from rank {self.peer} is taken before "
                                 f"{self.order[self.next]}, whose shape is not known yet")
            self._confirm(chunk)
        return self._wait(key)

    def flush(self) -> None:
        """Wait until every message sent so far has left (before its buffers may be reused)."""
        for work in self.pending:
            wait(work, f"pipeline send to rank {self.peer}", self.group, "bubble")
        self.pending.clear()
