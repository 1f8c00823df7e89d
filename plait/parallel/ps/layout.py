"""Who serves, who trains, and which part of the parameters each server holds.

Ranks ``0 .. S-1`` are servers, the rest are workers: rank 0, which writes the run's outputs,
sees every update. The model's trainable parameters, flattened in ``model.parameters()`` order,
form one vector of ``numel`` elements; each server owns some segments of it::

    range  [ s0 s0 s0 | s1 s1 s1 | s2 s2 ]   contiguous, size-balanced slices of the vector
    hash   [ w1: s2 | b1: s0 | w2: s1 | ...]  whole tensors, server = crc32(name) % S

A server's shard is its segments concatenated: one flat tensor that its optimizer trains.

Messages are flat float32 tensors: a 4-slot header, then a shard's worth of values::

    [kind | clock | version | loss | v0 v1 ... v_{n-1}]   kind, clock, version are int32 bit patterns
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import ConfigError

SCHEMES = ("range", "hash")
MODES = ("sync", "async", "ssp")

# Message kinds (header slot 0).
PUSH, DONE, DIVERGED = 1, 2, 5  # worker -> server: gradients, goodbye, "my loss is not finite"
PARAMS, DROPPED, STOP = 3, 4, 6  # server -> worker: parameters, "you were dropped", "the run stops"
HEADER = 4

Segments = tuple[tuple[int, int], ...]  # (lo, hi) ranges of the flat parameter vector


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def range_segments(numel: int, servers: int) -> list[Segments]:
    """``servers`` contiguous slices of sizes differing by at most one element."""
    cuts = [numel * s // servers for s in range(servers + 1)]
    return [((cuts[s], cuts[s + 1]),) for s in range(servers)]


def hash_segments(named_sizes: list[tuple[str, int]], servers: int) -> list[Segments]:
    """Whole tensors, by a hash of their name that every process computes alike (crc32, not hash())."""
    owned: list[list[tuple[int, int]]] = [[] for _ in range(servers)]
    offset = 0
    for name, size in named_sizes:
        owner = owned[zlib.crc32(name.encode()) % servers]
        if owner and owner[-1][1] == offset:  # adjacent to the previous one: one segment
            owner[-1] = (owner[-1][0], offset + size)
        else:
            owner.append((offset, offset + size))
        offset += size
    return [tuple(o) for o in owned]


@dataclass(frozen=True)
class PSLayout:
    """Server and worker ranks and each server's segments; the same on every rank."""

    servers: tuple[int, ...]
    workers: tuple[int, ...]
    segments: tuple[Segments, ...]
    numel: int
    scheme: str
    group: dist.ProcessGroup | None = None
    """Group the messages go through: the world, or a gloo group beside an NCCL world."""

    @classmethod
    def build(cls, model: nn.Module, servers: int = 1, scheme: str = "range") -> PSLayout:
        """Call on every rank, with the same model structure: ranks ``0..servers-1`` serve."""
        if scheme not in SCHEMES:
            raise ConfigError(f"ps.partition: {scheme!r} is not one of {', '.join(SCHEMES)}")
        world = dist.get_world_size()
        if not 1 <= servers < world:
            raise ConfigError(f"ps.servers: {servers} server(s) in a world of {world} leaves no worker "
                              f"(the world holds servers + workers)")
        named = [(n, p.numel()) for n, p in trainable(model)]
        numel = sum(size for _, size in named)
        if scheme == "range":
            if numel < servers:
                raise ConfigError(f"ps.servers: {servers} servers for {numel} parameter values")
            segments = range_segments(numel, servers)
        else:
            segments = hash_segments(named, servers)
            empty = [s for s, segs in enumerate(segments) if not segs]
            if empty:
                raise ConfigError(f"ps.servers: hashing the model's {len(named)} parameter tensors leaves server(s) "
                                  f"{empty} with none; use fewer servers or ps.partition = \"range\"")
        # P2P messages are CPU tensors: on an NCCL world they go through a gloo group of all ranks.
        group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        return cls(tuple(range(servers)), tuple(range(servers, world)), tuple(segments), numel, scheme, group)

    def shard_size(self, server: int) -> int:
        return sum(hi - lo for lo, hi in self.segments[server])

    def describe(self) -> str:
        s, w = len(self.servers), len(self.workers)
        return f"{s} server{'s' if s > 1 else ''} ({self.scheme}) + {w} worker{'s' if w > 1 else ''}"


def gather(flat: torch.Tensor, segments: Segments, out: torch.Tensor) -> torch.Tensor:
    """Copy ``flat``'s segments, one after another, into ``out`` (any device to any device)."""
    offset = 0
    for lo, hi in segments:
        out[offset : offset + hi - lo].copy_(flat[lo:hi])
        offset += hi - lo
    return out


def scatter(shard: torch.Tensor, segments: Segments, flat: torch.Tensor) -> None:
    """The inverse of ``gather``: put a shard's values back at its segments of ``flat``."""
    offset = 0
    for lo, hi in segments:
        flat[lo:hi].copy_(shard[offset : offset + hi - lo])
        offset += hi - lo


def header(msg: torch.Tensor) -> torch.Tensor:
    """The int32 view of slots 0-2 (kind, clock, version); slot 3 is the loss, as a float."""
    return msg[:3].view(torch.int32)


def message(kind: int, clock: int, version: int, loss: float, size: int) -> torch.Tensor:
    msg = torch.empty(HEADER + size, dtype=torch.float32)
    header(msg).copy_(torch.tensor([kind, clock, version], dtype=torch.int32))
    msg[3] = loss
    return msg


def reason(exc: BaseException) -> str:
    """A failed gloo operation in one short line: its source path and its advice cut off."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", text)
    return text.split(". This is typically")[0][:200]


def unpack(msg: torch.Tensor) -> tuple[int, int, int, float]:
    kind, clock, version = header(msg).tolist()
    return kind, clock, version, msg[3].item()
