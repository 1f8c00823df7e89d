"""Plait's pipeline schedules beside torch.distributed.pipelining, in one run.

    .venv/bin/python benchmarks/pipeline.py                    # pp=2, m in 2 4 8, 5 rounds
    .venv/bin/python benchmarks/pipeline.py --microbatches 4 --rounds 3
    .venv/bin/python benchmarks/pipeline.py --batch 1024 --input-grad --microbatches 4 8   # the bubble against theory

World size 2 (pp=2), one thread per process, a 12.6M-parameter MLP (12 layers of 1024 and a
10-way head: the halves equal, 6 layers each, and the quarters of the interleaved schedule 3
each, as the closed-form bubble assumes) cut into the same pieces for both, global batch 64 (``--batch``), SGD. Median step time over rounds (each
round: a few warm-up steps, then timed steps) for Plait's GPipe and 1F1B and torch's
ScheduleGPipe and Schedule1F1B, Plait's ZB-H1 beside torch's ScheduleInterleavedZeroBubble with one stage per
rank (the same ZB-H1 order of passes), and Plait's interleaved 1F1B with 2 chunks per rank
(pipeline.virtual = 2: the model cut into 4 pieces, rank r holding r and r + 2) beside torch's
ScheduleInterleaved1F1B on the same pieces, interleaved; and Plait's measured bubble (from its own
trace of each timed step, the median) beside the replayed (the schedule run with each traced
pass's own time and nothing between passes), the ideal (each stage's median time per kind of
pass) and the theoretical (p-1)/(m+p-1), (p-1)/(3m+p-1) for ZB-H1, (p-1)/(vm+p-1) interleaved.

The theory assumes stages of equal work. Equal layers are not quite that: the first stage's
input is data, so its first layer computes no input gradient (its backward is ~8% shorter, and
under ZB-H1 its input pass is empty), which alone puts the ideal bubble 0.02-0.03 above theory
(0.05-0.08 for ZB-H1). ``--input-grad`` has the first stage compute its input's gradient as
every other stage does (for Plait and torch alike): equal work, so that what remains between
measured and theory is the engine's and the passes' spread. ``--batch`` makes the passes longer
against the messages between them (batch / m samples a micro-batch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.parallel.pipeline import PipelineStage, StageModule, blocks_of, bubble_fraction, cut_points
from plait.parallel.pipeline.trace import ideal_bubble, measured_bubble, replayed_bubble
from plait.testing import World

BATCH, WIDTH, LAYERS = 64, 1024, 12


def build() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


SCHEDULES = {"gpipe": ("gpipe", 1), "1f1b": ("1f1b", 1), "zbh1": ("zbh1", 1), "interleaved": ("1f1b", 2)}
"""What the table calls a schedule: Plait's (pipeline.schedule, pipeline.virtual)."""


def my_chunks(v: int) -> list[nn.Module]:
    """This rank's v chunks: pieces rank, rank + 2, ... of the model cut into 2v."""
    blocks = blocks_of(build())
    starts = cut_points(blocks, 2 * v) + [len(blocks)]
    s = dist.get_rank()
    return [StageModule(blocks[starts[c * 2 + s]:starts[c * 2 + s + 1]]) for c in range(v)]


