"""Plait's data parallel beside PyTorch's DistributedDataParallel, in one run.

    .venv/bin/python benchmarks/data_parallel.py            # both models, 5 rounds
    .venv/bin/python benchmarks/data_parallel.py --models cnn --rounds 3

World size 2 on this machine, one thread per process, synthetic in-memory data (loading is not
measured). Each round times every mode on the same world, interleaved so that machine noise
hits all alike; the table shows the median over rounds.

Modes: ``single`` (one process alone, in a world of its own while the pair's processes sit
blocked on their queues: the base of scaling efficiency), ``no-sync`` (two
processes that never communicate: the ceiling), ``sync-floor`` (no gradient traffic, one
4-byte all-reduce per step: what any synchronous scheme pays to wait for the slower rank),
``ddp`` (torch DDP, defaults), ``plait``; and with gradients sent in bf16: ``ddp-bf16`` (DDP with
the body of its ``bf16_compress_hook``, which itself refuses any backend but NCCL), ``plait-bf16``
(``grad_dtype=torch.bfloat16``).
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

MODES = ("single", "no-sync", "sync-floor", "ddp", "plait", "ddp-bf16", "plait-bf16")


def build(model_name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if model_name == "cnn":
        return DigitsCNN(), (1, 28, 28)
    return mlp(784, 10, hidden=2048, depth=3), (784,)  # 10.0M parameters


def bf16_hook(group, bucket):
    """torch's ``bf16_compress_hook`` (ddp_comm_hooks/default_hooks.py) without its NCCL-only check:
    the bucket cast to bf16 and divided by the world, all-reduced, cast back."""
    group = group or dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(fut):
        buffer = bucket.buffer()
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(decompress)


def time_mode(model_name: str, mode: str, batch: int, warmup: int, steps: int) -> float:
    """Samples/s of ``mode`` over all ranks of the world it runs on."""
    rank = dist.get_rank()
    model, shape = build(model_name)
    if mode.startswith("ddp"):
        model = DistributedDataParallel(model)
        if mode == "ddp-bf16":
            model.register_comm_hook(None, bf16_hook)
    elif mode.startswith("plait"):
        model = plait.DataParallel(model, grad_dtype=torch.bfloat16 if mode == "plait-bf16" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    token = torch.zeros(1)
    for i in range(warmup + steps):
        if i == warmup:
            dist.barrier()
            start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if mode == "sync-floor":
            dist.all_reduce(token)
        opt.step()
    elapsed = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return dist.get_world_size() * batch * steps / elapsed.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="per-worker batch")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per mode (default: by model)")
    args = parser.parse_args()
    rows = []
    with World(1, timeout_s=300) as alone, World(2, timeout_s=300) as pair:
        for name in args.models:
            params = sum(p.numel() for p in build(name)[0].parameters())
            steps = args.steps or (200 if name == "cnn" else 30)
            samples = {m: [] for m in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    world = alone if mode == "single" else pair
                    samples[mode].append(world.run(time_mode, name, mode, args.batch, steps // 5, steps)[0])
            med = {m: statistics.median(v) for m, v in samples.items()}
            rows.append((name, params, med, {m: (min(v), max(v)) for m, v in samples.items()}))
    print(f"\nworld size 2, 1 thread per process, per-worker batch {args.batch}, median of {args.rounds} rounds")
    print(f"{'model':6} {'params':>7} | " + " | ".join(f"{m:>10}" for m in MODES)
          + " | plait/ddp | eff ddp | eff plait | eff floor | eff ceiling | bf16: plait/ddp | eff ddp | eff plait")
    for name, params, med, _ in rows:
        eff = {m: med[m] / (2 * med["single"]) for m in MODES[1:]}
        print(f"{name:6} {params / 1e6:6.2f}M | " + " | ".join(f"{med[m]:10.0f}" for m in MODES)
              + f" | {med['plait'] / med['ddp']:9.3f} | {eff['ddp']:7.2f} | {eff['plait']:9.2f}"
              + f" | {eff['sync-floor']:9.2f} | {eff['no-sync']:11.2f}"
              + f" | {med['plait-bf16'] / med['ddp-bf16']:15.3f} | {eff['ddp-bf16']:7.2f} | {eff['plait-bf16']:9.2f}")
    print("(samples/s; eff = samples/s / (2 x single))")
    for name, _, _, spread in rows:
        print(f"{name}: min-max over rounds: " + ", ".join(f"{m} {lo:.0f}-{hi:.0f}" for m, (lo, hi) in spread.items()))


if __name__ == "__main__":
    main()
