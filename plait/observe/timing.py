"""Where a rank's time goes: exclusive seconds per category, and spans for a trace.

    recorder = Recorder()
    with recording(recorder):
        with span("forward"):
            ...                       # a wait inside, span("comm", ...), is taken out of forward
    recorder.totals                   # {"forward": 0.012, "comm": 0.003}

Categories of a training step: ``data`` (waiting for the next batch), ``forward``, ``backward``,
``comm`` (blocked on a collective: communication that was not hidden behind compute),
``bubble`` (a pipeline stage blocked on its neighbour), ``optimizer`` (zeroing, clipping, the
step). Time is *exclusive*: a span nested in another is counted in its own category only, so the
categories of a step add up to the step's time less the few statements outside any span.

The communication helpers (``plait.distributed.comm.wait``) and the pipeline stage open spans
through the module-level ``span``; it does nothing unless a recorder is active in this process
(the trainer activates one per run; a library user can too). On CUDA the recorder synchronizes
the device at each span's edges, so that spans measure the device's work, not its launch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

CATEGORIES = ("data", "forward", "backward", "comm", "bubble", "optimizer")
"""The parts of a step, in the order reports stack them."""

Span = tuple[str, str, float, float]
"""(category, name, start s, end s) of one span, times from the recorder's ``t0``."""


class Recorder:
    """Exclusive seconds per category since the last ``take()``; spans too while ``tracing``."""

    def __init__(self, sync=None, clock=time.perf_counter):
        """``sync``: called at every span's edges (``torch.cuda.synchronize`` on CUDA), or None."""
        self.sync, self.clock = sync, clock
        self.totals: dict[str, float] = defaultdict(float)
        self.spans: list[Span] | None = None
        self.t0 = clock()
        self._stack: list[float] = []  # per open span: seconds spent in spans nested in it

    def span(self, category: str, name: str = "") -> _Span:
        return _Span(self, category, name)

    def take(self) -> dict[str, float]:
        """The totals so far, every category present; the totals start again from zero."""
        totals = {c: self.totals.get(c, 0.0) for c in CATEGORIES}
        totals.update({c: v for c, v in self.totals.items() if c not in totals})
        self.totals = defaultdict(float)
        return totals

    def start_trace(self) -> None:
        """Record spans from now on, times from now (call it just after a barrier, on every rank
        alike, so that the ranks' timelines line up)."""
        self.spans, self.t0 = [], self.clock()

    def stop_trace(self) -> list[Span]:
        spans, self.spans = self.spans or [], None
        return spans


class _Span:
    """One span of a recorder (a class, not a generator: a step opens dozens)."""

    __slots__ = ("recorder", "category", "name", "start")

    def __init__(self, recorder: Recorder, category: str, name: str):
        self.recorder, self.category, self.name = recorder, category, name

    def __enter__(self):
        rec = self.recorder
        if rec.sync:
            rec.sync()
        rec._stack.append(0.0)
        self.start = rec.clock()

    def __exit__(self, *exc) -> None:
        rec = self.recorder
        if rec.sync:
            rec.sync()
        end = rec.clock()
        elapsed = end - self.start
        rec.totals[self.category] += elapsed - rec._stack.pop()
        if rec._stack:
            rec._stack[-1] += elapsed
        if rec.spans is not None:
            rec.spans.append((self.category, self.name or self.category, self.start - rec.t0, end - rec.t0))


_active: Recorder | None = None
_NOTHING = nullcontext()


def span(category: str, name: str = ""):
    """A span of the active recorder, or nothing at all when none is active."""
    return _active.span(category, name) if _active is not None else _NOTHING


@contextmanager
def recording(recorder: Recorder | None):
    """Make ``recorder`` the one ``span`` records into, for the while."""
    global _active
    previous, _active = _active, recorder
    try:
        yield recorder
    finally:
        _active = previous
