"""Partitioning: disjoint and covering shards, stable hashing, exact resume, world-size invariance."""

import subprocess
import sys

import pytest
import torch

from plait.data.partition import PartitionSampler
from plait.errors import PlaitError


def shards(n, world, **kw):
    return [PartitionSampler(n, world, r, **kw).indices(epoch=3).tolist() for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_split_shards_are_disjoint_and_cover(world):
    parts = shards(100, world, scheme="split", policy="drop")
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat), "shards overlap"
    assert len({len(p) for p in parts}) == 1, "shards differ in size"
    assert set(flat) == set(range(100 // world * world)), "drop keeps exactly the contiguous head"
    padded = shards(101, world, scheme="split", policy="pad")
    assert set(i for p in padded for i in p) == set(range(101)), "pad covers every sample"
    assert len({len(p) for p in padded}) == 1


def test_split_is_contiguous_per_rank():
    parts = shards(12, 3, scheme="split", shuffle=True, seed=5)
    assert [sorted(p) for p in parts] == [list(range(0, 4)), list(range(4, 8)), list(range(8, 12))]


def test_hash_partition_is_disjoint_and_follows_keys():
    keys = [f"sample-{i}" for i in range(200)]
    parts = shards(200, 4, scheme="hash", keys=keys, policy="pad")
    owner_sets = [set(p) for p in parts]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not owner_sets[a] & owner_sets[b]
    assert set().union(*owner_sets) == set(range(200))
    assert len({len(p) for p in parts}) == 1
    dropped = shards(200, 4, scheme="hash", keys=keys, policy="drop")
    assert len({len(p) for p in dropped}) == 1 and sum(map(len, dropped)) <= 200


def test_hash_partition_is_stable_across_processes():
    """Another interpreter, with another PYTHONHASHSEED, assigns every key to the same rank."""
    code = (
        "from plait.data.partition import PartitionSampler as P; "
        "print([sorted(P(300, 3, r, scheme='hash', keys=[f'k{i}' for i in range(300)], shuffle=False).indices().tolist()) for r in range(3)])"
    )
    here = [sorted(p) for p in shards(300, 3, scheme="hash", keys=[f"k{i}" for i in range(300)], shuffle=False)]
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""})
        assert out.stdout.strip() == str(here)


def test_deterministic_for_seed_and_epoch():
    a = PartitionSampler(50, 2, 1, scheme="split", seed=7)
    b = PartitionSampler(50, 2, 1, scheme="split", seed=7)
    assert a.indices(epoch=2).tolist() == b.indices(epoch=2).tolist()
    assert a.indices(epoch=2).tolist() != a.indices(epoch=3).tolist()


@pytest.mark.parametrize("scheme", ["batch", "split", "replicate", "hash"])
def test_resume_from_offset_yields_exactly_the_rest(scheme):
    sampler = PartitionSampler(97, 2, 1, scheme=scheme, global_batch=8, seed=3, policy="pad")
    sampler.set_epoch(4)
    full = list(sampler)
    for offset in (0, 5, 40, len(full)):
        sampler.set_epoch(4, offset=offset)
        assert list(sampler) == full[offset:]
        assert len(sampler) == len(full) - offset


def test_batch_scheme_is_world_size_invariant():
    """Step s draws the same global batch whatever the world size."""
    n, batch = 103, 8
    reference = PartitionSampler(n, 1, 0, global_batch=batch, seed=11).indices(epoch=2).view(-1, batch)
    for world in (2, 4):
        local = batch // world
        per_rank = [PartitionSampler(n, world, r, global_batch=batch, seed=11).indices(epoch=2).view(-1, local)
                    for r in range(world)]
        rebuilt = torch.cat(per_rank, dim=1)  # [steps, B]: rank slices side by side
        assert torch.equal(rebuilt, reference)


def test_replicas_read_everything_in_their_own_order():
    a, b = (PartitionSampler(40, 2, r, scheme="replicate", seed=1).indices().tolist() for r in range(2))
    assert sorted(a) == sorted(b) == list(range(40)) and a != b


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheme="batch", global_batch=6, num_replicas=4), "not divisible by 4"),
    (dict(scheme="batch"), "needs a positive global_batch"),
    (dict(scheme="zigzag"), "unknown scheme"),
    (dict(scheme="split", policy="wrap"), "unknown policy"),
    (dict(scheme="split", num_replicas=2, rank=2), "rank 2 is not in a world of 2"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(PlaitError, match=message):
        PartitionSampler(10, **kwargs)
