"""Plait's sharded checkpoint (torch.distributed.checkpoint underneath) beside torch.save.

    .venv/bin/python benchmarks/checkpoint.py              # ~100M parameters, world size 2, 3 rounds
    .venv/bin/python benchmarks/checkpoint.py --width 2048 --rounds 2

The state is a model of ``layers`` square linear layers and its SGD-momentum state (2 fp32
tensors per parameter). Plait: both ranks write their share in parallel and rank 0 commits;
loading reads it back on both ranks. Peer: ``torch.save`` of the same state from rank 0 (the
usual "gather to one rank and save"), and ``torch.load`` of it. Files are fsync'd on both sides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from plait.testing import World
from plait.train.checkpoint import Checkpointer


def build(width: int, layers: int):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, width)).sum().backward()
    opt.step()  # creates the momentum buffers
    return model, opt


def measure(width: int, layers: int, root: str, rounds: int) -> dict[str, list[float]]:
    model, opt = build(width, layers)
    times = {"plait save": [], "plait load": [], "torch.save": [], "torch.load": []}
    ckpt = Checkpointer(Path(root) / "plait", keep=1)
    for r in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        path = ckpt.save(r + 1, model, opt, {})
        times["plait save"].append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        ckpt.load(path, model, opt)
        dist.barrier()
        times["plait load"].append(time.perf_counter() - start)
        if dist.get_rank() == 0:
            file = Path(root) / "torch.pt"
            start = time.perf_counter()
            with open(file, "wb") as f:
                torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            times["torch.save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.load(file, weights_only=True)
            times["torch.load"].append(time.perf_counter() - start)
        dist.barrier()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=5000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    params = args.layers * (args.width * args.width + args.width)
    megabytes = 2 * params * 4 / 1e6  # weights + momentum, fp32
    root = tempfile.mkdtemp(prefix="plait-bench-ckpt-")
    try:
        with World(2, timeout_s=600) as world:
            times = world.run(measure, args.width, args.layers, root, args.rounds, timeout=1800)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{params / 1e6:.0f}M parameters + SGD momentum = {megabytes:.0f} MB; world size 2; "
          f"median of {args.rounds} rounds")
    print(f"{'operation':12} | {'seconds':>8} | {'MB/s':>8}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for op, seconds in med.items():
        print(f"{op:12} | {seconds:8.2f} | {megabytes / seconds:8.0f}")
    print(f"save: plait / torch.save speed ratio {med['torch.save'] / med['plait save']:.2f}; "
          f"load: {med['torch.load'] / med['plait load']:.2f}")


if __name__ == "__main__":
    main()
