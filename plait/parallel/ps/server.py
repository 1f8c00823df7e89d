"""The server loop: gradients in arrival order, one optimizer over this server's shard.

Each worker has a receiving thread here that blocks on its next message and queues it; the
loop takes messages in the order they arrived and, by mode:

``sync``   keeps each step's gradients until every live worker has sent its own, applies their
           mean in one optimizer step, and sends everyone the same new parameters.
``async``  applies each gradient (scaled by 1/workers) as it comes and answers at once.
``ssp``    applies like async, but answers a worker only while its clock is at most
           ``staleness`` steps ahead of the slowest live worker's; s = 0 gives sync's bound.

A worker's clock counts its gradients; the shard's version counts optimizer steps. A worker
that dies (its connection closes) or stays silent for ``timeout_s`` while the server waits on
it is dropped in async and ssp, and ends the run with an error naming it in sync. A worker
whose loss is NaN or infinite ends the run in every mode: divergence is not a lost worker.

Why the server times workers out itself: a gloo receive that times out closes every
connection of its process group, so the receiving threads never use gloo's timeout.

When the server fails (a lost worker in sync, a diverged loss, a bug), it tells every worker
still training to stop, and waits (briefly) until their connections close and its receiving
threads end: a receiving thread woken while the interpreter exits would abort the process.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import CommError, PlaitError
from plait.parallel.ps.layout import DIVERGED, DONE, DROPPED, HEADER, MODES, PARAMS, PUSH, STOP, PSLayout, gather, \
    message, reason, trainable, unpack

_FOREVER = timedelta(days=7)  # receiving threads wait on the server's own clock, not gloo's


@dataclass
class ServerStats:
    """What a server did; the gaps and staleness are the largest it allowed."""

    mode: str
    updates: int = 0
    pushes: int = 0
    max_gap: int = 0
    """Largest (worker clock - slowest live worker's clock) at the moment a worker was answered."""
    max_staleness: int = 0
    """Largest (shard version - version the gradient was computed on) at the moment it was applied."""
    clocks: dict[int, int] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)
    """Dropped worker rank -> why."""


