"""Join the process group described by torchrun's environment.

Works under ``torchrun`` / ``plait train`` (reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and, with none of those set, as a world of one.
The backend follows the device: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import faulthandler
import gc
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from plait.errors import PlaitError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise PlaitError(f"environment variable {name}={value!r} is not an integer") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise PlaitError("device 'cuda' was asked for but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if device != "cpu":
        raise PlaitError(f"unknown device {device!r}: expected 'auto', 'cpu' or 'cuda'")
    return torch.device("cpu")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_store(host: str, port: int, rank: int, world: int, timeout: timedelta):
    """A TCPStore whose server listens on ``host`` alone.

    TCPStore binds every interface by default; a single-node run has no reason to listen
    beyond loopback, so rank 0 binds the socket itself and hands it over.
    """
    if rank != 0:
        return dist.TCPStore(host, port, world, False, timeout=timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((socket.gethostbyname(host), port))
    sock.listen(512)
    # detach(): the store's server owns the descriptor from here on.
    return dist.TCPStore(host, port, world, True, timeout=timeout, master_listen_fd=sock.detach())


def init(backend: str = "auto", device: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Initialise the default process group from the environment (idempotent).

    ``timeout_s`` bounds every collective: a peer that stalls or dies turns into an error
    after that long instead of a hang. A process killed by a fatal signal (an abort in a
    communication thread, a crash in an extension) prints every thread's Python stack first
    (``faulthandler``), so that its log says where it was.
    """
    if not faulthandler.is_enabled():
        faulthandler.enable()
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = _pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())
    timeout = timedelta(seconds=timeout_s)
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if _is_loopback(host):
        # Single-node: keep gloo's own sockets on loopback as well.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if world == 1 and "MASTER_PORT" not in os.environ:
        store = dist.HashStore()
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and _is_loopback(host):
        port = _env_int("MASTER_PORT", 29500)
        store = _loopback_store(host, port, rank, world, timeout)
    else:
        store = None  # torch's env:// path: the elastic agent's store, or MASTER_ADDR:MASTER_PORT
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    return DistInfo(rank, world, local_rank, dev, backend)


def shutdown(barrier: bool = True) -> None:
    """Leave the process group, all ranks together (or, ``barrier=False``, each on its own).

    The barrier first lets every rank finish with its peers before any closes its connections
    (one rank aborted once at exit, in a plain-torchrun run, while its peer was tearing down).
    It is bounded by the group's timeout and skipped if a peer is already gone. Ranks that
    may outlive lost peers (parameter servers) leave without it. Unreachable objects (gradient
    hooks hold their modules in cycles) are collected before the groups are destroyed: whatever
    of theirs holds communication work or tensors goes now, in a live interpreter, not during
    its finalization, when a communication thread that drops a tensor's last reference cannot
    take the GIL (the process aborts: "terminate called without an active exception").
    """
    if not dist.is_initialized():
        return
    if barrier and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except (RuntimeError, dist.DistError):
            pass  # a peer already left or died: nothing left to wait for
    gc.collect()
    dist.destroy_process_group()
