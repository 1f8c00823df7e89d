"""Real multi-process worlds for tests: a pool of workers joined once in a gloo process group.

Starting a process with torch costs seconds, so a ``World`` starts its ranks once and then runs
any number of functions on all of them::

    with World(2) as world:
        grads = world.run(compute_grads, batch)   # compute_grads(batch) on every rank
        # grads[r] is what rank r returned

Functions must be importable (module-level) so that the spawned workers can unpickle them.
A function that raises on any rank fails ``run`` with every rank's traceback; the world is then
restarted, since its collectives may be out of step.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


class WorkerError(AssertionError):
    """A function failed (or timed out) on one or more ranks of a World."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(rank: int, size: int, port: int, inbox, outbox, timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)  # several ranks share few cores
    from plait.distributed.env import init

    try:
        init(backend="gloo", device="cpu", timeout_s=timeout_s)
    except BaseException:
        outbox.put((rank, "error", traceback.format_exc()))
        return
    outbox.put((rank, "ready", None))
    while (job := inbox.get()) is not None:
        fn, args, kwargs = job
        try:
            outbox.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:
            outbox.put((rank, "error", traceback.format_exc()))
    # Every answer was collected before the world was closed: leave at once. An orderly exit
    # (destroying the process group, joining what threads the jobs left) took seconds a rank
    # at the end of the test session.
    outbox.close()
    outbox.join_thread()
    os._exit(0)


FAILED_GRACE_S = 10.0


class World:
    """``size`` worker processes in one gloo process group on 127.0.0.1.

    ``timeout_s`` is the process group's collective timeout: a rank stuck waiting for a failed
    peer errors out after that long instead of hanging the test session.
    """

    def __init__(self, size: int, timeout_s: float = 30.0):
        self.size, self.timeout_s = size, timeout_s
        self._procs: list = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._inboxes = [ctx.Queue() for _ in range(self.size)]
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(target=_serve, args=(r, self.size, port, self._inboxes[r], self._outbox, self.timeout_s),
                        daemon=True, name=f"plait-world{self.size}-rank{r}")
            for r in range(self.size)
        ]
        for p in self._procs:
            p.start()
        self._collect("start", deadline=time.monotonic() + 120, expect="ready")

    def _collect(self, what: str, deadline: float, expect: str = "ok") -> list[Any]:
        """Every rank's answer; once one rank has failed, the others get ``FAILED_GRACE_S`` to
        report theirs (a peer blocked on it would otherwise wait out the collective timeout)."""
        results: dict[int, tuple[str, Any]] = {}
        while len(results) < self.size:
            try:
                rank, status, value = self._outbox.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                results[rank] = (status, value)
                if status != expect:
                    deadline = min(deadline, time.monotonic() + FAILED_GRACE_S)
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if time.monotonic() > deadline or dead:
                    break
        missing = sorted(set(range(self.size)) - set(results))
        failed = {r: v for r, (s, v) in results.items() if s != expect}
        if failed or missing:
            dead = [p.name for p in self._procs if not p.is_alive()]
            self.close()
            report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items()))
            silent = f"ranks {missing} gave no answer (dead processes: {dead})" if missing else ""
            if not failed:
                raise WorkerError(f"{what}: {silent}")
            raise WorkerError(f"{what} failed on ranks {sorted(failed)}{'; ' + silent if silent else ''}:\n{report}")
        return [results[r][1] for r in range(self.size)]

    def run(self, fn: Callable, *args, timeout: float = 300.0, **kwargs) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results indexed by rank."""
        if not self._procs:
            self._start()
        for inbox in self._inboxes:
            inbox.put((fn, args, kwargs))
        # A failing rank's peers time out after timeout_s; give them that long to report.
        return self._collect(getattr(fn, "__name__", "function"), time.monotonic() + timeout + self.timeout_s)

    def close(self) -> None:
        for inbox, p in zip(self._inboxes, self._procs):
            if p.is_alive():
                inbox.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