class ParameterServer:
    """Serve ``layout.segments[index]`` of ``model``'s parameters to the layout's workers.

    ``make_optimizer(params)`` builds the optimizer of this server's shard (one flat tensor,
    so elementwise optimizers such as SGD with momentum and Adam behave as on the whole model).
    ``on_push(server, worker)`` is called after each gradient, for progress and logging.
    ``lr_at(s)``: the learning rate of global step s + 1 (a schedule), set before each update;
    sync applies one global step per update, async and ssp one per ``len(workers)`` updates.
    """

    def __init__(self, model: nn.Module, make_optimizer: Callable, layout: PSLayout, *, mode: str = "sync",
                 staleness: int = 0, timeout_s: float = 60.0, on_push: Callable | None = None,
                 lr_at: Callable[[int], float] | None = None):
        if mode not in MODES:
            raise PlaitError(f"ps.mode: {mode!r} is not one of {', '.join(MODES)}")
        self.rank = dist.get_rank()
        if self.rank not in layout.servers:
            raise PlaitError(f"rank {self.rank} is a worker in this layout ({layout.describe()}), not a server")
        self.layout, self.mode, self.staleness, self.timeout_s = layout, mode, staleness, timeout_s
        self.index = layout.servers.index(self.rank)
        self.segments = layout.segments[self.index]
        self.size = layout.shard_size(self.index)
        flat = torch.cat([p.detach().reshape(-1).float().cpu() for _, p in trainable(model)])
        self.shard = nn.Parameter(gather(flat, self.segments, torch.empty(self.size)))
        self.optimizer = make_optimizer([self.shard])
        self.on_push, self.lr_at = on_push, lr_at
        self.version = 0
        self.workers = list(layout.workers)
        self.live = set(self.workers)  # not lost
        self.done: set[int] = set()  # sent DONE
        self.clock = {w: 0 for w in self.workers}
        self.loss: dict[int, float] = {}  # each worker's latest loss
        self.stats = ServerStats(mode, clocks=self.clock)
        self._pending: dict[int, torch.Tensor] = {}  # sync: this step's gradients; ssp: workers held back
        self._awaiting: dict[int, float] = {}  # worker -> since when the server waits for its message
        self._sends: dict[int, tuple[dist.Work, torch.Tensor]] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._orphans: list = []
        self._threads: list[threading.Thread] = []

    # -- receiving ------------------------------------------------------------------------
    def _receive(self, worker: int) -> None:
        """Thread body: queue ``worker``'s messages until it is done or its connection fails."""
        while True:
            msg = torch.empty(HEADER + self.size)
            try:
                dist.irecv(msg, src=worker, group=self.layout.group).wait(_FOREVER)
            except Exception as exc:  # noqa: BLE001 -- any failure means the worker is gone
                self._inbox.put((worker, exc))
                return
            self._inbox.put((worker, msg))
            if unpack(msg)[0] == DONE:
                return

    def _active(self) -> list[int]:
        return [w for w in self.workers if w in self.live and w not in self.done]

    def _next(self) -> tuple[int, torch.Tensor | BaseException] | None:
        """The next message, or None after dropping the workers that passed their deadline.

        Deadlines are checked before every message: a steady stream from fast workers must
        not hide a silent one.
        """
        now = time.monotonic()
        for w in [w for w, since in self._awaiting.items() if now - since >= self.timeout_s]:
            self._lose(w, f"no message for {self.timeout_s:g} s (ps.timeout)")
        deadline = min((since + self.timeout_s for since in self._awaiting.values()), default=now + 1.0)
        try:
            return self._inbox.get(timeout=max(0.0, deadline - now))
        except queue.Empty:
            return None

    # -- answering ------------------------------------------------------------------------
    def _send(self, worker: int, kind: int) -> None:
        msg = message(kind, self.clock[worker], self.version, float("nan"), self.size)
        msg[HEADER:] = self.shard.detach()
        previous = self._sends.pop(worker, None)
        try:
            if kind == DROPPED:
                # Never wait on a worker that may be stalled: a gloo timeout would close every
                # connection. Its sends are kept alive, unwaited, until the process exits.
                self._orphans += [previous, (dist.isend(msg, dst=worker, group=self.layout.group), msg)]
                return
            if previous is not None:
                previous[0].wait()  # long done: the worker answered it
            self._sends[worker] = (dist.isend(msg, dst=worker, group=self.layout.group), msg)
        except Exception as exc:  # noqa: BLE001
            if kind != DROPPED:
                self._lose(worker, f"sending failed: {reason(exc)}")

    def _answer(self, worker: int) -> None:
        active = self._active()
        slowest = min((self.clock[w] for w in active), default=self.clock[worker])
        self.stats.max_gap = max(self.stats.max_gap, self.clock[worker] - slowest)
        self._awaiting[worker] = time.monotonic()
        self._send(worker, PARAMS)

    def _release(self) -> None:
        """ssp: answer the held workers that the slowest clock now allows."""
        active = self._active()
        slowest = min((self.clock[w] for w in active), default=None)
        for w in sorted(self._pending):
            if slowest is None or self.clock[w] - slowest <= self.staleness:
                del self._pending[w]
                self._answer(w)

    def _lose(self, worker: int, why: str) -> None:
        if worker not in self.live:
            return
        where = f"worker rank {worker} (at its step {self.clock[worker]})"
        if self.mode == "sync":
            raise CommError(f"rank {self.rank} (parameter server): lost {where}: {why}; a sync step needs "
                            f"every worker, so the run stops")
        self.live.discard(worker)
        self._awaiting.pop(worker, None)
        self._pending.pop(worker, None)
        self.stats.lost[worker] = why
        print(f"plait: rank {self.rank} (parameter server): dropped {where}: {why}; "
              f"going on with {len(self.live)} worker(s)", flush=True)
        if not self.live:
            raise CommError(f"rank {self.rank} (parameter server): every worker was lost")
        self._send(worker, DROPPED)  # a stalled worker that wakes up learns it was dropped
        if self.mode == "ssp":
            self._release()  # the slowest clock may have moved on

    # -- applying ---------------------------------------------------------------------------
    def _apply(self, grad: torch.Tensor) -> None:
        if self.lr_at is not None:
            step = self.version if self.mode == "sync" else self.version // len(self.workers)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(step)
        self.shard.grad = grad
        self.optimizer.step()
        self.version += 1
        self.stats.updates += 1

    def _push(self, worker: int, msg: torch.Tensor, seen: int) -> None:
        self.stats.pushes += 1
        self._awaiting.pop(worker, None)
        if self.mode == "sync":
            self._pending[worker] = msg[HEADER:]
            self._complete_step()
            return
        self.stats.max_staleness = max(self.stats.max_staleness, self.version - seen)
        self._apply(msg[HEADER:] / len(self.workers))  # each worker's share of a global step
        if self.mode == "async":
            self._answer(worker)
        else:
            self._pending[worker] = msg
            self._release()

    def _complete_step(self) -> None:
        """sync: once every active worker's gradient is in, apply their mean (summed in rank order)."""
        if not self._pending or not set(self._active()) <= set(self._pending):
            return
        self._apply(torch.stack([self._pending[w] for w in sorted(self._pending)]).mean(0))
        for w in sorted(self._pending):
            self._answer(w)
        self._pending.clear()

    def _handle(self, worker: int, msg: torch.Tensor) -> None:
        kind, clock, seen, loss = unpack(msg)
        if kind == PUSH:
            self.clock[worker], self.loss[worker] = clock, loss
            self._push(worker, msg, seen)
            if self.on_push is not None:
                self.on_push(self, worker)
        elif kind == DONE:
            self.done.add(worker)
            self._awaiting.pop(worker, None)
            if self.mode == "sync":
                self._complete_step()
            else:
                self._release()
        elif kind == DIVERGED:
            self.done.add(worker)  # it says goodbye next, and is not told to stop
            advice = "the learning rate" + ("" if self.mode == "sync" else ", or the momentum: staleness adds to it")
            raise PlaitError(f"rank {self.rank} (parameter server): worker rank {worker} reported loss {loss} at "
                             f"its step {clock}; the run stops; lower {advice}")
        else:
            raise PlaitError(f"rank {self.rank} (parameter server): unexpected message kind {kind} "
                             f"from rank {worker}")

    def serve(self) -> ServerStats:
        """Run until every worker is done or lost; returns what happened."""
        try:
            return self._serve()
        except BaseException:
            self._stop_workers()
            raise

    def _stop_workers(self, wait_s: float = 10.0) -> None:
        """Tell the workers still training that the run stops; wait until they have left."""
        for w in self._active():
            self._orphans.append(self._sends.pop(w, None))
            msg = message(STOP, self.clock[w], self.version, float("nan"), self.size)
            try:
                self._orphans.append((dist.isend(msg, dst=w, group=self.layout.group), msg))
            except Exception:  # noqa: BLE001 -- already gone: nothing to tell
                pass
        deadline = time.monotonic() + wait_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _serve(self) -> ServerStats:
        for w in self.workers:
            thread = threading.Thread(target=self._receive, args=(w,), daemon=True, name=f"plait-ps-recv{w}")
            thread.start()
            self._threads.append(thread)
            self._answer(w)  # version 0: every worker starts from this server's parameters
        while self._active():
            event = self._next()
            if event is None:
                continue
            worker, msg = event
            if worker not in self.live:
                continue  # a dropped worker's late message
            if isinstance(msg, BaseException):
                self._lose(worker, reason(msg))
            else:
                self._handle(worker, msg)
        for w in list(self._sends):
            if w in self.live:
                self._sends.pop(w)[0].wait()
        return self.stats
