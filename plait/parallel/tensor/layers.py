"""Tensor-parallel layers. Each is built from the unsplit layer (``from_module``), keeping its
slice of the weights, so a split model computes exactly what the unsplit one does.

ColumnParallelLinear: y = x Wᵀ + b, W split by output features; rank r holds rows r·o/t..(r+1)·o/t

        x [.., in] ──copy_to──▶ x W_rᵀ + b_r = y_r [.., out/t] ──(gather_output)──▶ y [.., out]

RowParallelLinear: W split by input features; rank r holds columns r·i/t..(r+1)·i/t

        x_r [.., in/t] ──▶ x_r W_rᵀ ──reduce_from (sum over ranks)──▶ + b = y [.., out]

A column-parallel layer followed by a row-parallel one (an MLP's up and down projection) needs
one all-reduce forward and one backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.errors import PlaitError
from plait.parallel.shards import TPSplit
from plait.parallel.tensor.comm import _all_reduce, copy_to, gather_from, reduce_from, scatter_to


def _shard_size(size: int, group, what: str, name: str) -> tuple[int, int]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if size % world:
        raise PlaitError(f"tensor parallel: {name or 'module'}: {what} {size} is not divisible by tp={world}")
    return size // world, rank


def _param(t: torch.Tensor, group=None, dim: int = 0, parts: int = 1) -> nn.Parameter:
    """A parameter holding ``t``; with ``group``, marked as this rank's slice along ``dim``
    (``param.plait_tp``), which checkpoints use to place it in the unsplit tensor."""
    p = nn.Parameter(t.detach().clone().contiguous())
    if group is not None:
        p.plait_tp = TPSplit(dim, parts, dist.get_rank(group), dist.get_world_size(group))
    return p


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, gather_output: bool = False):
        super().__init__()
        self.weight, self.bias, self.group, self.gather_output = weight, bias, group, gather_output

    @classmethod
    def from_module(cls, linear: nn.Linear, group, name: str = "", gather_output: bool = False,
                    weight: nn.Parameter | None = None, parts: int = 1) -> ColumnParallelLinear:
        """``parts``: the output is that many equal parts side by side (a fused q/k/v projection);
        each rank takes its slice of every part, so its output is again ``parts`` parts."""
        _shard_size(linear.out_features // parts, group, "output features" + (" per part" if parts > 1 else ""), name)

        def mine(t: torch.Tensor) -> torch.Tensor:
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            return torch.cat([part.chunk(world)[rank] for part in t.chunk(parts)])  # [out/t, ...]

        w = weight if weight is not None else _param(mine(linear.weight), group, 0, parts)  # [out/t, in]
        b = _param(mine(linear.bias), group, 0, parts) if linear.bias is not None else None
        return cls(w, b, group, gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to(x, self.group), self.weight, self.bias)  # [.., out/t]
        if self.gather_output:
            return gather_from(y, self.group)
        y.plait_split = True  # a model that returns it as its output: the loss knows it is a slice
        return y


class RowParallelLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, input_is_parallel: bool = True):
        super().__init__()
        self.weight, self.bias, self.group, self.input_is_parallel = weight, bias, group, input_is_parallel

    @classmethod
    def from_module(cls, linear: nn.Linear, group, name: str = "", input_is_parallel: bool = True) -> RowParallelLinear:
        n, r = _shard_size(linear.in_features, group, "input features", name)
        w = _param(linear.weight[:, r * n : (r + 1) * n], group, 1)  # [out, in/t]
        b = _param(linear.bias) if linear.bias is not None else None  # added once, after the sum
        return cls(w, b, group, input_is_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to(x, self.group)
        y = reduce_from(F.linear(x, self.weight), self.group)  # [.., out], summed over ranks
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows of the table split: rank r holds token ids r·V/t..(r+1)·V/t; other ids give zeros
    here, and the all-reduce fills them in from their owner."""

    def __init__(self, weight: nn.Parameter, start: int, group):
        super().__init__()
        self.weight, self.start, self.group = weight, start, group

    @classmethod
    def from_module(cls, embedding: nn.Embedding, group, name: str = "") -> VocabParallelEmbedding:
        n, r = _shard_size(embedding.num_embeddings, group, "vocabulary", name)
        return cls(_param(embedding.weight[r * n : (r + 1) * n], group, 0), r * n, group)  # [V/t, D]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [.., D]
        return reduce_from(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary, without gathering them: the max, the sum
    of exponentials and the target's logit are all-reduced (three [N] vectors, not [N, V])."""

    @staticmethod
    def forward(ctx, logits, target, group):
        logits = logits.float()  # [N, V/t]
        rank_start = dist.get_rank(group) * logits.shape[-1]
        top = _all_reduce(logits.max(dim=-1).values, group, op=dist.ReduceOp.MAX)  # [N]
        shifted = logits - top.unsqueeze(-1)
        exp = shifted.exp()
        total = _all_reduce(exp.sum(dim=-1), group)  # [N]
        local = target - rank_start
        mine = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~mine, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * mine  # [N]
        picked = _all_reduce(picked, group)
        ctx.save_for_backward(exp / total.unsqueeze(-1), local, mine)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad):  # d loss / d logits = softmax - onehot(target)
        softmax, local, mine = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local.unsqueeze(-1), -mine.to(g.dtype).unsqueeze(-1))
        return g * grad.unsqueeze(-1), None, None


def is_split(output) -> bool:
    """Whether ``output`` is a column-parallel layer's slice (not gathered)."""
    return getattr(output, "plait_split", False)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` [N, V/t] (this rank's vocabulary slice) against ``target`` [N]."""
    loss = _VocabParallelCE.apply(logits, target, group)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
