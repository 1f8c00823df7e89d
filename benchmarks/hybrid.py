"""Plait's composition of layouts beside PyTorch's own, on 4 processes, in one run.

    .venv/bin/python benchmarks/hybrid.py                    # dp2 x tp2, pp2 x tp2, ZeRO-3 x tp2; 3 rounds
    .venv/bin/python benchmarks/hybrid.py --dim 384 --rounds 5

The same GPT (plait.models.GPT) on the same random tokens, one thread per process, SGD.
Plait: ``plait.parallel.compose.parallelize`` with the GPT's plan and the vocab-parallel loss.
PyTorch: DTensor ``parallelize_module`` for tp (the plan of benchmarks/tensor_parallel.py), then
``replicate`` (composable DDP) on dp, or ``fully_shard`` (FSDP2) on each block and the root for
ZeRO-3, with ``loss_parallel()``; for pp, each rank builds its stage of the GPT (embeddings and
the first half of the blocks, or the rest with the head), tensor-parallel, run by
``torch.distributed.pipelining``'s ``Schedule1F1B`` with 4 micro-batches (its loss function runs
outside a ``loss_parallel`` context, so the head's output is gathered there).
Prints the median step time of each (the slowest rank's) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.models import GPT
from plait.testing import World
from tensor_parallel import BATCH, BLOCK, VOCAB, interleave_qkv

LAYOUTS = {"dp2 x tp2": dict(dp=2, pp=1, tp=2, zero=0), "pp2 x tp2": dict(dp=1, pp=2, tp=2, zero=0),
           "ZeRO-3 x tp2": dict(dp=2, pp=1, tp=2, zero=3)}
MICROBATCHES = 4


def build(dim: int, layers: int) -> GPT:
    torch.manual_seed(0)
    return GPT(VOCAB, BLOCK, layers=layers, heads=8, dim=dim)


def plait_step(layout: dict, dim: int, layers: int):
    from plait.distributed.mesh import Mesh
    from plait.parallel.compose import Layout, parallelize

    mesh = Mesh(layout["dp"], layout["pp"], layout["tp"])
    lay = Layout(**layout, microbatches=MICROBATCHES if layout["pp"] > 1 else 1)
    par = parallelize(build(dim, layers), mesh, lay, None)
    opt = torch.optim.SGD(par.parameters(), lr=0.01)
    par.attach(opt)
    local = BATCH // layout["dp"]

    def step(ids, target):
        opt.zero_grad()
        par.step(ids[:local], target[:local])
        opt.step()
    return step


class _Stage(nn.Module):
    """A run of the GPT's blocks, with the embeddings on the first stage and the head on the last."""

    def __init__(self, model: GPT, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
        if last:
            self.ln_f, self.head = model.ln_f, model.head

    def forward(self, x):
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)) if self.last else x


def _tp_plan(blocks: range, tp_head_output, embed: bool, head: bool) -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    if embed:
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate())
    if head:
        plan["head"] = tp_head_output
    for i in blocks:
        plan |= {f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                 f"blocks.{i}.mlp.up": ColwiseParallel(), f"blocks.{i}.mlp.down": RowwiseParallel()}
    return plan


def torch_step(layout: dict, dim: int, layers: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    dp, pp, tp = layout["dp"], layout["pp"], layout["tp"]
    mesh = init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
    model = build(dim, layers)
    interleave_qkv(model, tp)
    local = BATCH // dp
    if pp == 1:
        plan = _tp_plan(range(layers), ColwiseParallel(output_layouts=Shard(-1), use_local_output=False), True, True)
        parallelize_module(model, mesh["tp"], plan)
        if layout["zero"] == 3:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        else:
            from torch.distributed._composable.replicate import replicate

            replicate(model, device_mesh=mesh["dp"])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(ids, target):
            opt.zero_grad()
            with loss_parallel():
                F.cross_entropy(model(ids[:local]).flatten(0, 1), target[:local].flatten()).backward()
            opt.step()
        return step

    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    s = mesh["pp"].get_local_rank()
    half = layers // 2
    lo, hi = (0, half) if s == 0 else (half, layers)
    stage_module = _Stage(model, lo, hi, s == 0, s == pp - 1)
    plan = _tp_plan(range(hi - lo), ColwiseParallel(output_layouts=Replicate()), s == 0, s == pp - 1)
    parallelize_module(stage_module, mesh["tp"], plan)
    stage = PipelineStage(stage_module, s, pp, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = Schedule1F1B(stage, MICROBATCHES,
                            loss_fn=lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()))
    opt = torch.optim.SGD(stage_module.parameters(), lr=0.01)

    def step(ids, target):
        opt.zero_grad()
        if s == 0:
            schedule.step(ids)
        else:
            schedule.step(target=target, losses=[])
        opt.step()
    return step


def time_impl(impl: str, layout: dict, dim: int, layers: int, warmup: int, steps: int) -> float:
    """Median seconds per step of the slowest rank."""
    step = (plait_step if impl == "plait" else torch_step)(layout, dim, layers)
    gen = torch.Generator().manual_seed(0)
    ids, target = (torch.randint(0, VOCAB, (BATCH, BLOCK), generator=gen) for _ in range(2))
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        step(ids, target)
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(elapsed.item())
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    samples = {(name, impl): [] for name in LAYOUTS for impl in ("plait", "torch")}
    with World(4, timeout_s=300) as world:
        for _ in range(args.rounds):
            for name, impl in samples:
                seconds = world.run(time_impl, impl, LAYOUTS[name], args.dim, args.layers, 2, args.steps)[0]
                samples[name, impl].append(seconds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    params = sum(p.numel() for p in build(args.dim, args.layers).parameters())
    tokens = BATCH * BLOCK
    print(f"\n4 processes, GPT {params / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, vocab {VOCAB}), "
          f"global batch {BATCH} x {BLOCK} tokens, SGD; median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'layout':13} | {'plait ms':>8} | {'torch ms':>8} | {'plait/torch speed':>17}")
    for name in LAYOUTS:
        p, t = med[name, "plait"], med[name, "torch"]
        print(f"{name:13} | {p * 1e3:8.1f} | {t * 1e3:8.1f} | {t / p:17.2f}")
    print(f"(tokens per step: {tokens}; > 1: Plait is faster)")


if __name__ == "__main__":
    main()
