"""Activation recomputation, per block: a block keeps only its inputs for backward, and runs its
forward again when backward reaches it, trading one more forward for the activations inside
the block (torch's non-reentrant ``checkpoint`` does the same; this one lets a zero-bubble
weight pass share one recomputation between its autograd calls).

    recompute_blocks(blocks)     # [(name, module)]: the blocks a layout cuts and ZeRO-3 gathers

Only the block's own ``forward`` is recomputed; its hooks stay outside, so ZeRO-3's gather before
the forward and free after it run once, and the gather that its output's gradient triggers has
the parameters back before the recomputation needs them. Module names are unchanged (no wrapper
module), so checkpoints and tensor-parallel plans see the same names. Random numbers (dropout)
and autocast are replayed: the recomputed forward is the forward that ran, bit for bit.

What a recomputation saved goes as a backward uses it (a second backward through the same graph
recomputes), or, inside ``shared()``, stays until the context ends: a zero-bubble schedule
runs a micro-batch's input pass in one and its weight pass, one autograd call per group of
parameters, in another, so each block is recomputed once per pass rather than once per call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from plait.errors import PlaitError

_sharing: list | None = None  # the frames recomputed inside the innermost ``shared()``


@contextmanager
def shared() -> Iterator[None]:
    """Blocks recomputed inside keep what they recomputed for every autograd call made inside,
    and drop it when the context ends."""
    global _sharing
    outer, _sharing = _sharing, []
    try:
        yield
    finally:
        frames, _sharing = _sharing, outer
        for frame in frames:
            frame.saved = None


class _SaveInputs(torch.autograd.Function):
    """Keeps a block's tensor inputs as autograd's saved tensors (as torch's checkpoint does), so
    that saved-tensor hooks outside the block see what recomputation keeps. Never differentiated."""

    @staticmethod
    def forward(ctx, _anchor, *tensors):
        ctx.save_for_backward(*tensors)
        return torch.empty(0)

    @staticmethod
    def backward(ctx, *_):
        raise AssertionError("nothing flows into a block's saved inputs")


class _Frame:
    """One forward of a block: its inputs, random and autocast state, the number of tensors
    autograd saved, and what a recomputation saved in their place."""

    def __init__(self, forward, args: tuple, kwargs: dict):
        self.forward = forward
        values = [*args, *kwargs.values()]
        self.where = [k for k, v in enumerate(values) if isinstance(v, torch.Tensor)]
        self.inputs = _SaveInputs.apply(torch.empty(0, requires_grad=True), *(values[k] for k in self.where)).grad_fn
        self.values = [None if isinstance(v, torch.Tensor) else v for v in values]  # tensors: from ``inputs``
        self.names, self.positional = list(kwargs), len(args)
        self.meta: list[tuple] = []  # each saved tensor's shape and dtype
        self.saved: list[torch.Tensor] | None = None
        tensors = [values[k] for k in self.where]
        self.devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.autocast = {kind: (torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled())
                         for kind in ("cpu", "cuda") if torch.is_autocast_enabled(kind)}

    def pack(self, t: torch.Tensor) -> tuple:
        self.meta.append((t.shape, t.dtype))
        return self, len(self.meta) - 1

    @staticmethod
    def unpack(handle: tuple) -> torch.Tensor:
        """The recomputed tensor in place of the one saved; outside ``shared()`` each is handed out
        once (as torch's checkpoint does: its memory goes as soon as its node is done with it)."""
        frame, index = handle
        if frame.saved is None or frame.saved[index] is None:
            frame.recompute()
        t = frame.saved[index]
        if _sharing is None:
            frame.saved[index] = None
        return t

    def recompute(self) -> None:
        saved: list[torch.Tensor] = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            # the value only: a saved output kept with its autograd history would hold its own
            # node in a cycle that only the garbage collector breaks
            if len(saved) == len(self.meta) or (t.shape, t.dtype) != self.meta[len(saved)]:
                raise PlaitError(f"train.recompute: a block's recomputed forward saved a tensor its forward did not "
                                 f"({tuple(t.shape)}, {t.dtype}, #{len(saved)}): it must run the same operations")
            saved.append(t.detach())
            if len(saved) == len(self.meta):  # the rest of the forward saves nothing: skip it
                raise _Recomputed
            return saved[-1]

        values = list(self.values)
        for k, t in zip(self.where, self.inputs.saved_tensors):
            values[k] = t.detach().requires_grad_(t.requires_grad)
        args, kwargs = values[: self.positional], dict(zip(self.names, values[self.positional :]))
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.devices))
            torch.set_rng_state(self.cpu_rng)
            for device, state in zip(self.devices, self.cuda_rng):
                torch.cuda.set_rng_state(state, device)
            for kind, (dtype, cache) in self.autocast.items():
                stack.enter_context(torch.autocast(kind, dtype=dtype, cache_enabled=cache))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, _recomputed_twice))
            try:
                self.forward(*args, **kwargs)
            except _Recomputed:
                pass
        if len(saved) != len(self.meta):
            raise PlaitError(f"train.recompute: a block's forward saved {len(self.meta)} tensors for backward, its "
                             f"recomputation {len(saved)}: it must run the same operations every time")
        self.saved = saved
        if _sharing is not None:
            _sharing.append(self)


class _Recomputed(Exception):
    """Every tensor the forward saved has been recomputed (as torch's checkpoint, it stops there)."""


def _recomputed_twice(_):
    raise PlaitError("train.recompute: a recomputed forward's own saved tensor was unpacked")


def recompute_blocks(blocks: list[tuple[str, nn.Module]]) -> None:
    for _, block in blocks:
        block.forward = _recomputed(block.forward)


def _recomputed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation, or checks: nothing to save
            return forward(*args, **kwargs)
        frame = _Frame(forward, args, kwargs)
        with torch.autograd.graph.saved_tensors_hooks(frame.pack, _Frame.unpack):
            return forward(*args, **kwargs)

    run.recomputed = forward
    return run


def is_recomputed(module: nn.Module) -> bool:
    return hasattr(module.forward, "recomputed")
