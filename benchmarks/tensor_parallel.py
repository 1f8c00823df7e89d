"""Plait's tensor parallelism beside PyTorch's own (DTensor ``parallelize_module``), in one run.

    .venv/bin/python benchmarks/tensor_parallel.py                 # tp=2, 5 rounds
    .venv/bin/python benchmarks/tensor_parallel.py --dim 384 --layers 6

The same GPT (plait.models.GPT: fused q/k/v, pre-norm blocks) split the Megatron way on 2 ranks,
one thread per process, SGD, random tokens. Plait: its plan and vocab-parallel loss. PyTorch:
``ColwiseParallel`` on qkv and the MLP's up-projection, ``RowwiseParallel`` on the output
projections and the embedding, the head colwise with its output left split and
``loss_parallel()`` for the loss. (For DTensor's contiguous split of the fused qkv to hand each
rank its own heads' q, k and v, its rows are interleaved first: both compute the unsplit model.)

Also counts the bytes Plait all-reduces per step, against Megatron's count: per block two
all-reduces of the [B, T, D] activations forward and two backward, plus the embedding's forward
and the head input's backward, plus three [B*T] vectors for the loss.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from plait.models import GPT
from plait.parallel.tensor import CommCounter, parallelize, vocab_parallel_cross_entropy
from plait.testing import World

VOCAB, BLOCK, BATCH = 160, 64, 16


def build(dim: int, layers: int) -> GPT:
    torch.manual_seed(0)
    return GPT(VOCAB, BLOCK, layers=layers, heads=8, dim=dim)


def interleave_qkv(model: GPT, tp: int) -> None:
    """Reorder qkv's rows to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] so a contiguous split per rank
    gives each rank its heads' q, k and v."""
    for block in model.blocks:
        for name in ("weight", "bias"):
            t = getattr(block.attn.qkv, name)
            parts = [p.chunk(tp) for p in t.data.chunk(3)]
            t.data = torch.cat([parts[k][r] for r in range(tp) for k in range(3)])


def torch_tp(model: GPT, tp: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    interleave_qkv(model, tp)
    mesh = init_device_mesh("cpu", (tp,))
    plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in range(len(model.blocks)):
        plan |= {f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                 f"blocks.{i}.mlp.up": ColwiseParallel(), f"blocks.{i}.mlp.down": RowwiseParallel()}
    return parallelize_module(model, mesh, plan)


def step_fn(impl: str, model: GPT, tp: int):
    group = dist.group.WORLD
    if impl == "plait":
        parallelize(model, GPT.tp_plan(), group)

        def loss_of(ids, target):
            return vocab_parallel_cross_entropy(model(ids).flatten(0, 1), target.flatten(), group)
    else:
        from torch.distributed.tensor.parallel import loss_parallel

        torch_tp(model, tp)

        def loss_of(ids, target):
            with loss_parallel():
                loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten())
                loss.backward()
            return None
    return loss_of


def time_impl(impl: str, dim: int, layers: int, warmup: int, steps: int) -> tuple[float, int, int]:
    """Median seconds per step; for Plait also the bytes and calls all-reduced in one step."""
    tp = dist.get_world_size()
    model = build(dim, layers)
    loss_of = step_fn(impl, model, tp)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    ids, target = torch.randint(0, VOCAB, (BATCH, BLOCK), generator=gen), torch.randint(0, VOCAB, (BATCH, BLOCK), generator=gen)
    times, counted = [], CommCounter()
    for i in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        with counted if i == warmup and impl == "plait" else _nothing():
            loss = loss_of(ids, target)
            if loss is not None:
                loss.backward()
        opt.step()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(elapsed.item())
    return statistics.median(times), counted.allreduce_bytes, counted.allreduce_calls


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    samples = {"plait": [], "torch": []}
    with World(2, timeout_s=300) as world:
        for _ in range(args.rounds):
            for impl in samples:
                seconds, nbytes, calls = world.run(time_impl, impl, args.dim, args.layers, 3, args.steps)[0]
                samples[impl].append(seconds)
                if impl == "plait":
                    measured = (nbytes, calls)
    med = {k: statistics.median(v) for k, v in samples.items()}
    params = sum(p.numel() for p in build(args.dim, args.layers).parameters())
    tokens = BATCH * BLOCK
    btd = tokens * args.dim * 4
    theory = 4 * args.layers * btd + 2 * btd + 3 * tokens * 4
    print(f"\ntp=2, GPT {params / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, vocab {VOCAB}), "
          f"batch {BATCH} x {BLOCK} tokens, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'impl':6} | {'ms/step':>8} | {'tokens/s':>9}")
    for impl, seconds in med.items():
        print(f"{impl:6} | {seconds * 1e3:8.1f} | {tokens / seconds:9.0f}")
    print(f"speed ratio plait/torch: {med['torch'] / med['plait']:.3f} (> 1: Plait is faster)")
    print(f"Plait all-reduced {measured[0] / 1e6:.3f} MB in {measured[1]} calls per step; Megatron's count: "
          f"{theory / 1e6:.3f} MB in {4 * args.layers + 2 + 3} calls")


if __name__ == "__main__":
    main()
