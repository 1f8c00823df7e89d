"""ZeRO stages 1-3 beside DDP, FSDP2 (``torch.distributed.fsdp.fully_shard``) and DeepSpeed's
ZeRO-2 and ZeRO-3, in one run.

    .venv/bin/python benchmarks/zero.py                   # speed and memory, then the 50M memory report
    .venv/bin/python benchmarks/zero.py --skip-report
    make deepspeed                                        # DeepSpeed into .venv, for the ds2 and ds3 modes

DeepSpeed runs on the CPU over gloo with its defaults for each stage (``overlap_comm`` on, its
bucket and prefetch sizes as shipped) and the same ``torch.optim.Adam`` (``zero_allow_untested_optimizer``:
its fused Adam is a compiled op). Without DeepSpeed installed its modes are left out, and said so.

World size 2, one thread per process, the 10M-parameter MLP of benchmarks/data_parallel.py,
per-worker batch 32, Adam (``zero3-serial``: stage 3 without prefetch, each unit gathered only
when its pass needs it; ``zero3-train``: stage 3 with ``plait train``'s allocator settings,
freed blocks of 4 MiB and more returned to the system and tensors of 2 MiB and more on huge
pages, where the other modes keep glibc's defaults; ``zero3-keep-train``: the same with
``reshard_after_forward=False``, each unit kept whole from its forward into its backward, beside
``fsdp2-keep``, FSDP2's same option). Each mode runs in fresh processes (peak
resident memory is a per-process high-water mark): median step time over timed steps, samples/s, and the peak RSS
of rank 0 above what the process held before building the model.

The report then builds a ~50M-parameter MLP under each stage and prints the bytes each rank
holds in parameters, gradients and Adam state at steady state (after a step) and at the end of
backward, beside the paper's per-device formula for fp32 with Adam: 16 bytes per parameter
replicated; stage 1: 4+4+8/N; stage 2: 4+(4+8)/N; stage 3: 16/N.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from plait.models import mlp
from plait.parallel.zero import Zero
from plait.testing import World
from plait.train.trainer import return_freed_memory

MODES = ("ddp", "fsdp2", "fsdp2-keep", "ds2", "ds3", "zero1", "zero2", "zero3", "zero3-serial", "zero3-train",
         "zero3-keep-train")
TRAIN_ALLOCATOR = ("zero3-train", "zero3-keep-train")  # plait train's allocator settings for ZeRO-3
DEEPSPEED = ("ds2", "ds3")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def deepspeed_step(stage: int, model: nn.Module, batch: int):
    """One training step of DeepSpeed's ZeRO ``stage`` on ``model``, as a function of (x, y)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # its calls of torch's renamed collectives
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "overlap_comm": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 2**31}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-4),
                                      config=config)

    def step(x, y):
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()  # zeroes the gradients too

    return step


def wrap(mode: str, model: nn.Module):
    """(model to call, parameters to optimize, hook after building the optimizer)."""
    if mode == "ddp":
        model = DistributedDataParallel(model)
        return model, list(model.parameters()), lambda opt: None
    if mode.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        reshard = mode != "fsdp2-keep"
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        return model, list(model.parameters()), lambda opt: None
    stage = int(mode[4])  # zero3-serial: stage 3 without prefetch, each unit gathered when needed
    zero = Zero(model, stage=stage, prefetch=not mode.endswith("serial"), reshard_after_forward="keep" not in mode)
    return zero, zero.shard_parameters(), zero.attach


