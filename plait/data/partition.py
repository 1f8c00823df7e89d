"""Which samples each data-parallel rank reads: the seeds' split, replicate and hash schemes.

Four schemes, all deterministic for a (seed, epoch), equal-sized per rank, resumable:

``batch`` (default)
    One shuffled order of the whole dataset per epoch, independent of the world size; step s
    takes the global batch ``order[s*B:(s+1)*B]`` and rank r reads its r-th slice of it. The
    samples of every step are the same for 1, 2 or 4 ranks: training is world-size invariant.
``split``
    The seed's contiguous split: rank r owns the r-th contiguous shard, shuffled within.
``replicate``
    Every rank holds all the data and reads it in its own order (seeded by rank).
``hash``
    The seed's hash partition: a sample goes to ``stable_hash(key) % world``; the same key lands
    on the same rank in every run and process.

``split``, ``replicate`` and ``hash`` depend on the world size, so they change which samples form
a step when the world changes. Unequal shards are made equal by ``policy``: ``"drop"`` cuts the
tail, ``"pad"`` repeats samples from the start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from plait.errors import PlaitError

SCHEMES = ("batch", "split", "replicate", "hash")
POLICIES = ("drop", "pad")


def stable_hash(key: Any) -> int:
    """A hash of ``repr(key)`` that is the same in every process and run (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


def _cycle_to(indices: torch.Tensor, length: int) -> torch.Tensor:
    """``indices`` repeated from the start until ``length`` long (or cut to it)."""
    if length <= len(indices):
        return indices[:length]
    reps = -(-length // len(indices))
    return indices.repeat(reps)[:length]


class PartitionSampler(Sampler[int]):
    """Yield the indices this rank reads, for ``DataLoader(sampler=..., batch_size=local_batch)``.

    Args:
        data: the dataset (anything with ``len``) or its length.
        num_replicas, rank: the data-parallel degree and this rank's place in it
            (``mesh.size("dp")``, ``mesh.coord("dp")``).
        scheme: one of ``SCHEMES``.
        global_batch: samples per step over all ranks; required for ``"batch"``, which hands
            each rank ``global_batch // num_replicas`` consecutive indices per step.
        shuffle: shuffle the order each epoch (seeded by ``seed`` and the epoch).
        policy: ``"drop"`` or ``"pad"``, how shards (or the last global batch) are made equal.
        keys: for ``"hash"``: a sequence of sample keys, or ``index -> key``; default the index.
    """

    def __init__(
        self,
        data: Sized | int,
        num_replicas: int = 1,
        rank: int = 0,
        *,
        scheme: str = "batch",
        global_batch: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        policy: str = "drop",
        keys: Sequence[Any] | Callable[[int], Any] | None = None,
    ):
        self.size = data if isinstance(data, int) else len(data)
        if scheme not in SCHEMES:
            raise PlaitError(f"partition: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        if policy not in POLICIES:
            raise PlaitError(f"partition: unknown policy {policy!r}; choose 'drop' or 'pad'")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise PlaitError(f"partition: rank {rank} is not in a world of {num_replicas}")
        if self.size == 0:
            raise PlaitError("partition: the dataset is empty")
        if scheme == "batch":
            if not global_batch or global_batch < 1:
                raise PlaitError("partition: scheme 'batch' needs a positive global_batch")
            if global_batch % num_replicas:
                raise PlaitError(
                    f"partition: global batch {global_batch} is not divisible by {num_replicas} ranks"
                )
            if policy == "drop" and global_batch > self.size:
                raise PlaitError(
                    f"partition: global batch {global_batch} is larger than the dataset ({self.size} samples)"
                )
        self.num_replicas, self.rank, self.scheme = num_replicas, rank, scheme
        self.global_batch, self.shuffle, self.seed, self.policy = global_batch, shuffle, seed, policy
        self.keys = keys
        self.epoch, self.offset = 0, 0
        self._owners: torch.Tensor | None = None  # hash scheme: owner rank of each sample

    # -- position -------------------------------------------------------------------------
    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """Select the epoch; skip its first ``offset`` indices of this rank (to resume)."""
        if offset < 0 or offset > self.shard_size():
            raise PlaitError(f"partition: offset {offset} is outside this rank's {self.shard_size()} samples")
        self.epoch, self.offset = epoch, offset

    def shard_size(self) -> int:
        """How many indices this rank reads in one full epoch (the same on every rank)."""
        n, w = self.size, self.num_replicas
        if self.scheme == "batch":
            steps = n // self.global_batch if self.policy == "drop" else -(-n // self.global_batch)
            return steps * (self.global_batch // w)
        if self.scheme == "replicate":
            return n
        if self.scheme == "split":
            return n // w if self.policy == "drop" else -(-n // w)
        counts = self._hash_counts()
        return min(counts) if self.policy == "drop" else max(counts)

    def __len__(self) -> int:
        return self.shard_size() - self.offset

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.offset :].tolist())

    # -- the schemes ----------------------------------------------------------------------
    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's full index stream for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        mix = self.seed * 1_000_003 + epoch
        if self.scheme == "replicate":
            mix = mix * 7919 + self.rank + 1  # each replica its own order
        gen = torch.Generator().manual_seed(mix % (2**63))
        return getattr(self, f"_{self.scheme}")(gen)

    def _order(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)

    def _batch(self, gen: torch.Generator) -> torch.Tensor:
        b, local = self.global_batch, self.global_batch // self.num_replicas
        steps = self.shard_size() // local
        order = _cycle_to(self._order(self.size, gen), steps * b).view(steps, b)  # [steps, B]
        return order[:, self.rank * local : (self.rank + 1) * local].reshape(-1)

    def _split(self, gen: torch.Generator) -> torch.Tensor:
        per = self.shard_size()
        whole = _cycle_to(torch.arange(self.size), per * self.num_replicas)
        shard = whole[self.rank * per : (self.rank + 1) * per]
        return shard[self._order(per, gen)]

    def _replicate(self, gen: torch.Generator) -> torch.Tensor:
        return self._order(self.size, gen)

    def _hash(self, gen: torch.Generator) -> torch.Tensor:
        owners = self._hash_owners()
        own = torch.nonzero(owners == self.rank).flatten()
        if len(own) == 0:
            raise PlaitError(f"partition: hash scheme gives rank {self.rank} no samples; use more data")
        own = _cycle_to(own, self.shard_size())
        return own[self._order(len(own), gen)]

    def _hash_owners(self) -> torch.Tensor:
        if self._owners is None:
            key = self.keys if callable(self.keys) else (lambda i: i if self.keys is None else self.keys[i])
            self._owners = torch.tensor([stable_hash(key(i)) % self.num_replicas for i in range(self.size)])
        return self._owners

    def _hash_counts(self) -> list[int]:
        return torch.bincount(self._hash_owners(), minlength=self.num_replicas).tolist()
