"""One pipeline stage: runs a schedule's actions, exchanging activations with its neighbours.

    stage = PipelineStage(StageModule(blocks), stage=mesh.coord("pp"), stages=mesh.size("pp"),
                          group=mesh.group("pp"), loss_fn=loss_fn)
    loss = stage.step(inputs, targets, microbatches=4, schedule="1f1b")   # loss on the last stage
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import PlaitError
from plait.observe.timing import span
from plait.parallel.pipeline.p2p import FAILED, OK, Link, Spec, encode_header
from plait.parallel.pipeline.schedules import SCHEDULES
from plait.parallel.pipeline.split import WeightGradients, backward_input


def _as_tuple(x) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


class PipelineStage:
    """Stage ``stage`` of ``stages`` on the pipeline ``group``.

    Args:
        module: this stage's blocks (a ``StageModule``), or a ``DataParallel`` around them; then
            gradients are averaged over its group once per step, at the last backward.
        loss_fn: ``loss_fn(output, target)`` on the last stage, a mean over the micro-batch.
    """

    def __init__(self, module: nn.Module, stage: int, stages: int, group: dist.ProcessGroup,
                 loss_fn=None, device: torch.device | None = None, feed_input: bool = False):
        """``feed_input``: every stage's module is called with the micro-batch's input before what
        it received (a ``ModelStage``); then every stage must be given the inputs."""
        self.module, self.stage, self.stages, self.group = module, stage, stages, group
        self.feed_input = feed_input
        self.loss_fn, self.device = loss_fn, device or torch.device("cpu")
        self.first, self.last = stage == 0, stage == stages - 1
        ranks = dist.get_process_group_ranks(group)
        self.prev = None if self.first else Link(ranks[stage - 1], group, self.device, "activations")
        self.next = None if self.last else Link(ranks[stage + 1], group, self.device, "gradients")
        self.trace: list[tuple[str, int, float, float]] = []  # (kind, micro-batch, start, end)
        self.max_in_flight = 0
        self._saved: dict[int, tuple] = {}  # micro-batch -> (inputs, outputs), until its weights' gradient
        self._pending: dict[int, WeightGradients] = {}  # zero-bubble: micro-batch -> its W, after its I
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._specs: list[Spec] = []

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
        actions = SCHEDULES[schedule](microbatches, self.stages, self.stage)
        last_grads = [a for a in actions if a[0] in "BW"][-1]  # the pass that syncs the gradients
        self.trace, self.max_in_flight, self._losses = [], 0, []
        self.t0 = time.perf_counter()
        self._microbatches = microbatches
        # With neighbours, what the schedule does besides compute and communication is its bubble
        # (waiting on them, and the bookkeeping between actions), as measured_bubble counts it.
        with span("bubble", "pipeline schedule") if self.stages > 1 else nullcontext():
            for kind, i in actions:
                if kind == "F":
                    self._forward(i, xs[i], ys[i], header=i == 0, scale=scale / microbatches)
                elif kind == "W":
                    self._weights(i, sync=sync and (kind, i) == last_grads)
                else:
                    self._backward(i, sync=sync and (kind, i) == last_grads, split=kind == "I")
            for link in (self.prev, self.next):
                if link:
                    link.flush()
        return torch.stack(self._losses).sum() if self.last else None

    def _forward(self, i: int, x, y, header: bool, scale: float) -> None:
        if self.first:
            inputs = _as_tuple(x)
        else:
            if header:  # learn this step's shapes, then post every micro-batch's receive at once
                status, self._specs = self.prev.recv_header()
                if status != OK:
                    raise PlaitError(f"pipeline: stage {self.stage - 1} failed; see its error")
                for _ in range(self._microbatches):
                    self.prev.post(self._specs)
            inputs = tuple(t.requires_grad_(t.is_floating_point()) for t in self.prev.take())
        start = time.perf_counter()
        with span("forward", f"F{i}"):
            out = _as_tuple(self.module(*self._call(x, inputs)))
            if self.last:
                out = (self.loss_fn(out[0] if len(out) == 1 else out, y) * scale,)
                self._losses.append(out[0].detach())
        self.trace.append(("F", i, start - self.t0, time.perf_counter() - self.t0))
        if not self.last:
            self.next.send(out, encode_header(out) if header else None)
            self.next.post([(o.dtype, tuple(o.shape)) for o in out if o.is_floating_point()])  # its gradient
        self._saved[i] = (inputs, out)
        self.max_in_flight = max(self.max_in_flight, len(self._saved))

    def _backward(self, i: int, sync: bool, split: bool = False) -> None:
        """The backward of micro-batch i; ``split``: only its input's gradient (zero-bubble's I),
        its weights' left to ``_weights``."""
        inputs, out = self._saved[i] if split else self._saved.pop(i)
        if self.last:
            grads = None
        else:
            grads = self.next.take()
            out = tuple(o for o in out if o.is_floating_point())
        start = time.perf_counter()
        floats = tuple(t for t in inputs if t.is_floating_point())
        if split:
            with span("backward", f"I{i}"):
                sent, self._pending[i] = backward_input(out, grads, floats, self._params)
        else:
            with span("backward", f"B{i}"), self._syncing(sync):
                torch.autograd.backward(out, grads)
            sent = [t.grad for t in floats]
        self.trace.append(("I" if split else "B", i, start - self.t0, time.perf_counter() - self.t0))
        if not self.first:
            self.prev.send(tuple(g if g is not None else torch.zeros_like(t) for t, g in zip(floats, sent)))

    def _weights(self, i: int, sync: bool) -> None:
        """Zero-bubble's W: the gradient of the weights of micro-batch i, whose I ran before."""
        self._saved.pop(i)
        start = time.perf_counter()
        one_backward = getattr(self.module, "one_backward", None)  # several autograd calls, one backward
        with span("backward", f"W{i}"), self._syncing(sync), one_backward() if one_backward else nullcontext():
            self._pending.pop(i).backward(before=getattr(self.module, "gather_for", None))
        self.trace.append(("W", i, start - self.t0, time.perf_counter() - self.t0))

    def _syncing(self, sync: bool):
        """A context in which a backward leaves the data-parallel module's gradients local, unless ``sync``."""
        no_sync = getattr(self.module, "no_sync", None)
        return no_sync() if (no_sync and not sync) else nullcontext()

    @torch.no_grad()
    def infer(self, inputs) -> torch.Tensor | None:
        """Forward only, through every stage; the output on the last stage, None elsewhere."""
        if self.first:
            xs = _as_tuple(inputs)
        else:
            _, specs = self.prev.recv_header()
            xs = self.prev.recv(specs)
        out = _as_tuple(self.module(*self._call(inputs, xs)))
        if not self.last:
            self.next.send(out, encode_header(out))
            self.next.flush()
            return None
        return out[0] if len(out) == 1 else out

    def _call(self, x, received: tuple) -> tuple:
        """The module's arguments: what it received (the input itself on the first stage), after
        the micro-batch's input ``x`` where every stage is fed it."""
        if self.first:
            return received
        return (*_as_tuple(x), *received) if self.feed_input else received

    # -- checking the cut before training -------------------------------------------------
    @torch.no_grad()
    def check(self, sample_input) -> None:
        """Push one sample through every stage; if a stage cannot take what the previous one
        makes, every stage raises the same error naming it (no stage is left waiting)."""
        error, out = "", ()
        try:
            if self.first:
                inputs = _as_tuple(sample_input)
            else:
                status, specs = self.prev.recv_header()
                inputs = self.prev.recv(specs) if status == OK else None
                if status != OK:
                    error = "upstream"
            if inputs is not None:
                out = _as_tuple(self.module(*self._call(sample_input, inputs)))
        except Exception as exc:  # a stage that does not fit the previous one's output
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if not self.last:
            ok = not error and out
            self.next.send(out if ok else (), encode_header(out if ok else (), OK if ok else FAILED))
            self.next.flush()
        errors = [None] * self.stages
        dist.all_gather_object(errors, error, group=self.group)
        for s, e in enumerate(errors):
            if e and e != "upstream":
                raise PlaitError(f"pipeline: stage {s} cannot take the output of stage {s - 1}: {e}"
                                 if s else f"pipeline: stage 0 fails on the input batch: {e}")


def _split(batch, microbatches: int) -> list:
    """Cut a tensor (or tuple of tensors) along dim 0 into equal micro-batches."""
    first = _as_tuple(batch)[0]
    if first.shape[0] % microbatches:
        raise PlaitError(f"pipeline.microbatches={microbatches} does not divide the batch of {first.shape[0]}")
    parts = [t.chunk(microbatches) for t in _as_tuple(batch)]
    return [tuple(p[i] for p in parts) if isinstance(batch, tuple) else parts[0][i] for i in range(microbatches)]
