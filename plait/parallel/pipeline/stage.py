"""One pipeline stage: runs a schedule's actions, exchanging activations with its neighbours.

    stage = PipelineStage(StageModule(blocks), stage=mesh.coord("pp"), stages=mesh.size("pp"),
                          group=mesh.group("pp"), loss_fn=loss_fn)
    loss = stage.step(inputs, targets, microbatches=4, schedule="1f1b")   # loss on the last stage

With v chunks per stage (interleaved schedules), ``module`` is a list of v modules: chunk c is
piece c * stages + stage of a model cut into stages * v pieces, so the activations go round the
stages v times, the last stage sending chunk c's output to the first stage's chunk c + 1.
"""

from __future__ import annotations

import socket
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.comm import all_gather_data
from plait.errors import PlaitError
from plait.observe.timing import span
from plait.parallel.pipeline.p2p import FAILED, OK, Key, Link, encode_header, spec_of
from plait.parallel.pipeline.schedules import SCHEDULES
from plait.parallel.pipeline.split import WeightGradients, backward_input
from plait.parallel.pipeline.trace import aligned


def _as_tuple(x) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


class PipelineStage:
    """Stage ``stage`` of ``stages`` on the pipeline ``group``.

    Args:
        module: this stage's blocks (a ``StageModule``), or a ``DataParallel`` around them; then
            gradients are averaged over its group once per step, at the last backward. Or a list
            of such, one per chunk (``v = len(module)`` virtual stages on each stage).
        loss_fn: ``loss_fn(output, target)`` on the last stage, a mean over the micro-batch.
    """

    def __init__(self, module: nn.Module | list[nn.Module], stage: int, stages: int, group: dist.ProcessGroup,
                 loss_fn=None, device: torch.device | None = None, feed_input: bool = False):
        """``feed_input``: every stage's module is called with the micro-batch's input before what
        it received (a ``ModelStage``); then every stage must be given the inputs."""
        self.chunks = list(module) if isinstance(module, (list, tuple)) else [module]
        self.virtual = len(self.chunks)
        self.stage, self.stages, self.group = stage, stages, group
        self.pieces = stages * self.virtual
        self.feed_input = feed_input
        if feed_input and self.virtual > 1:
            raise PlaitError("pipeline: a model that runs its own forward around its blocks holds one chunk per stage")
        self.loss_fn, self.device = loss_fn, device or torch.device("cpu")
        self.first, self.last = stage == 0, stage == stages - 1  # hold the first piece, and the last
        ranks = dist.get_process_group_ranks(group)
        self.links: dict[int, Link] = {}  # stage -> the link to it (one, where before and after are one)
        for c in range(self.virtual):
            for piece in (self._piece(c) - 1, self._piece(c) + 1):
                if 0 <= piece < self.pieces and piece % stages not in self.links:
                    self.links[piece % stages] = Link(ranks[piece % stages], group, self.device)
        self.trace: list[tuple[str, int, float, float, int]] = []  # (kind, micro-batch, start, end, chunk)
        self.max_in_flight = 0
        self._saved: dict[tuple[int, int], tuple] = {}  # (micro-batch, chunk) -> (inputs, outputs), until its W
        self._pending: dict[tuple[int, int], WeightGradients] = {}  # zero-bubble: its W, after its I
        self._params = [[p for p in m.parameters() if p.requires_grad] for m in self.chunks]

    def _piece(self, c: int) -> int:
        return c * self.stages + self.stage

    def _link(self, piece: int) -> Link | None:
        """The link to the stage holding ``piece``; None past either end of the model."""
        return self.links[piece % self.stages] if 0 <= piece < self.pieces else None

    def _messages(self, schedule: str, m: int, sender: int) -> list[Key]:
        """What stage ``sender`` sends this stage in a step of ``schedule``, in its order."""
        out: list[Key] = []
        for kind, i, c in SCHEDULES[schedule](m, self.stages, sender, self.virtual):
            piece = c * self.stages + sender
            to = piece + 1 if kind == "F" else piece - 1 if kind in "BI" else -1
            if not (0 <= to < self.pieces and to % self.stages == self.stage):
                continue
            if kind == "F":
                out += [("H", to // self.stages, 0)] if i == 0 else []
                out.append(("A", to // self.stages, i))
            else:
                out.append(("G", to // self.stages, i))
        return out

    # -- one step -------------------------------------------------------------------------
    def step(self, inputs, targets, microbatches: int, schedule: str = "1f1b", sync: bool = True,
             scale: float = 1.0) -> torch.Tensor | None:
        """Forward and backward of one batch as ``microbatches`` micro-batches; gradients are
        accumulated (mean over the batch, times ``scale``). Returns the mean loss (times ``scale``)
        on the last stage, else None. ``sync=False``: the data-parallel module keeps its
        gradients local (a step accumulated over several batches syncs on its last one)."""
        if schedule not in SCHEDULES:
            raise PlaitError(f"pipeline.schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        xs = _split(inputs, microbatches) if self.first or self.feed_input else [None] * microbatches
        ys = _split(targets, microbatches) if self.last else [None] * microbatches
        try:
            actions = SCHEDULES[schedule](microbatches, self.stages, self.stage, self.virtual)
        except ValueError as exc:
            raise PlaitError(f"pipeline.schedule={schedule!r}: {exc}") from None
        # Each chunk's gradients sync at its last pass that makes them (B, or W).
        last_grads = {a[2]: a for a in actions if a[0] in "BW"}
        for sender, link in self.links.items():
            link.expect(self._messages(schedule, microbatches, sender))
        self.trace, self.max_in_flight, self._losses = [], 0, []
        self.t0 = time.perf_counter()
        # With neighbours, what the schedule does besides compute and communication is its bubble
        # (waiting on them, and the bookkeeping between actions), as measured_bubble counts it.
        with span("bubble", "pipeline schedule") if self.stages > 1 else nullcontext():
            for action in actions:
                kind, i, c = action
                syncs = sync and last_grads[c] == action
                if kind == "F":
                    self._forward(i, c, xs[i], ys[i], scale=scale / microbatches)
                elif kind == "W":
                    self._weights(i, c, sync=syncs)
                else:
                    self._backward(i, c, sync=syncs, split=kind == "I")
            for link in self.links.values():
                link.flush()
        return torch.stack(self._losses).sum() if self.last else None

    def all_traces(self) -> list[list]:
        """Every stage's trace of the last step, in stage order, on one clock where the stages
        share a host (``trace.aligned``); a collective of the stages' group."""
        stamped = (socket.gethostname(), self.t0, self.trace)
        return aligned(all_gather_data(stamped, "gathering the pipeline trace", self.group))

    def _forward(self, i: int, c: int, x, y, scale: float) -> None:
        piece = self._piece(c)
        if piece == 0:
            inputs = _as_tuple(x)
        else:
            received = self._link(piece - 1).take(("A", c, i))
            inputs = tuple(t.requires_grad_(t.is_floating_point()) for t in received)
        start = time.perf_counter()
        end = piece == self.pieces - 1
        with span("forward", self._name("F", i, c)):
            out = _as_tuple(self.chunks[c](*self._call(x, inputs, piece)))
            if end:
                out = (self.loss_fn(out[0] if len(out) == 1 else out, y) * scale,)
                self._losses.append(out[0].detach())
        self.trace.append(("F", i, start - self.t0, time.perf_counter() - self.t0, c))
        if not end:
            link = self._link(piece + 1)
            if i == 0:
                link.send_first(out, c)
            else:
                link.send(out)
            link.known(("G", c, i), spec_of(o for o in out if o.is_floating_point()))
        self._saved[(i, c)] = (inputs, out)
        self.max_in_flight = max(self.max_in_flight, len(self._saved))

    def _name(self, kind: str, i: int, c: int) -> str:
        return f"{kind}{i}" + (f".{c}" if self.virtual > 1 else "")

    def _backward(self, i: int, c: int, sync: bool, split: bool = False) -> None:
        """The backward of micro-batch i on chunk c; ``split``: only its input's gradient
        (zero-bubble's I), its weights' left to ``_weights``."""
        inputs, out = self._saved[(i, c)] if split else self._saved.pop((i, c))
        piece = self._piece(c)
        if piece == self.pieces - 1:
            grads = None
        else:
            grads = self._link(piece + 1).take(("G", c, i))
            out = tuple(o for o in out if o.is_floating_point())
        start = time.perf_counter()
        floats = tuple(t for t in inputs if t.is_floating_point())
        if split:
            with span("backward", self._name("I", i, c)):
                sent, self._pending[(i, c)] = backward_input(out, grads, floats, self._params[c])
        else:
            with span("backward", self._name("B", i, c)), self._syncing(c, sync):
                torch.autograd.backward(out, grads)
            sent = [t.grad for t in floats] if piece else []  # the first piece's input is the data
        self.trace.append(("I" if split else "B", i, start - self.t0, time.perf_counter() - self.t0, c))
        if piece:
            self._link(piece - 1).send(tuple(g if g is not None else torch.zeros_like(t)
                                             for t, g in zip(floats, sent)), kind="G")

    def _weights(self, i: int, c: int, sync: bool) -> None:
        """Zero-bubble's W: the gradient of the weights of micro-batch i, whose I ran before."""
        self._saved.pop((i, c))
        module = self.chunks[c]
        start = time.perf_counter()
        one_backward = getattr(module, "one_backward", None)  # several autograd calls, one backward
        with span("backward", self._name("W", i, c)), self._syncing(c, sync), \
                one_backward() if one_backward else nullcontext():
            self._pending.pop((i, c)).backward(before=getattr(module, "gather_for", None))
        self.trace.append(("W", i, start - self.t0, time.perf_counter() - self.t0, c))

    def _syncing(self, c: int, sync: bool):
        """A context in which a backward leaves chunk c's data-parallel gradients local, unless ``sync``."""
        no_sync = getattr(self.chunks[c], "no_sync", None)
        return no_sync() if (no_sync and not sync) else nullcontext()

    def _call(self, x, received: tuple, piece: int) -> tuple:
        """The module's arguments: what it received (the input itself on the first piece), after
        the micro-batch's input ``x`` where every stage is fed it."""
        return (*_as_tuple(x), *received) if self.feed_input and piece else received

    @torch.no_grad()
    def infer(self, inputs) -> torch.Tensor | None:
        """Forward only, through every stage; the output on the last stage, None elsewhere."""
        for c, module in enumerate(self.chunks):
            piece = self._piece(c)
            if piece == 0:
                xs = _as_tuple(inputs)
            else:
                link = self._link(piece - 1)
                xs = link.recv(link.recv_header()[1])
            out = _as_tuple(module(*self._call(inputs, xs, piece)))
            if piece < self.pieces - 1:
                self._link(piece + 1).send(out, encode_header(out))
        for link in self.links.values():
            link.flush()
        return (out[0] if len(out) == 1 else out) if self.last else None

    # -- checking the cut before training -------------------------------------------------
    @torch.no_grad()
    def check(self, sample_input) -> None:
        """Push one sample through every piece; if a piece cannot take what the previous one
        makes, every stage raises the same error naming it (no stage is left waiting)."""
        error = ""  # this stage's first: "<piece>|<what>", or "upstream"
        for c, module in enumerate(self.chunks):
            piece, out = self._piece(c), ()
            try:
                inputs = _as_tuple(sample_input) if piece == 0 else None
                if piece:
                    link = self._link(piece - 1)
                    status, specs = link.recv_header()
                    inputs = link.recv(specs) if status == OK else None
                    error = error or ("upstream" if status != OK else "")
                if inputs is not None and not error:
                    out = _as_tuple(module(*self._call(sample_input, inputs, piece)))
            except Exception as exc:  # a piece that does not fit the previous one's output
                error = error or f"{piece}|{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if piece < self.pieces - 1:
                ok = not error and out
                self._link(piece + 1).send(out if ok else (), encode_header(out if ok else (), OK if ok else FAILED))
        for link in self.links.values():
            link.flush()
        errors = all_gather_data(error, "pipeline check of the cut", self.group)
        failed = sorted((int(e.split("|")[0]), e.split("|", 1)[1]) for e in errors if e and e != "upstream")
        if failed:
            piece, e = failed[0]
            s = (f"stage {piece}" if self.virtual == 1 else
                 f"piece {piece} (stage {piece % self.stages}, chunk {piece // self.stages})")
            raise PlaitError(f"pipeline: {s} cannot take the output of {'stage' if self.virtual == 1 else 'piece'} "
                             f"{piece - 1}: {e}" if piece else f"pipeline: {s} fails on the input batch: {e}")


def _split(batch, microbatches: int) -> list:
    """Cut a tensor (or tuple of tensors) along dim 0 into equal micro-batches."""
    first = _as_tuple(batch)[0]
    if first.shape[0] % microbatches:
        raise PlaitError(f"pipeline.microbatches={microbatches} does not divide the batch of {first.shape[0]}")
    parts = [t.chunk(microbatches) for t in _as_tuple(batch)]
    return [tuple(p[i] for p in parts) if isinstance(batch, tuple) else parts[0][i] for i in range(microbatches)]
