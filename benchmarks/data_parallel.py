"""Plait's data parallel beside PyTorch's DistributedDataParallel, in one run.

    .venv/bin/python benchmarks/data_parallel.py            # both models, 5 rounds
    .venv/bin/python benchmarks/data_parallel.py --models cnn --rounds 3

World size 2 on this machine, one thread per process, synthetic in-memory data (loading is not
measured). Each round times every mode on the same world, interleaved so that machine noise
hits all alike; the table shows the median over rounds.

Modes: ``single`` (one process, rank 1 idle: the base of scaling efficiency), ``no-sync`` (two
processes that never communicate: the ceiling), ``ddp`` (torch DDP, defaults), ``plait``.
Scaling efficiency = samples/s of 2 workers / (2 x samples/s of one), at the same per-worker batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import plait
from plait.models import DigitsCNN, mlp
from plait.testing import World

MODES = ("single", "no-sync", "ddp", "plait")


def build(model_name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if model_name == "cnn":
        return DigitsCNN(), (1, 28, 28)
    return mlp(784, 10, hidden=2048, depth=3), (784,)  # 10.0M parameters


def time_mode(model_name: str, mode: str, batch: int, warmup: int, steps: int) -> float | None:
    """Samples/s of ``mode`` over all participating ranks (None on a rank that sat out)."""
    rank = dist.get_rank()
    if mode == "single" and rank != 0:
        dist.barrier()
        return None
    model, shape = build(model_name)
    if mode == "ddp":
        model = DistributedDataParallel(model)
    elif mode == "plait":
        model = plait.DataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    workers = 1 if mode == "single" else dist.get_world_size()
    for i in range(warmup + steps):
        if i == warmup:
            if mode != "single":
                dist.barrier()
            start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    elapsed = time.perf_counter() - start
    if mode == "single":
        dist.barrier()
    else:  # the slowest rank sets the pace
        t = torch.tensor(elapsed)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        elapsed = t.item()
    return workers * batch * steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="per-worker batch")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per mode (default: by model)")
    args = parser.parse_args()
    rows = []
    with World(2, timeout_s=300) as world:
        for name in args.models:
            params = sum(p.numel() for p in build(name)[0].parameters())
            steps = args.steps or (200 if name == "cnn" else 30)
            samples = {m: [] for m in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    samples[mode].append(world.run(time_mode, name, mode, args.batch, steps // 5, steps)[0])
            med = {m: statistics.median(v) for m, v in samples.items()}
            rows.append((name, params, med, {m: (min(v), max(v)) for m, v in samples.items()}))
    print(f"\nworld size 2, 1 thread per process, per-worker batch {args.batch}, median of {args.rounds} rounds")
    print(f"{'model':6} {'params':>7} | " + " | ".join(f"{m:>9}" for m in MODES) + " | plait/ddp | eff ddp | eff plait | eff ceiling")
    for name, params, med, _ in rows:
        eff = {m: med[m] / (2 * med["single"]) for m in ("no-sync", "ddp", "plait")}
        print(f"{name:6} {params / 1e6:6.2f}M | " + " | ".join(f"{med[m]:9.0f}" for m in MODES)
              + f" | {med['plait'] / med['ddp']:9.3f} | {eff['ddp']:7.2f} | {eff['plait']:9.2f} | {eff['no-sync']:11.2f}")
    print("(samples/s; eff = samples/s / (2 x single))")
    for name, _, _, spread in rows:
        print(f"{name}: min-max over rounds: " + ", ".join(f"{m} {lo:.0f}-{hi:.0f}" for m, (lo, hi) in spread.items()))


if __name__ == "__main__":
    main()
