"""Activation recomputation: Plait's ``train.recompute`` beside torch's own ``checkpoint_wrapper``
(``apply_activation_checkpointing``) on the same blocks, and beside no recomputation, in one run.

    .venv/bin/python benchmarks/recompute.py                 # GPT dim 256, 4 layers, 16 x 128 tokens
    .venv/bin/python benchmarks/recompute.py --rounds 3 --dim 128

One process, one thread. Per mode: the median step time (forward, backward, SGD step) over
interleaved rounds, and the bytes autograd keeps for backward during one forward (its saved
tensors, counted by a ``saved_tensors_hooks`` pair).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, apply_activation_checkpointing,
                                                                         checkpoint_wrapper)

from plait.models.gpt import GPT
from plait.parallel.recompute import recompute_blocks

MODES = ("kept", "plait", "torch")


def build(mode: str, args) -> GPT:
    torch.manual_seed(0)
    model = GPT(vocab_size=96, block_size=args.tokens, layers=args.layers, heads=4, dim=args.dim)
    blocks = {id(m) for name, m in model.pipeline_blocks() if name.startswith("blocks.")}
    if mode == "plait":
        recompute_blocks([(n, m) for n, m in model.pipeline_blocks() if id(m) in blocks])
    elif mode == "torch":
        apply_activation_checkpointing(model, partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                                       check_fn=lambda m: id(m) in blocks)
    return model


def step_time(model: GPT, x, y, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def saved_bytes(model: GPT, x) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 96, (args.batch, args.tokens), generator=gen)
    y = torch.randint(0, 96, (args.batch, args.tokens), generator=gen)
    models = {m: build(m, args) for m in MODES}
    times = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for m in MODES:
            times[m].append(step_time(models[m], x, y, args.steps))
    med = {m: statistics.median(v) for m, v in times.items()}
    saved = {m: saved_bytes(models[m], x) for m in MODES}
    print(f"GPT dim {args.dim}, {args.layers} layers, {args.batch} x {args.tokens} tokens, 1 thread, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'mode':6} | {'step ms':>8} | {'saved MB':>8}")
    for m in MODES:
        print(f"{m:6} | {med[m] * 1e3:8.1f} | {saved[m] / 1e6:8.2f}")
    print(f"plait/torch step time {med['torch'] / med['plait']:.3f} (peer time / Plait time), "
          f"plait/kept saved bytes {saved['plait'] / saved['kept']:.3f}, torch/kept {saved['torch'] / saved['kept']:.3f}")


if __name__ == "__main__":
    main()
