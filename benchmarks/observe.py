"""What watching costs: a data-parallel step with the time breakdown recorded, beside the same
step without it and beside DDP, in one run.

    .venv/bin/python benchmarks/observe.py                  # the seed CNN and the 10M MLP, 5 rounds
    .venv/bin/python benchmarks/observe.py --models cnn --rounds 3

World size 2, one thread per process, synthetic data. Modes: ``ddp`` (torch DDP), ``plait``
(Plait's DataParallel, no recorder), ``plait+breakdown`` (the same loop inside a recorder, with
the spans the trainer opens: step, data, forward, backward, optimizer, and one per
communication wait). Interleaved rounds, medians. Also the cost of one span by itself, and the
breakdown and MFU that the recorded mode saw.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import plait
from plait.observe.flops import count_flops, measured_peak
from plait.observe.timing import CATEGORIES, Recorder, recording, span
from plait.testing import World

from data_parallel import build

MODES = ("ddp", "plait", "plait+breakdown")


def time_mode(model_name: str, mode: str, batch: int, warmup: int, steps: int) -> tuple[float, dict]:
    """(samples/s over both ranks, rank's mean seconds per step by part) of ``mode``."""
    model, shape = build(model_name)
    model = DistributedDataParallel(model) if mode == "ddp" else plait.DataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    recorder = Recorder() if mode == "plait+breakdown" else None
    totals = dict.fromkeys((*CATEGORIES, "step"), 0.0)
    with recording(recorder):
        for i in range(warmup + steps):
            if i == warmup:
                dist.barrier()
                start = time.perf_counter()
                if recorder:
                    recorder.take()
            with span("step"):
                with span("data"):
                    xb, yb = x, y
                with span("optimizer"):
                    opt.zero_grad()
                with span("forward"):
                    loss = F.cross_entropy(model(xb), yb)
                with span("backward"):
                    loss.backward()
                with span("optimizer"):
                    opt.step()
    elapsed = torch.tensor(time.perf_counter() - start)
    if recorder:
        totals = {k: v / steps for k, v in recorder.take().items()}
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return dist.get_world_size() * batch * steps / elapsed.item(), totals


def span_cost(n: int = 200_000) -> tuple[float, float]:
    """Seconds per empty span with a recorder active, and with none (the nullcontext path)."""
    costs = []
    for active in (Recorder(), None):
        with recording(active):
            start = time.perf_counter()
            for _ in range(n):
                with span("comm", "x"):
                    pass
            costs.append((time.perf_counter() - start) / n)
    return costs[0], costs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="per-worker batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    active, idle = span_cost()
    print(f"one span: {active * 1e6:.2f} us with a recorder active, {idle * 1e6:.2f} us with none")
    rows = []
    with World(2, timeout_s=300) as pair:
        for name in args.models:
            steps = 200 if name == "cnn" else 30
            samples, parts = {m: [] for m in MODES}, None
            for _ in range(args.rounds):
                for mode in MODES:
                    rate, totals = pair.run(time_mode, name, mode, args.batch, steps // 5, steps)[0]
                    samples[mode].append(rate)
                    if mode == "plait+breakdown":
                        parts = totals
            model, shape = build(name)
            flops = count_flops(model.to("meta"), torch.empty(2, *shape, device="meta"))
            rows.append((name, {m: statistics.median(v) for m, v in samples.items()}, parts, flops))
    peak = measured_peak(torch.device("cpu"), False, 1)[0]
    print(f"\nworld size 2, 1 thread per process, per-worker batch {args.batch}, median of {args.rounds} rounds "
          f"(samples/s); peak {peak / 1e9:.1f} GFLOP/s per process, measured alone")
    print(f"{'model':6} | " + " | ".join(f"{m:>15}" for m in MODES) + " | breakdown/plait | plait/ddp | MFU")
    for name, med, parts, flops in rows:
        mfu = flops * med["plait+breakdown"] / 2 / peak
        print(f"{name:6} | " + " | ".join(f"{med[m]:15.0f}" for m in MODES)
              + f" | {med['plait+breakdown'] / med['plait']:15.3f} | {med['plait'] / med['ddp']:9.3f} | {mfu:.1%}")
    for name, _, parts, _ in rows:
        step = sum(parts.values())
        print(f"{name}: rank 0, ms per step (last round): " + ", ".join(
            f"{k if k != 'step' else 'other'} {v * 1e3:.2f}" for k, v in parts.items()) + f"; step {step * 1e3:.2f}")


if __name__ == "__main__":
    main()