def time_steps(impl: str, name: str, m: int, warmup: int, steps: int, batch: int = BATCH,
               input_grad: bool = False) -> tuple[float, float | None]:
    """Median seconds per step (slowest rank), and Plait's measured, replayed and ideal bubble
    (medians over the timed steps)."""
    schedule, v = SCHEDULES[name]
    chunks = my_chunks(v)
    opt = torch.optim.SGD(nn.ModuleList(chunks).parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, WIDTH, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    x.requires_grad_(input_grad)
    rank = dist.get_rank()
    if impl == "plait":
        stage = PipelineStage(chunks, rank, 2, dist.group.WORLD, loss_fn=F.cross_entropy)

        def run():
            stage.step(x, y, m, schedule)
    else:
        from torch.distributed.pipelining import PipelineStage as TorchStage
        from torch.distributed.pipelining import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                                  ScheduleInterleavedZeroBubble)

        tstages = [TorchStage(chunk, c * 2 + rank, 2 * v, torch.device("cpu")) for c, chunk in enumerate(chunks)]
        tstage = tstages[0]
        if name == "interleaved":
            sched = ScheduleInterleaved1F1B(tstages, m, loss_fn=F.cross_entropy)
        elif schedule == "zbh1":
            sched = ScheduleInterleavedZeroBubble([tstage], m, loss_fn=F.cross_entropy)
        else:
            sched = (ScheduleGPipe if schedule == "gpipe" else Schedule1F1B)(tstage, m, loss_fn=F.cross_entropy)

        def run():
            if rank == 0:
                sched.step(x)
            else:
                sched.step(target=y, losses=[])
    times, bubbles = [], []
    for i in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        x.grad = None
        run()
        opt.step()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(elapsed.item())
            if impl == "plait":  # after the timed span: each step's trace
                traces = stage.all_traces()
                bubbles.append((measured_bubble(traces), replayed_bubble(traces, schedule), ideal_bubble(traces, schedule)))
    bubble = tuple(statistics.median(b[j] for b in bubbles) for j in range(3)) if bubbles else None
    return statistics.median(times), bubble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=BATCH, help="global batch (micro-batches: batch / m samples)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--input-grad", action="store_true",
                        help="the first stage computes its input's gradient too: stages of equal work")
    args = parser.parse_args()
    schedules = tuple(args.schedules)
    cases = [(impl, sched) for sched in schedules for impl in ("plait", "torch")]
    table = {}
    with World(2, timeout_s=300) as world:
        params = world.run(lambda_params)[0]
        for m in args.microbatches:
            samples = {c: [] for c in cases}
            bubbles = {s: [] for s in schedules}
            for _ in range(args.rounds):
                for impl, sched in cases:
                    seconds, bubble = world.run(time_steps, impl, sched, m, 2, args.steps, args.batch,
                                                args.input_grad)[0]
                    samples[(impl, sched)].append(seconds)
                    if bubble is not None:
                        bubbles[sched].append(bubble)
            table[m] = ({c: statistics.median(v) for c, v in samples.items()},
                        {s: tuple(statistics.median(b[j] for b in v) for j in range(3)) for s, v in bubbles.items()})
    print(f"\npp=2, {params / 1e6:.1f}M-parameter MLP, global batch {args.batch}, 1 thread per process, "
          f"median of {args.rounds} rounds x {args.steps} steps (ms per step)"
          f"{', the first stage computing its input gradient' if args.input_grad else ''}")
    print(f"{'m':>2} | {'schedule':11} | {'plait':>7} | {'torch':>7} | {'torch/plait':>11} | {'bubble measured':>15} | "
          f"{'replayed':>8} | {'ideal':>5} | {'theory':>6}")
    for m, (med, bubble) in table.items():
        for sched in schedules:
            p, t = med[("plait", sched)], med[("torch", sched)]
            print(f"{m:>2} | {sched:11} | {p * 1e3:7.1f} | {t * 1e3:7.1f} | {t / p:11.3f} | "
                  f"{bubble[sched][0]:15.3f} | {bubble[sched][1]:8.3f} | {bubble[sched][2]:5.3f} | "
                  f"{bubble_fraction(m, 2, *SCHEDULES[sched]):6.3f}")
    print("(torch/plait > 1: Plait is faster; replayed: the schedule run with each traced pass's own time and\n"
          " nothing between passes (measured - replayed: the engine's messages and bookkeeping); ideal: with each\n"
          " stage's median time per kind of pass (replayed - ideal: the passes' spread); theory: equal passes)")


def lambda_params() -> int:
    return sum(p.numel() for p in build().parameters())


if __name__ == "__main__":
    main()
