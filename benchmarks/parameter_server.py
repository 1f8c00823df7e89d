"""Parameter server (sync, async, ssp) beside all-reduce data parallel, in one run.

    .venv/bin/python benchmarks/parameter_server.py                  # 3 rounds, 6 s per run (~3 min)
    .venv/bin/python benchmarks/parameter_server.py --rounds 1 --seconds 4 --slow 3

The seed CNN on the digits, 2 workers with a per-worker batch of 32, plain SGD + momentum.
Parameter-server modes use a world of 3 (rank 0 serves); all-reduce (Plait's DataParallel, and
torch's DistributedDataParallel, the ratios' base) a world of 2. Each run
lasts a fixed wall time; every mode runs twice: with equal workers, then with the last worker
slowed to 1/--slow of its speed (after each step it sleeps (slow - 1) x that step's compute
time). Reported: samples/s (all workers), and the seconds until the smoothed training loss
first reaches --target; medians over rounds, interleaved so machine noise hits all alike.
A PNG of loss against wall time (last round) goes to --plot.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import plait
from plait.data.datasets import digits
from plait.models import DigitsCNN
from plait.parallel.ps import ParameterServer, PSLayout, PSWorker
from plait.testing import World

MODES = ("torch-ddp", "allreduce", "ps-sync", "ps-async", "ps-ssp")  # ratios against the first


def _setup(rank: int):
    torch.manual_seed(0)
    train, _, _ = digits()
    x, y = train.tensors
    return DigitsCNN(), x, y, torch.Generator().manual_seed(100 + rank)


def _optimizer(params):
    return torch.optim.SGD(params, lr=0.02, momentum=0.9)


def _train(step_fn, x, y, gen, batch: int, seconds: float, slow: float, start: float, clock: list,
           until=lambda: False):
    """Steps until the deadline (or ``until()``); the straggler sleeps so that it runs at 1/slow speed."""
    while time.perf_counter() - start < seconds and not until():
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        t0 = time.perf_counter()
        loss = step_fn(x[idx], y[idx])
        if slow > 1:
            time.sleep((slow - 1) * (time.perf_counter() - t0))
        clock.append((time.perf_counter() - start, loss))


def run_ps(mode: str, staleness: int, batch: int, seconds: float, slow: float):
    """Rank 0 serves and records (time, worker's loss) per push; ranks 1, 2 train."""
    rank = dist.get_rank()
    model, x, y, gen = _setup(rank)
    layout = PSLayout.build(model, servers=1)
    dist.barrier()
    start = time.perf_counter()
    if rank == 0:
        curve = []
        server = ParameterServer(model, _optimizer, layout, mode=mode, staleness=staleness,
                                 on_push=lambda s, w: curve.append((time.perf_counter() - start, s.loss[w])))
        stats = server.serve()
        return curve, stats.pushes, stats.max_gap
    worker = PSWorker(model, layout)

    def step(xb, yb):
        worker.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        worker.push(loss.item())
        return loss.item()

    _train(step, x, y, gen, batch, seconds, slow if rank == 2 else 1.0, start, [])
    worker.close()
    return None


def run_allreduce(batch: int, seconds: float, slow: float, torch_ddp: bool):
    """Plait's DataParallel (or torch's DDP) on 2 ranks; a 4-byte all-reduce per step agrees on when to stop."""
    rank = dist.get_rank()
    model, x, y, gen = _setup(rank)
    ddp = DistributedDataParallel(model) if torch_ddp else plait.DataParallel(model)
    opt = _optimizer(ddp.parameters())
    stop = torch.zeros(1)
    dist.barrier()
    start, curve = time.perf_counter(), []

    def step(xb, yb):
        opt.zero_grad()
        loss = F.cross_entropy(ddp(xb), yb)
        loss.backward()
        opt.step()
        stop[0] = float(time.perf_counter() - start >= seconds)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return loss.item()

    _train(step, x, y, gen, batch, float("inf"), slow if rank == 1 else 1.0, start, curve, until=lambda: bool(stop.item()))
    return curve


def smoothed(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """(time, mean of the last ``window`` losses)."""
    out = []
    for i in range(window - 1, len(points)):
        out.append((points[i][0], statistics.fmean(loss for _, loss in points[i - window + 1 : i + 1])))
    return out


def time_to(points: list[tuple[float, float]], target: float) -> float:
    return next((t for t, loss in points if loss <= target), float("nan"))


def measure(mode: str, args, slow: float, pair: World, trio: World) -> tuple[float, list]:
    """(samples/s, smoothed loss curve) of one run."""
    if mode in ("allreduce", "torch-ddp"):
        curves = pair.run(run_allreduce, args.batch, args.seconds, slow, mode == "torch-ddp")
        steps = min(len(c) for c in curves)
        merged = [(max(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves)) for i in range(steps)]
        return (2 * steps * args.batch / merged[-1][0] if merged else 0.0), smoothed(merged, 10)
    kind = mode.removeprefix("ps-")
    curve, pushes, _ = trio.run(run_ps, kind, args.staleness if kind == "ssp" else 0, args.batch, args.seconds,
                                slow)[0]
    return (pushes * args.batch / curve[-1][0] if curve else 0.0), smoothed(curve, 20)


def plot(curves: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (condition, by_mode) in zip(axes, curves.items()):
        for mode, points in by_mode.items():
            ax.plot([t for t, _ in points], [loss for _, loss in points], label=mode)
        ax.axhline(args.target, color="grey", lw=0.8, ls="--")
        ax.set_title(condition)
        ax.set_xlabel("wall time (s)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("training loss (smoothed)")
    axes[1].legend()
    fig.suptitle(f"digits CNN, 2 workers x batch {args.batch}: parameter server vs all-reduce (Plait, torch DDP)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="wall time of each run")
    parser.add_argument("--batch", type=int, default=32, help="per-worker batch")
    parser.add_argument("--slow", type=float, default=2.0, help="the straggler runs at 1/slow speed")
    parser.add_argument("--staleness", type=int, default=2, help="ssp bound")
    parser.add_argument("--target", type=float, default=0.05, help="loss for time-to-loss")
    parser.add_argument("--plot", type=Path, default=Path("runs/benchmarks/parameter_server.png"))
    args = parser.parse_args()
    conditions = {"equal workers": 1.0, f"one worker at 1/{args.slow:g} speed": args.slow}
    rate = {(c, m): [] for c in conditions for m in MODES}
    reach = {(c, m): [] for c in conditions for m in MODES}
    curves: dict = {c: {} for c in conditions}
    with World(2, timeout_s=300) as pair, World(3, timeout_s=300) as trio:
        warm = argparse.Namespace(**{**vars(args), "seconds": 3.0})
        for mode in MODES:  # first runs pay for lazy set-up (threads, allocator, code paths)
            measure(mode, warm, 1.0, pair, trio)
        for _ in range(args.rounds):
            for condition, slow in conditions.items():
                for mode in MODES:
                    samples_per_s, curve = measure(mode, args, slow, pair, trio)
                    rate[condition, mode].append(samples_per_s)
                    reach[condition, mode].append(time_to(curve, args.target))
                    curves[condition][mode] = curve
    print(f"\ndigits CNN, 2 workers x batch {args.batch}, {args.seconds:g} s per run, ssp bound {args.staleness}, "
          f"median of {args.rounds} rounds (1 thread per process)")
    print(f"{'condition':28} {'mode':10} | {'samples/s':>9} | {'vs ' + MODES[0]:>12} | {'s to loss ' + str(args.target):>14}")
    for condition in conditions:
        base = statistics.median(rate[condition, MODES[0]])
        for mode in MODES:
            r = statistics.median(rate[condition, mode])
            times = [t for t in reach[condition, mode] if t == t]
            t = f"{statistics.median(times):.2f}" if times else "not reached"
            if times and len(times) < args.rounds:
                t += f" ({len(times)}/{args.rounds})"
            print(f"{condition:28} {mode:10} | {r:9.0f} | {r / base:12.2f} | {t:>14}")
    plot(curves, args.plot, args)
    print(f"loss against wall time: {args.plot}")


if __name__ == "__main__":
    main()