def speed(mode: str, batch: int, warmup: int, steps: int) -> tuple[float, float]:
    if mode in TRAIN_ALLOCATOR:  # as the trainer does, before the model (its processes started on huge pages)
        return_freed_memory()
    before = rss_mb()
    torch.manual_seed(0)
    if mode in DEEPSPEED:
        step = deepspeed_step(int(mode[-1]), mlp(784, 10, hidden=2048, depth=3), batch)
    else:
        model, params, attach = wrap(mode, mlp(784, 10, hidden=2048, depth=3))
        opt = torch.optim.Adam(params, lr=1e-4)
        attach(opt)

        def step(x, y):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        step(x, y)
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(elapsed.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return statistics.median(times), peak - before


def memory_report(stage: int, width: int) -> tuple[dict, dict, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    zero = Zero(model, stage=stage)
    opt = torch.optim.Adam(zero.shard_parameters(), lr=1e-4)
    zero.attach(opt)
    F.cross_entropy(zero(torch.randn(4, width)), torch.randint(0, width, (4,))).backward()
    opt.step()
    steady = zero.memory(opt)
    peak = {**zero.peak, "optimizer": steady["optimizer"]}
    return steady, peak, sum(u.size * u.world for u in zero.units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="every mode once per round, modes interleaved")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--skip-report", action="store_true")
    parser.add_argument("--width", type=int, default=4096, help="report model: 3 square layers of this width")
    args = parser.parse_args()
    if not has_deepspeed() and any(m in DEEPSPEED for m in args.modes):
        print("DeepSpeed is not installed (`make deepspeed`): its modes ds2 and ds3 are left out")
        args.modes = [m for m in args.modes if m not in DEEPSPEED]
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in args.modes}
    for _ in range(args.rounds):  # every mode in each round: the machine's drift touches all alike
        for mode in args.modes:
            if mode in TRAIN_ALLOCATOR:  # read at a process's start: the spawned workers inherit it
                os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
            else:
                os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
            with World(2, timeout_s=600) as world:
                runs[mode].append(world.run(speed, mode, args.batch, 5, args.steps, timeout=1800)[0])
    os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
    results = {mode: (statistics.median(s for s, _ in r), statistics.median(m for _, m in r)) for mode, r in runs.items()}
    base = results.get("ddp", (None,))[0]
    print(f"\nworld size 2, 10M-parameter MLP, Adam, batch {args.batch}/worker, "
          f"medians of {args.rounds} rounds of {args.steps} steps' medians")
    print(f"{'mode':16} | {'ms/step':>8} | {'samples/s':>9} | {'vs DDP':>6} | {'peak RSS MB (rank 0)':>20}")
    for mode, (seconds, peak) in results.items():
        ratio = f"{base / seconds:6.2f}" if base else "     -"
        print(f"{mode:16} | {seconds * 1e3:8.1f} | {2 * args.batch / seconds:9.0f} | {ratio} | {peak:20.0f}")
    for peer, mine in (("fsdp2", "zero3"), ("ds2", "zero2"), ("ds3", "zero3"), ("zero3-serial", "zero3"),
                       ("zero3", "zero3-train"), ("fsdp2-keep", "zero3-keep-train"),
                       ("zero3-train", "zero3-keep-train")):
        if peer in results and mine in results:
            print(f"{mine} / {peer} speed ratio: {results[peer][0] / results[mine][0]:.2f}; "
                  f"peak memory: {results[mine][1]:.0f} vs {results[peer][1]:.0f} MB")
    if args.skip_report:
        return
    formula = {1: (4, 4, 8 / 2), 2: (4, 4 / 2, 8 / 2), 3: (4 / 2, 4 / 2, 8 / 2)}
    print(f"\nbytes per rank, world size 2, Adam, {3 * (args.width ** 2 + args.width) / 1e6:.1f}M parameters "
          "(steady: after a step; peak: end of backward)")
    print(f"{'stage':5} | {'params MB':>9} | {'grads MB':>8} | {'optim MB':>8} | {'total MB':>8} | "
          f"{'formula MB':>10} | {'ratio':>5} | {'peak total MB':>13}")
    with World(2, timeout_s=600) as world:
        for stage in (1, 2, 3):
            steady, peak, padded = world.run(memory_report, stage, args.width, timeout=1800)[0]
            total, expected = sum(steady.values()), sum(formula[stage]) * padded
            print(f"{stage:5} | {steady['params'] / 2**20:9.1f} | {steady['grads'] / 2**20:8.1f} | "
                  f"{steady['optimizer'] / 2**20:8.1f} | {total / 2**20:8.1f} | {expected / 2**20:10.1f} | "
                  f"{total / expected:5.2f} | {sum(peak.values()) / 2**20:13.1f}")


if __name__ == "__main__":
    main()
