"""Start worker processes through torch's elastic launcher (what ``torchrun`` runs).

Single node: the c10d rendezvous goes through a file store in a private temporary folder and
the workers' store binds 127.0.0.1, so nothing listens beyond loopback. Several nodes: the c10d
rendezvous at ``--rdzv-endpoint``, hosted by node 0, exactly as ``torchrun`` would do it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field

from plait.errors import PlaitError


@dataclass
class LaunchSpec:
    nproc: int = 1
    """Worker processes on this node (torchrun's --nproc-per-node)."""
    nnodes: int = 1
    node_rank: int | None = None
    """This node's rank: node 0 hosts the rendezvous. None: torch's c10d decides (the node whose
    address is the endpoint's hosts it)."""
    rdzv_endpoint: str = ""
    """HOST:PORT of node 0's rendezvous, for multi-node runs."""
    run_id: str = "plait"
    max_restarts: int = 0
    """How often the elastic agent restarts the whole worker group after a failure."""
    module: str = "plait.train.worker"
    module_args: list[str] = field(default_factory=list)
    huge_pages: bool = False
    """Workers put tensors of 2 MiB and more on transparent huge pages (torch's
    ``THP_MEM_ALLOC_ENABLE``), unless the user set that variable: for ZeRO-3, whose ranks return a
    unit's memory to the system after each use and fault it in again at the next gather."""

    def __post_init__(self):
        if self.nproc < 1:
            raise PlaitError(f"--nproc must be at least 1, got {self.nproc}")
        if self.nnodes < 1:
            raise PlaitError(f"--nnodes must be at least 1, got {self.nnodes}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise PlaitError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise PlaitError("--rdzv-endpoint HOST:PORT is required when --nnodes > 1")
        if self.max_restarts < 0:
            raise PlaitError(f"--max-restarts must be >= 0, got {self.max_restarts}")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def _torchrun_args(spec: LaunchSpec, rdzv_dir: str) -> list[str]:
    args = ["--nproc-per-node", str(spec.nproc), "--nnodes", str(spec.nnodes),
            "--max-restarts", str(spec.max_restarts), "--rdzv-backend", "c10d", "--rdzv-id", spec.run_id]
    if spec.nnodes == 1:
        args += ["--rdzv-endpoint", os.path.join(rdzv_dir, "rendezvous"), "--rdzv-conf", "store_type=file",
                 "--local-addr", "127.0.0.1"]
    else:
        # c10d assigns ranks by arrival; the node rank, if known, decides who hosts the rendezvous store.
        args += ["--rdzv-endpoint", spec.rdzv_endpoint]
        if spec.node_rank is not None:
            args += ["--rdzv-conf", f"is_host={'true' if spec.node_rank == 0 else 'false'}"]
    return args + ["--module", spec.module, *spec.module_args]


def worker_env(spec: LaunchSpec, env) -> dict[str, str]:
    """What the workers' environment gets besides ``env`` (the launcher's), which wins."""
    out = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // spec.nproc))}
    if spec.huge_pages:  # read once, at a process's first allocation: it must be there at its start
        out["THP_MEM_ALLOC_ENABLE"] = "1"
    out = {key: value for key, value in out.items() if key not in env}
    if spec.nnodes == 1:
        # Workers make their own store on 127.0.0.1 instead of sharing the agent's.
        out["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return out


def launch(spec: LaunchSpec) -> None:
    """Run the workers to completion; a failed worker becomes one PlaitError naming its rank."""
    added = worker_env(spec, os.environ)
    before = {key: os.environ.get(key) for key in added}
    os.environ.update(added)  # the agent starts the workers with its own environment
    try:
        _run(spec)
    finally:  # a later launch from this process (calibrate runs two) starts from the user's
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(spec: LaunchSpec) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # The agent's own log repeats what the failing worker already said; PLAIT_VERBOSE=1 shows it.
    # torch gives each of its elastic modules' loggers a level of its own: set every one of them.
    verbose = bool(os.environ.get("PLAIT_VERBOSE"))
    level = logging.INFO if verbose else logging.CRITICAL
    if not verbose:  # torch's C++ warnings (a peer's store gone after a failure) come with C++ frames
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(level)
    with tempfile.TemporaryDirectory(prefix="plait-rdzv-") as rdzv_dir:
        args = get_args_parser().parse_args(_torchrun_args(spec, rdzv_dir))
        try:
            run(args)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            if failure.exitcode < 0:  # killed: it had no chance to say why
                raise PlaitError(f"worker rank {rank} failed (signal {failure.signal_name()})") from None
            raise PlaitError(f"worker rank {rank} failed (exit code {failure.exitcode}); its message is above") from None
        except SignalException as exc:  # the agent stopped its workers before this reaches us
            if exc.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise PlaitError(f"stopped by {signal.Signals(exc.sigval).name}; the workers were stopped") from None
    sys.stdout.flush()
