"""Plait's sharded checkpoint (torch.distributed.checkpoint underneath) beside torch.save.

    .venv/bin/python benchmarks/checkpoint.py              # ~100M parameters, world size 2, 10 rounds
    .venv/bin/python benchmarks/checkpoint.py --width 2048 --rounds 2 --async-rounds 1

The state is a model of ``layers`` square linear layers and its SGD-momentum state (2 fp32
tensors per parameter). Plait: both ranks write their share in parallel and rank 0 commits;
loading reads it back on both ranks. Peer: ``torch.save`` of the same state from rank 0 (the
usual "gather to one rank and save"), and ``torch.load`` of it. Files are fsync'd on both sides.

Then ``checkpoint.async``: each rank trains its replica (forward, backward, SGD step on a batch of
``--batch``; no gradient sync, so that only the save's interference is timed) and saves
asynchronously at one step: how long ``save`` holds the step (the copy), how long until the
checkpoint is committed, and the step time while it is written against the median step without
a save, both with and without the copy's share.
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
from plait.train.dcp_io import HashingWriter


BATCH = 32


def build(width: int, layers: int):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, width)).sum().backward()
    opt.step()  # creates the momentum buffers
    return model, opt


def measure(width: int, layers: int, root: str, rounds: int, async_rounds: int, threads: int) -> dict[str, list[float]]:
    HashingWriter.THREADS = threads
    model, opt = build(width, layers)
    times = {"plait save": [], "plait load": [], "torch.save": [], "torch.load": []}
    ckpt = Checkpointer(Path(root) / "plait", keep=1)

    def settled() -> None:
        """Each timed save starts on a quiet disk: the last deletion done (Plait deletes an old
        checkpoint on a thread, which would otherwise overlap whatever comes next; torch's file
        is deleted after its load, or ``open(..., "wb")`` would free its blocks inside the timed
        save: this disk is mounted with ``discard``) and every dirty page written out."""
        ckpt.wait()
        os.sync()
        dist.barrier()

    def plait_side(r: int, times: dict) -> None:
        settled()
        start = time.perf_counter()
        path = ckpt.save(r + 1, model, opt, {})
        times["plait save"].append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        ckpt.load(path, model, opt)
        dist.barrier()
        times["plait load"].append(time.perf_counter() - start)

    def torch_side(r: int, times: dict) -> None:
        settled()
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
            file.unlink()
        dist.barrier()

    for r in range(rounds):
        # Alternate who goes first: each write leaves the disk flushing and the page cache full
        # for whatever comes next.
        for side in ((plait_side, torch_side) if r % 2 == 0 else (torch_side, plait_side)):
            side(r, times)
        dist.barrier()
    times.update(during_async_save(model, opt, Path(root) / "async", async_rounds))
    return times


def during_async_save(model, opt, root: Path, rounds: int) -> dict[str, list[float]]:
    x = torch.randn(BATCH, model[0].in_features)
    ckpt = Checkpointer(root, keep=1, asynchronous=True)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        return time.perf_counter() - start

    out = {"async: save() returns": [], "async: committed": [], "step, no save": [], "step while writing": [],
           "step while writing, copy included": []}
    for r in range(rounds):
        dist.barrier()
        out["step, no save"].append(statistics.median(step() for _ in range(6)))
        dist.barrier()
        start = time.perf_counter()
        ckpt.save(r + 1, model, opt, {})
        staged = time.perf_counter() - start
        during = []
        while ckpt._writer.is_alive() or not during:
            during.append(step())
        ckpt.wait()
        out["async: save() returns"].append(staged)
        out["async: committed"].append(time.perf_counter() - start)
        out["step while writing"].append(statistics.mean(during))
        out["step while writing, copy included"].append((sum(during) + staged) / len(during))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=5000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10, help="rounds of save and load, each side")
    parser.add_argument("--async-rounds", type=int, default=3, help="asynchronous saves (each ~15 s here)")
    parser.add_argument("--threads", type=int, default=HashingWriter.THREADS, help="files (and threads) per rank")
    args = parser.parse_args()
    params = args.layers * (args.width * args.width + args.width)
    megabytes = 2 * params * 4 / 1e6  # weights + momentum, fp32
    root = tempfile.mkdtemp(prefix="plait-bench-ckpt-")
    try:
        with World(2, timeout_s=600) as world:
            times = world.run(measure, args.width, args.layers, root, args.rounds, args.async_rounds, args.threads,
                              timeout=1800)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{params / 1e6:.0f}M parameters + SGD momentum = {megabytes:.0f} MB; world size 2; "
          f"median of {args.rounds} rounds ({args.async_rounds} asynchronous)")
    print(f"{'operation':12} | {'seconds':>8} | {'MB/s':>8}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for op, seconds in list(med.items())[:4]:
        print(f"{op:12} | {seconds:8.2f} | {megabytes / seconds:8.0f}")
    for op in ("plait save", "torch.save"):
        print(f"{op} by round: " + " ".join(f"{t:.2f}" for t in times[op]))
    print(f"save: plait / torch.save speed ratio {med['torch.save'] / med['plait save']:.2f}; "
          f"load: {med['torch.load'] / med['plait load']:.2f}")
    base = med["step, no save"]
    print(f"async save: step while writing / step without a save {med['step while writing'] / base:.2f} "
          f"({med['step while writing, copy included'] / base:.2f} with the copy's share); save() held the step "
          f"{med['async: save() returns']:.2f} s, committed after {med['async: committed']:.2f} s")


if __name__ == "__main__":
    main()
