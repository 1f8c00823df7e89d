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
(``grad_dtype=torch.bfloat16``); and compressed with error feedback: ``ddp-powersgd`` (DDP with
torch's ``powerSGD_hook``, rank 2, in one bucket: with several, the hook aborts on gloo), ``plait-powersgd`` (``parallel.compress = "powersgd"``, rank 2),
``plait-topk`` (1%). Compression starts after 2 steps in both, inside the warm-up.
Scaling efficiency = samples/s of 2 workers / (2 x samples/s of one), at the same per-worker batch.

``--to-loss L``: time to a loss instead, so that a faster setting that converges worse shows as
such: each mode trains the model on the digits (real data, 1,437 training images, each worker
its own half, reshuffled every epoch alike in every mode) until the mean training loss of the
last 10 steps over both workers is at most L; the table gives the seconds and steps (medians).
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

MODES = ("single", "no-sync", "sync-floor", "ddp", "plait", "ddp-bf16", "plait-bf16", "ddp-powersgd",
         "plait-powersgd", "plait-topk")
TO_LOSS = ("single", "ddp", "plait", "ddp-bf16", "plait-bf16", "ddp-powersgd", "plait-powersgd", "plait-topk")
RANK, RATIO, START = 2, 0.01, 2


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


def wrap(model: nn.Module, mode: str) -> nn.Module:
    """The model as ``mode`` trains it."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    from plait.parallel.compress import Compression

    if mode == "ddp-powersgd":  # one bucket: on gloo the hook's second all-reduce, launched from the
        # first one's callback, interleaves with the next bucket's on another thread, in a different
        # order on each rank (gloo aborts: "Received data size doesn't match expected size")
        model = DistributedDataParallel(model, bucket_cap_mb=4096)
    elif mode.startswith("ddp"):
        model = DistributedDataParallel(model)
    if mode.startswith("ddp"):
        if mode == "ddp-bf16":
            model.register_comm_hook(None, bf16_hook)
        elif mode == "ddp-powersgd":
            state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=RANK, start_powerSGD_iter=START)
            model.register_comm_hook(state, powersgd.powerSGD_hook)
    elif mode.startswith("plait"):
        method = mode.split("-")[1] if mode in ("plait-powersgd", "plait-topk") else "none"
        model = plait.DataParallel(model, grad_dtype=torch.bfloat16 if mode == "plait-bf16" else None,
                                   compress=Compression(method, rank=RANK, ratio=RATIO, start=START))
    return model


def time_mode(model_name: str, mode: str, batch: int, warmup: int, steps: int) -> float:
    """Samples/s of ``mode`` over all ranks of the world it runs on."""
    rank = dist.get_rank()
    model, shape = build(model_name)
    model = wrap(model, mode)
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


def to_loss(model_name: str, mode: str, batch: int, target: float, max_steps: int) -> tuple[float, int]:
    """(seconds, steps) until the mean loss of the last 10 steps over the world is <= ``target``."""
    from plait.data.datasets import digits

    rank, world = dist.get_rank(), dist.get_world_size()
    train, _, _ = digits()
    x_all, y_all = train.tensors
    if model_name == "mlp":
        x_all = x_all.flatten(1)
    model = wrap(build(model_name)[0], mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    recent = torch.zeros(10)
    dist.barrier()
    start, step, epoch = time.perf_counter(), 0, 0
    while step < max_steps:
        order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(epoch))
        mine = order[rank::world]  # this worker's half, the same split in every mode
        for i in range(0, len(mine) - batch + 1, batch):
            idx = mine[i : i + batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()
            opt.step()
            recent[step % 10] = loss.detach()
            step += 1
            if step >= 10:
                mean = recent.sum() / (10 * world)
                dist.all_reduce(mean)
                if mean.item() <= target:
                    return time.perf_counter() - start, step
        epoch += 1
    return float("inf"), step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="per-worker batch")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per mode (default: by model)")
    parser.add_argument("--to-loss", type=float, default=0.0, help="time to this training loss instead")
    args = parser.parse_args()
    if args.to_loss:
        return main_to_loss(args)
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
    print(f"\ncompressed: {'model':6} | powersgd plait/ddp | eff ddp-powersgd | eff plait-powersgd | eff plait-topk")
    for name, _, med, _ in rows:
        eff = {m: med[m] / (2 * med["single"]) for m in MODES[1:]}
        print(f"            {name:6} | {med['plait-powersgd'] / med['ddp-powersgd']:18.3f} | {eff['ddp-powersgd']:16.2f}"
              f" | {eff['plait-powersgd']:18.2f} | {eff['plait-topk']:14.2f}")
    print("(samples/s; eff = samples/s / (2 x single))")
    for name, _, _, spread in rows:
        print(f"{name}: min-max over rounds: " + ", ".join(f"{m} {lo:.0f}-{hi:.0f}" for m, (lo, hi) in spread.items()))


def main_to_loss(args) -> None:
    with World(1, timeout_s=600) as alone, World(2, timeout_s=600) as pair:
        for name in args.models:
            runs = {m: [] for m in TO_LOSS}
            for _ in range(args.rounds):
                for mode in TO_LOSS:
                    world = alone if mode == "single" else pair
                    runs[mode].append(world.run(to_loss, name, mode, args.batch, args.to_loss, 5000)[0])
            print(f"\n{name}: seconds (steps) to a training loss of {args.to_loss} on the digits, per-worker batch "
                  f"{args.batch} (single: one worker, the same batch), median of {args.rounds} rounds")
            med = {m: (statistics.median(s for s, _ in v), statistics.median(n for _, n in v)) for m, v in runs.items()}
            print(" | ".join(f"{m} {s:.2f} s ({n:.0f})" for m, (s, n) in med.items()))
            print(f"time ratio peer/plait: fp32 {med['ddp'][0] / med['plait'][0]:.2f}, bf16 "
                  f"{med['ddp-bf16'][0] / med['plait-bf16'][0]:.2f}, powersgd {med['ddp-powersgd'][0] / med['plait-powersgd'][0]:.2f}")


if __name__ == "__main__":
    main()
