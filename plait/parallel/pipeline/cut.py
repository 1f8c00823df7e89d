"""Cutting a model into pipeline stages: contiguous runs of blocks, balanced by a weight."""

from __future__ import annotations

import time

import torch
from torch import nn

from plait.errors import PlaitError


def blocks_of(model: nn.Module | list) -> list[tuple[str, nn.Module]]:
    """The model's blocks, named as in the model: an ``nn.Sequential``'s children, a list of
    modules, or what ``model.pipeline_blocks()`` returns (for models that are not sequential)."""
    if hasattr(model, "pipeline_blocks"):
        return list(model.pipeline_blocks())
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    if isinstance(model, (list, tuple, nn.ModuleList)):
        return [(str(i), m) for i, m in enumerate(model)]
    return [(type(model).__name__, model)]  # one block: it cannot be cut


def _balance(weights: list[float], parts: int) -> list[int]:
    """Cut points (starts of parts 1..parts-1) minimising the heaviest part: linear partition by DP."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: the smallest possible heaviest part when cutting the first i blocks into k parts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    choice = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], choice[k][i] = cost, j
    cuts, i = [], n
    for k in range(parts, 0, -1):
        i = choice[k][i]
        cuts.append(i)
    return sorted(cuts)[1:]  # drop the leading 0


def block_times(blocks: list[nn.Module], sample: tuple[torch.Tensor, ...], repeats: int = 3) -> list[float]:
    """Measured forward+backward seconds of each block, feeding each the previous block's output."""
    times, xs = [], sample
    for block in blocks:
        inputs = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in xs)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = block(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward([o for o in outs if o.requires_grad],
                                    [torch.ones_like(o) for o in outs if o.requires_grad])
            best = min(best, time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
        times.append(best)
        xs = tuple(o.detach() for o in outs)
    return times


def cut_points(blocks: list[tuple[str, nn.Module]], stages: int, balance: str = "params",
               cuts: list[int] | None = None, sample: tuple[torch.Tensor, ...] | None = None,
               weights: list[float] | None = None) -> list[int]:
    """Where each stage starts (index of its first block), for ``stages`` stages; ``weights``:
    the blocks' costs, measured already (every rank must cut alike)."""
    n = len(blocks)
    if stages > n:
        raise PlaitError(f"pipeline: {stages} stages but the model has only {n} block{'s' if n > 1 else ''} to cut "
                         "(pipelines cut an nn.Sequential, a list of blocks, or a model's pipeline_blocks())")
    if cuts:
        starts = [0, *cuts]
        if len(cuts) != stages - 1 or starts != sorted(set(starts)) or cuts[-1] >= n or cuts[0] <= 0:
            raise PlaitError(f"pipeline.cuts={cuts}: need {stages - 1} increasing block indices in 1..{n - 1}")
        return starts
    if weights is None and balance == "params":
        weights = [float(sum(p.numel() for p in b.parameters())) + 1.0 for _, b in blocks]
    elif weights is None and balance == "time":
        if sample is None:
            raise PlaitError("pipeline.balance='time' needs a sample batch to time the blocks")
        weights = block_times([b for _, b in blocks], sample)
    elif weights is None:
        raise PlaitError(f"pipeline.balance={balance!r}: choose 'params' or 'time'")
    return [0, *_balance(weights, stages)]


class StageModule(nn.Module):
    """Consecutive blocks of a model, registered under their names in the whole model (dots made
    underscores). A tuple output is unpacked into the next block. Checkpoints name parameters as
    the unsplit model does (``plait.parallel.compose``), not by these names."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        super().__init__()
        self.order = [name.replace(".", "_") for name, _ in blocks]  # module names cannot hold dots
        for name, (_, block) in zip(self.order, blocks):
            self.add_module(name, block)

    def forward(self, *xs):
        for name in self.order:
            out = getattr(self, name)(*xs)
            xs = out if isinstance(out, tuple) else (out,)
        return xs[0] if len(xs) == 1 else xs
