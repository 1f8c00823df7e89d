"""The worker's side: push gradients to every server, pull the parameters they send back.

    worker = PSWorker(model, layout)      # waits for the servers' initial parameters
    for x, y in loader:
        worker.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        worker.push(loss)                 # gradients out, fresh parameters in
    worker.close()                        # tells the servers this worker is done

The model's parameters and gradients are views of two flat buffers, so a push copies each
server's segments straight into its message, and a reply straight back into the parameters.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import CommError, PlaitError
from plait.parallel.ps.layout import DIVERGED, DONE, DROPPED, HEADER, PARAMS, PUSH, STOP, PSLayout, gather, message, \
    reason, scatter, trainable, unpack


class WorkerDropped(CommError):
    """The server dropped this worker (it was silent longer than ``ps.timeout``)."""


class StopRun(PlaitError):
    """The whole run must end (not just this worker): a launcher must not go on without it."""


class LossNotFinite(StopRun):
    """This worker's loss was NaN or infinite: the servers were told, and they stop the run."""


class ServerStopped(StopRun):
    """A parameter server failed and told this worker to stop; its own message says why."""

    follow_on = True


class PSWorker:
    def __init__(self, model: nn.Module, layout: PSLayout):
        self.rank = dist.get_rank()
        if self.rank not in layout.workers:
            raise PlaitError(f"rank {self.rank} is a server in this layout ({layout.describe()}), not a worker")
        self.layout = layout
        named = trainable(model)
        self.params = [p for _, p in named]
        bad = [(n, p.dtype) for n, p in named if p.dtype != torch.float32]
        if bad:
            raise PlaitError(f"the parameter server trains float32 parameters; {bad[0][0]} is {bad[0][1]} "
                             "(use train.bf16 for mixed precision: parameters stay float32)")
        device = self.params[0].device
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])  # [numel]
        self.grad = torch.zeros_like(self.flat)
        self._views, offset = [], 0
        for p in self.params:
            n = p.numel()
            p.data = self.flat[offset : offset + n].view_as(p)
            p.grad = self.grad[offset : offset + n].view_as(p)
            self._views.append((offset, n))
            offset += n
        self.device = device
        self.clock = 0
        self.versions = [0] * len(layout.servers)
        self._replies = [torch.empty(HEADER + layout.shard_size(s)) for s in range(len(layout.servers))]
        self._receive_all()  # the servers' initial parameters

    def zero_grad(self) -> None:
        self.grad.zero_()
        for p, (offset, n) in zip(self.params, self._views):
            p.grad = self.grad[offset : offset + n].view_as(p)

    def _collect_grads(self) -> None:
        """Gradients that left the flat buffer (``zero_grad(set_to_none=True)`` elsewhere) come back."""
        for p, (offset, n) in zip(self.params, self._views):
            if p.grad is None:
                self.grad[offset : offset + n].zero_()
            elif p.grad.data_ptr() != self.grad[offset:].data_ptr():
                self.grad[offset : offset + n].copy_(p.grad.reshape(-1))
            p.grad = self.grad[offset : offset + n].view_as(p)

    def _fail(self, exc: BaseException, server: int, what: str) -> CommError:
        return CommError(f"rank {self.rank}: {what} parameter server rank {server} failed: {reason(exc)}")

    def _wait(self, work: dist.Work, server: int, what: str) -> None:
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 -- a closed connection or a timeout
            raise self._fail(exc, server, what) from None

    def _send(self, msg: torch.Tensor, server: int, what: str) -> dist.Work:
        try:
            return dist.isend(msg, dst=server, group=self.layout.group)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, server, what) from None

    def _receive_all(self) -> None:
        group, servers = self.layout.group, self.layout.servers
        works = []
        for s, server in enumerate(servers):
            try:
                works.append(dist.irecv(self._replies[s], src=server, group=group))
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, server, "receiving parameters from") from None
        for s, work in enumerate(works):  # each reply checked as it comes: one STOP is enough
            self._wait(work, servers[s], "receiving parameters from")
            reply = self._replies[s]
            kind, _, version, _ = unpack(reply)
            if kind == STOP:
                self.close(quiet=True)  # ends the servers' receiving threads for this worker
                raise ServerStopped(f"rank {self.rank}: parameter server rank {servers[s]} stopped the run")
            if kind == DROPPED:
                self.close(quiet=True)  # ends the server's receiving thread for this worker
                raise WorkerDropped(f"rank {self.rank}: dropped by parameter server rank {servers[s]} "
                                    "(silent longer than ps.timeout); this worker stops")
            if kind != PARAMS:
                raise PlaitError(f"rank {self.rank}: unexpected message kind {kind} from server rank {servers[s]}")
            self.versions[s] = version
            scatter(reply[HEADER:].to(self.device, non_blocking=True), self.layout.segments[s], self.flat)

    def push(self, loss: torch.Tensor | float | None = None) -> None:
        """Send this step's gradients (and its loss, for the server's log); receive new parameters.

        A NaN or infinite ``loss`` is not sent as a gradient: the servers are told, they stop the
        run (in every mode: a diverging worker is not a lost one), and this raises LossNotFinite.
        """
        self._collect_grads()
        self.clock += 1
        value = math.nan if loss is None else float(loss.detach() if torch.is_tensor(loss) else loss)
        diverged = loss is not None and not math.isfinite(value)
        kind = DIVERGED if diverged else PUSH
        sends = []
        for s, server in enumerate(self.layout.servers):
            msg = message(kind, self.clock, self.versions[s], value, self.layout.shard_size(s))  # fixed size
            gather(self.grad, self.layout.segments[s], msg[HEADER:])
            sends.append((self._send(msg, server, "sending gradients to"), msg))
        for s, (work, _) in enumerate(sends):
            self._wait(work, self.layout.servers[s], "sending gradients to")
        if diverged:
            self.close(quiet=True)
            raise LossNotFinite(f"rank {self.rank}: loss is {value} at step {self.clock}; the parameter "
                                "servers stop the run")
        self._receive_all()

    def close(self, quiet: bool = False) -> None:
        """Tell every server this worker is done (``quiet``: ignore servers that are gone)."""
        for s, server in enumerate(self.layout.servers):
            msg = message(DONE, self.clock, self.versions[s], math.nan, self.layout.shard_size(s))
            try:
                self._wait(self._send(msg, server, "saying goodbye to"), server, "saying goodbye to")
            except CommError:
                if not quiet:
                    raise
