"""Communication of tensor parallelism as autograd Functions, each with its backward pairing.

    copy_to(x)        forward: identity       backward: all-reduce    (enter a column-parallel region)
    reduce_from(x)    forward: all-reduce     backward: identity      (leave a row-parallel region)
    gather_from(x)    forward: all-gather     backward: keep my slice (gather a column-parallel output)
    scatter_to(x)     forward: keep my slice  backward: all-gather    (enter a row-parallel layer)

All along the last dimension, on ``group``. ``CommCounter`` counts the bytes they all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.distributed.comm import all_gather_flat, all_reduce, wait


class CommCounter:
    """Bytes all-reduced by tensor-parallel ops while active: ``with CommCounter() as c: ...``."""

    active: CommCounter | None = None

    def __init__(self):
        self.allreduce_bytes, self.allreduce_calls = 0, 0

    def __enter__(self) -> CommCounter:
        CommCounter.active = self
        return self

    def __exit__(self, *exc) -> None:
        CommCounter.active = None


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.contiguous()
    if CommCounter.active is not None:
        CommCounter.active.allreduce_bytes += x.numel() * x.element_size()
        CommCounter.active.allreduce_calls += 1
    return all_reduce(x, "tensor-parallel all-reduce", group, op=op)


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty(world * x.numel())
    wait(all_gather_flat(out, x.reshape(-1), group, async_op=True), "tensor-parallel all-gather", group)
    return torch.cat(out.view(world, *x.shape).unbind(0), dim=-1)  # [..., world * n]


def _my_slice(x: torch.Tensor, group) -> torch.Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(world, dim=-1)[rank].contiguous()


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _my_slice(grad, ctx.group), None


class _ScatterTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _my_slice(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


def copy_to(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyTo.apply(x, group)


def reduce_from(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFrom.apply(x, group)


def gather_from(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFrom.apply(x, group)


def scatter_to(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterTo.apply(x, group)
