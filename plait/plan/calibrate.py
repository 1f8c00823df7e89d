"""``plait calibrate CONFIG --nproc N``: measure this machine and write a cluster file.

Every local process measures at once, as in training (processes that share a host share its
cores and memory bus):

- compute: the config's model, built for real, forward and backward of its blocks at micro-batch
  sizes from the whole batch down to an eighth of one rank's share and one sample, and every
  power of two between, fitted (least squares) as FLOPs / rate + a fixed part (each size's error
  relative): the ``[flops]`` rate; the fixed part split into the weights' reads and operations x
  a fixed cost each (``split_intercept``: ``weights_bandwidth``, ``op_overhead_s``); each size's
  time over the line's (``pass_scale``); the same step with the blocks recomputed (``train.recompute``)
  at one rank's batch, against it and its forward: ``recompute_factor``;
- links: all-reduce, all-gather, reduce-scatter (as Plait runs it on the backend) and send/recv,
  4 KiB, 1 MiB, 8 MiB and 32 MiB, over groups of 2 consecutive ranks up to all of them, all groups at once;
  latency and bandwidth fitted to the ring's factors (``plait.plan.cluster``), all ranks starting
  together; and the skew: how much longer a small one takes right after a burst of compute, as
  in a step (ranks arrive apart; on shared cores a peer may be waiting for one);
- a pipeline stage's own cost per micro-batch under each schedule (its bookkeeping, ZB-H1's split
  backward, its sends and receives);
- the optimizer step's memory bandwidth (the config's optimizer, and the gradient-norm clip if the
  config clips, on one flat tensor of the model's size, at least 1M elements) and its fixed cost
  per tensor (what the trainer's own optimizer span, from the run below, takes beyond its bytes);
- what a process holds besides the model's tensors, from a few steps of the config trained
  data-parallel on every process, first (their peak resident memory less what the cost model
  counts for that layout's tensors), and the time to fetch a batch (``step_overhead_s``).

The slowest rank's figure is kept for each (a step waits for it), and the median of
``--rounds`` rounds of compute, links and pipeline measurements (these VMs' timings move 10-40%
from one minute to the next; one round moved the planner's median error by 7 points).

    python -m plait.plan.calibrate CONFIG OUTPUT [--set K=V ...]    # what each worker runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

SIZES = (4096, 2**20, 8 * 2**20, 32 * 2**20)
"""Bytes per collective: small ones (latency), large ones (bandwidth, as large as a gradient
bucket: 25 MB by default; 8 MiB ran twice as fast per byte here as 32 MiB)."""


def _timed(fn, repeats: int, group=None, calls: int = 1) -> float:
    """Median over ``repeats`` of the mean seconds of ``calls`` back-to-back calls of ``fn``,
    every rank of ``group`` starting together."""
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _between_work(fn, repeats: int, group, calls: int = 10) -> float:
    """Mean seconds of ``fn`` when it follows a burst of compute, as a collective does in a
    step (ranks then arrive apart, and on shared cores a peer may be waiting for a core), the
    burst's own time (measured alone) taken off: median of ``repeats`` rounds of ``calls``, the
    ranks of ``group`` (those of ``fn``'s collective) starting together."""
    a = torch.randn(256, 256)

    def work():
        for _ in range(4):
            torch.mm(a, a)

    def both():
        work()
        fn()
    return max(_timed(both, repeats, group, calls) - _timed(work, repeats, group, calls), 0.0)


def _slowest(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of t = a + x / rate over (x, t) points, each error relative to its t (a
    small batch or message, where the fixed part a weighs most, counts as much as a large one):
    (a, rate)."""
    import numpy as np

    t = np.array([p[1] for p in points])
    x = np.array([[1.0, p[0]] for p in points]) / t[:, None]
    (a, inv), *_ = np.linalg.lstsq(x, np.ones_like(t), rcond=None)
    return max(float(a), 0.0), 1.0 / max(float(inv), 1e-30)


def _links(rank: int, world: int, backend: str) -> dict:
    """{op: (latency_s, bandwidth)} fitted over every group size at hand."""
    from plait.distributed.comm import all_gather_flat, reduce_scatter_flat

    points: dict[str, list] = {op: [] for op in ("all_reduce", "all_gather", "reduce_scatter", "send_recv")}
    skews: dict = {}
    g = 2
    while g <= world:
        groups = [dist.new_group(list(range(s, s + g))) for s in range(0, world - world % g, g)]
        mine = groups[rank // g] if rank < len(groups) * g else None
        for nbytes in SIZES:
            n = nbytes // 4
            x = torch.ones(n)
            out = torch.empty(n)
            part = torch.empty(n // g)
            ops = {"all_reduce": lambda: dist.all_reduce(x, group=mine),
                   "all_gather": lambda: all_gather_flat(out, x[: n // g].contiguous(), mine),
                   "reduce_scatter": lambda: reduce_scatter_flat(part, x, mine)}
            factor = {"all_reduce": 2 * (g - 1) / g, "all_gather": (g - 1) / g, "reduce_scatter": (g - 1) / g}
            calls = 10 if nbytes <= 2**20 else 3
            for op, fn in ops.items():
                t = _timed(fn, 3, mine, calls=calls) if mine is not None else 0.0
                dist.barrier()
                points[op].append((g, nbytes * factor[op], _slowest(t)))
                if nbytes == SIZES[0]:
                    late = max(_between_work(fn, 3, mine) - t, 0.0) if mine is not None else 0.0
                    dist.barrier()
                    skews[(op, g)] = _slowest(late)
            if g == 2 and mine is not None:  # one way: a round trip between pairs, halved
                peer = rank ^ 1

                def pingpong():
                    if rank % 2 == 0:
                        dist.send(x, peer)
                        dist.recv(x, peer)
                    else:
                        dist.recv(x, peer)
                        dist.send(x, peer)
                t = _timed(pingpong, 3, mine, calls=calls) / 2
            if g == 2:
                dist.barrier()
                points["send_recv"].append((2, nbytes, _slowest(t if mine is not None else 0.0)))
                if nbytes == SIZES[0]:
                    late = max(_between_work(pingpong, 3, mine) / 2 - t, 0.0) if mine is not None else 0.0
                    dist.barrier()
                    skews[("send_recv", 2)] = _slowest(late)
        g *= 2
    return {op: {g: (*_fit([(x, t) for size, x, t in p if size == g]), skews.get((op, g), 0.0))
                 for g in sorted({q[0] for q in p})} for op, p in points.items()}


def _pipeline_overhead(rank: int, world: int) -> dict:
    """Seconds a pipeline stage spends per micro-batch beyond its blocks' compute, under each
    schedule: its own work (ZB-H1 splits each backward in two autograd calls), its sends and
    receives (their latency, and on shared cores the wait for a peer to be scheduled). Pairs of
    ranks run a two-stage pipeline of one tiny layer at 1 and at 16 micro-batches; the
    difference per micro-batch."""
    from torch import nn

    from plait.parallel.pipeline import PipelineStage, StageModule
    from plait.parallel.pipeline.schedules import SCHEDULES

    pairs = [dist.new_group([r, r + 1]) for r in range(0, world - 1, 2)]
    paired = rank < len(pairs) * 2  # an odd world's last rank has no pair: it only joins the world's collectives
    if paired:
        torch.manual_seed(0)
        stage = PipelineStage(StageModule([("layer", nn.Linear(4, 4))]), rank % 2, 2, pairs[rank // 2],
                              loss_fn=lambda out, y: (out - y).square().mean())
        x, y = torch.randn(16, 4), torch.randn(16, 4)
    cost = {}
    for schedule in SCHEDULES:
        per_micro = 0.0
        if paired:
            times = {m: _timed(lambda m=m: stage.step(x, y, m, schedule), 5, pairs[rank // 2]) for m in (1, 16)}
            per_micro = max(times[16] - times[1], 0.0) / 15
        dist.barrier()
        cost[schedule] = _slowest(per_micro)
    return cost


def _compute(cfg, profile, rank: int, world: int, trained: float):
    """(rate FLOP/s, seconds per operation, seconds per batch fetched, the optimizer step's
    memory bandwidth, its fixed cost per tensor, and recomputation's cost per forward)."""
    from torch.utils.data import DataLoader

    from plait.models import build_model
    from plait.train.tasks import build_task

    task = build_task(cfg.data.name, cfg.data.path, cfg.data.args, cfg.train.loss)
    share = max(1, cfg.train.batch_size // world)
    loader = DataLoader(task.train, batch_size=share, shuffle=True, collate_fn=task.collate, drop_last=True)
    if not len(loader):
        loader = DataLoader(task.train, batch_size=len(task.train), collate_fn=task.collate)
    x, y = next(iter(loader))  # warm-up
    fetched, start = 0, time.perf_counter()
    while fetched < 3:  # a fresh pass when a small dataset runs out
        for x, y in loader:
            fetched += 1
            if fetched == 3:
                break
    fetch = (time.perf_counter() - start) / 3
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.args, task.info)
    from plait.parallel.compose import Layout

    chain = Layout(blocks=cfg.pipeline.blocks).chain(model)
    flops_per_sample = sum(b.flops for b in profile.blocks) * (1 + profile.backward_ratio)
    ops = sum(b.ops for b in profile.blocks) * (1 + profile.backward_ops_ratio)
    points = []
    # one sample (what a pipeline of as many micro-batches as samples runs) up to the whole batch
    sizes = sorted({1, max(1, share // 8), max(1, share // 2), share, cfg.train.batch_size,
                    *(2**i for i in range(cfg.train.batch_size.bit_length()))})  # and every power of two
    for b in sizes:
        xs, ys = x[:b], y[:b]
        if len(xs) < b:
            xs, ys = torch.cat([x] * (b // len(x) + 1))[:b], torch.cat([y] * (b // len(y) + 1))[:b]

        t = _slowest(_timed(_step(model, chain, task, xs, ys), 9))
        points.append((flops_per_sample * b, t))
        if b == share:
            plain = t
    # t = flops / rate + the intercept: the weights streamed from memory once forward and twice
    # backward (whatever the batch), and a fixed cost per operation (what is left of it)
    overhead, rate = _fit(points)
    recompute = _recompute_factor(model, chain, task, plain, x[:share], y[:share])
    # measured after the base memory (its tensors are not the runtime's) and the blocks' times
    bandwidth, per_tensor = _optimizer(cfg, list(model.parameters()), trained)
    op_cost, weights_bandwidth = split_intercept(overhead, 3 * 4 * profile.params, ops, bandwidth)
    scale = {b: t / (overhead + x / rate) for b, (x, t) in zip(sizes, points)}  # where the line misses
    return rate, op_cost, _slowest(fetch), bandwidth, per_tensor, recompute, weights_bandwidth, scale


def split_intercept(overhead: float, weight_bytes: float, ops: int, bandwidth: float) -> tuple[float, float]:
    """(seconds per operation, the bandwidth the weights are read at) from the fit's fixed part
    ``overhead``: the ``weight_bytes`` a forward and backward read at the optimizer's
    ``bandwidth``, and what is left over the ``ops`` operations. Where the fixed part is smaller
    than those reads, the blocks read their weights faster than the optimizer streams (a matrix
    product reads each weight once, in order; on shared cores not every process reads at once):
    the reads are the whole fixed part, at the bandwidth that makes them so, and an operation
    costs nothing beyond them."""
    weights = weight_bytes / bandwidth
    if overhead >= weights:
        return (overhead - weights) / max(ops, 1), bandwidth
    return 0.0, weight_bytes / max(overhead, weights * 1e-3)  # at most 1000x the optimizer's


def _step(model, chain, task, xs, ys):
    """One forward and backward of the model's blocks on ``xs``, as the trainer steps: gradients
    set to None, allocated again by backward."""
    from plait.plan.profile import run_chain

    def step():
        model.zero_grad(set_to_none=True)
        task.loss(run_chain(model, chain, xs), ys).backward()
    return step


def _recompute_factor(model, chain, task, plain: float, xs, ys) -> float:
    """What recomputation adds to a step, as a share of the forward (1: one more forward): the
    blocks recomputed as the trainer does (``train.recompute``) at one rank's batch ``xs``,
    against the same step without (``plain``) and its forward alone."""
    from plait.parallel.recompute import recompute_blocks
    from plait.plan.profile import run_chain

    forward = _slowest(_timed(lambda: task.loss(run_chain(model, chain, xs), ys), 5))
    own = [block.__dict__.get("forward") for _, block in chain.blocks]
    recompute_blocks(chain.blocks)
    try:
        again = _slowest(_timed(_step(model, chain, task, xs, ys), 5))
    finally:
        for (_, block), forward_before in zip(chain.blocks, own):
            if forward_before is None:
                del block.forward  # the class's own again
            else:
                block.forward = forward_before
    return max(again - plain, 0.0) / max(forward, 1e-9)


def _trained(config: str, overrides: list[str], cfg, profile, info, zero: int = 0) -> tuple[float, float]:
    """A few steps of the config trained data-parallel on every process (with ZeRO stage
    ``zero``), the trainer's own code (its start-up, imports, data, process groups, run log, the
    FLOP/s it measures for MFU): (what a process holds besides its model's tensors: the largest
    rank's peak resident memory while training less the bytes the cost model counts for that
    layout's tensors; the slowest rank's optimizer span per step). Where the batch does not
    split over every process: the memory after the trainer's imports and a plot
    (``_imported_memory``), and no span (0)."""
    import tempfile

    from plait.plan import workload
    from plait.plan.cluster import Cluster, Link
    from plait.plan.cost import Candidate, estimate
    from plait.plan.measure import QUIET
    from plait.train.config import load_config
    from plait.train.trainer import Trainer

    world = info.world_size
    if cfg.train.batch_size % (world * cfg.train.accum_steps):
        return _imported_memory(cfg), 0.0
    steps = 8  # logged every 4: the figures of the last 4, the first (the optimizer's state made) left out
    peak = span = 0.0
    with tempfile.TemporaryDirectory(prefix="plait-calibrate-") as tmp:
        sets = [*overrides, *QUIET, f"parallel.dp={world}", "parallel.pp=1", "parallel.tp=1", f"parallel.zero={zero}",
                "parallel.reshard_after_forward=true", f"train.steps={steps}", f"run.log_every={steps // 2}",
                f'run.out_dir="{tmp}"', 'run.name="calibrate"']
        trainer = Trainer(load_config(config, sets), info)
        trainer.fit()
        if trainer.log:  # rank 0 logs every rank's figures of the last steps
            per_rank = trainer.log.records[-1]["per_rank"]
            peak, span = max(per_rank["peak_memory_bytes"]), max(per_rank["time_optimizer_s"])
    got = torch.tensor([peak, span], dtype=torch.float64)
    dist.all_reduce(got, op=dist.ReduceOp.MAX)  # rank 0's, on every rank
    nothing = Cluster("", world, 1.0, {"fp32": 1.0}, Link(0.0, 1.0), Link(0.0, 1.0))
    counted = estimate(profile, nothing, workload(cfg), Candidate(world, 1, 1, zero=zero)).memory_bytes
    return max(got[0].item() - counted, 0.0), got[1].item()


def _zero3_base(config: str, overrides: list[str], cfg, profile, info) -> float | None:
    """What a ZeRO-3 process holds besides its model's tensors: on glibc less than data
    parallelism's, as ``plait train`` has freed blocks of 4 MiB and more go back to the system
    for ZeRO-3 (``return_freed_memory``) while data parallelism's heap keeps the gradients it
    freed. The config trained a few steps with ZeRO-3 on every process, in processes of their
    own (the peak resident memory and the allocator's threshold last as long as the process).
    None where the model cannot run ZeRO-3 (weights tied across its blocks, no blocks) or the
    batch does not split over every process."""
    from plait.errors import PlaitError

    if info.world_size < 2 or cfg.train.batch_size % (info.world_size * cfg.train.accum_steps):
        return None
    try:
        return _trained(config, overrides, cfg, profile, info, zero=3)[0]
    except PlaitError:  # the same check fails on every rank, before any collective of the run
        return None


def _imported_memory(cfg) -> float:
    """The resident memory of a training process before its model: what it imports (the trainer,
    TensorBoard, the loss plot's matplotlib), the CPU's FLOP/s measurement the trainer makes for
    MFU, with the data loaded and the process group up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - what the run log imports

    import plait.train.trainer  # noqa: F401
    from plait.observe.breakdown import peak_rss
    from plait.observe.flops import measured_peak

    figure = plt.figure()
    plt.plot([0, 1])
    figure.canvas.draw()
    plt.close(figure)
    if not cfg.run.peak_flops:
        measured_peak(torch.device("cpu"), cfg.train.bf16, torch.get_num_threads())
    return peak_rss()


def _optimizer(cfg, params: list, trained: float) -> tuple[float, float]:
    """The trainer's optimizer span (the gradient-norm clip when the config clips, then the
    config's optimizer's step), every process at once on one flat tensor of the model's size (as
    ZeRO steps; at least 1M elements): the bytes per second it streams; and the fixed cost per
    parameter tensor, what the trainer's own span (``trained``: its seconds per step under
    dp=world, each rank stepping every parameter) takes beyond its bytes (a CPU optimizer and
    the clip loop over the tensors, a few operations each). Without a trained span, that of a
    stand-in for the trainer's on the model's own parameters."""
    from plait.plan import workload
    from plait.plan.cost import optimizer_bytes
    from plait.train.trainer import build_optimizer

    work = workload(cfg)
    per_element = optimizer_bytes(work.optimizer, work.grad_clip)

    def span(tensors: list) -> float:
        for t in tensors:
            t.grad = torch.ones_like(t)
        optimizer = build_optimizer(cfg.train, tensors)

        def run():
            if work.grad_clip:  # as Parallelized.grad_norm and the trainer: float64 squares, scaled in place
                square = torch.stack([t.grad.double().square().sum() for t in tensors]).sum()
                torch._foreach_mul_([t.grad for t in tensors], min(1.0, cfg.train.grad_clip / (square.sqrt().item() + 1e-6)))
            optimizer.step()
        return _slowest(_timed(run, 15))

    own = [p for p in params if p.requires_grad]
    n = sum(p.numel() for p in own)
    flat = max(n, 2**20)  # a tiny model's step is all fixed cost: its bytes say nothing of bandwidth
    bandwidth = per_element * flat / span([torch.nn.Parameter(torch.zeros(flat))])
    left = (trained or span(own)) - n * per_element / bandwidth
    return bandwidth, max(left, 0.0) / max(len(own), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plait.plan.calibrate")
    parser.add_argument("config")
    parser.add_argument("output")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zero3-only", action="store_true", help="only ZeRO-3's runtime memory, as JSON to OUTPUT")
    parser.add_argument("--zero3-from", help="ZeRO-3's runtime memory, from a --zero3-only run")
    args = parser.parse_args(argv)
    from plait.distributed.env import init, shutdown
    from plait.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    info = init(cfg.dist.backend, "cpu", cfg.dist.timeout)
    rank, world = info.rank, info.world_size
    from plait.plan.profile import profile_config

    profile, _ = profile_config(cfg)  # the model on the meta device: the same every round
    if args.zero3_only:
        zero3 = _zero3_base(args.config, args.overrides, cfg, profile, info)
        if rank == 0:
            with open(args.output, "w") as f:
                json.dump(zero3, f)
        shutdown()
        return 0
    base, trained = _trained(args.config, args.overrides, cfg, profile, info)  # first: nothing else measured has run yet
    rounds = [(_compute(cfg, profile, rank, world, trained), _links(rank, world, dist.get_backend()) if world > 1 else {},
               _pipeline_overhead(rank, world) if world > 1 else {}) for _ in range(args.rounds)]
    (rate, op_cost, fetch, bandwidth, per_tensor, recompute, weights_bandwidth, scale), links, per_micro = _median(rounds)
    if rank == 0:
        zero3 = None
        if args.zero3_from:
            with open(args.zero3_from) as f:
                zero3 = json.load(f)
        write(args.output, world, rate, op_cost, base, fetch, (bandwidth, per_tensor, weights_bandwidth), links,
              args.config, per_micro, recompute, zero3, scale)
    shutdown()
    return 0


def _median(rounds):
    """Each figure's median over the rounds, the rounds' structure kept (tuples, dicts of them)."""
    first = rounds[0]
    if isinstance(first, dict):
        return {key: _median([r[key] for r in rounds]) for key in first}
    if isinstance(first, tuple):
        return tuple(_median([r[i] for r in rounds]) for i in range(len(first)))
    return statistics.median(rounds)


def write(path: str, world: int, rate: float, op_cost: float, base: float, fetch: float, optimizer: tuple,
          links: dict, config: str, per_micro: dict, recompute: float = 1.0, zero3: float | None = None,
          scale: dict | None = None) -> None:
    """``optimizer``: (bytes per second streamed, fixed seconds per tensor, and the bytes per
    second the blocks' passes read their weights at); ``zero3``: the runtime memory of a ZeRO-3
    process (None: not measured)."""
    bandwidth, per_tensor, weights_bandwidth = optimizer
    zero3_line = (f"zero3_base_memory_bytes = {zero3:.4g}  # the same with ZeRO-3 (freed blocks of 4 MiB and more "
                  "returned; its own processes)" if zero3 is not None
                  else "# zero3_base_memory_bytes: not measured (the model or batch does not run ZeRO-3 here)")
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cores = os.cpu_count() or 1
    when = time.strftime("%Y-%m-%d %H:%M")
    lines = [f"# Measured by plait calibrate {config} --nproc {world} on {when}: {cores} cores, "
             f"{pages / 2**30:.0f} GiB, {world} processes at once.",
             f'name = "this machine, {world} CPU processes (gloo over loopback)"',
             f"devices_per_node = {world}",
             f"memory_bytes = {pages / world:.4g}          # the host's memory shared by the processes",
             f"base_memory_bytes = {base:.4g}     # a training process besides its model's tensors (dp={world}, a few steps)",
             zero3_line,
             f"memory_bandwidth = {bandwidth:.4g}      # the optimizer step (and clip) on the model's elements, flat (at least 1M)",
             f"weights_bandwidth = {weights_bandwidth:.4g}     # the blocks' passes reading their weights: the bandwidth above, "
             "or faster where the fit's fixed part is smaller than those reads",
             f"optimizer_tensor_s = {per_tensor:.4g}   # and per tensor: the trainer's own span (dp={world}) beyond its bytes",
             f"op_overhead_s = {op_cost:.4g}         # fitted with the rate below on the model's blocks, less the weights' reads",
             f"step_overhead_s = {fetch:.4g}       # fetching one rank's batch",
             "microbatch_overhead_s = { " + ", ".join(f"{k} = {v:.4g}" for k, v in per_micro.items())
             + " }  # a pipeline stage's own cost per micro-batch, by schedule (two tiny stages)"
             if per_micro else "microbatch_overhead_s = 0.0",
             f"recompute_factor = {recompute:.4g}     # what recomputation adds, as a share of the forward",
             "pass_scale = { " + ", ".join(f'"{b}" = {r:.4g}' for b, r in sorted((scale or {}).items()))
             + " }  # samples per micro-batch -> the blocks' time measured there over the fitted line",
             "overlap = 0.0                # gloo runs on the same cores as backward",
             f"cores = {cores if cores < world else 0}                    # the processes share these cores",
             "",
             "[flops]",
             f"fp32 = {rate:.4g}                 # the model's blocks, forward and backward, every process at once",
             ""]
    latency, bw, skew = links["all_reduce"][max(links["all_reduce"])] if links else (100e-6, 1e9, 0.0)
    lines += ["[intra]", f"latency_s = {latency:.4g}", f"bandwidth = {bw:.4g}", f"skew_s = {skew:.4g}"]
    for op, sizes in links.items():
        entries = ", ".join(f"{{ group = {g}, latency_s = {lat:.4g}, bandwidth = {b:.4g}, skew_s = {k:.4g} }}"
                            for g, (lat, b, k) in sizes.items())
        lines.append(f"{op} = [{entries}]")
    lines += ["", "[inter]                      # one host: no links across nodes were measured",
              f"latency_s = {latency:.4g}", f"bandwidth = {bw:.4g}", f"skew_s = {skew:.4g}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"plait: calibrated {world} processes -> {path}", flush=True)


def calibrate(config: str, overrides: list[str], nproc: int, output: str, rounds: int = 3) -> None:
    """Run the measurement on ``nproc`` local processes, ``rounds`` times (each figure's median);
    the cluster file goes to ``output``."""
    from plait.launch import LaunchSpec, launch
    from plait.train.config import load_config

    load_config(config, overrides)  # a bad config: one line before any process starts
    sets = [a for o in overrides for a in ("--set", o)]
    with tempfile.TemporaryDirectory(prefix="plait-calibrate-") as tmp:
        zero3 = os.path.join(tmp, "zero3.json")
        launch(LaunchSpec(nproc=nproc, run_id="calibrate-zero3", module="plait.plan.calibrate",
                          module_args=[config, zero3, "--zero3-only", *sets], huge_pages=True))
        module_args = [config, os.path.abspath(output), "--rounds", str(rounds), "--zero3-from", zero3, *sets]
        launch(LaunchSpec(nproc=nproc, run_id="calibrate", module="plait.plan.calibrate", module_args=module_args))


if __name__ == "__main__":
    sys.exit(main())
