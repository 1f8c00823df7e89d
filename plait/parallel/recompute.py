"""Activation recomputation, per block: a block keeps only its inputs for backward, and runs its
forward again when backward reaches it (``torch.utils.checkpoint``, non-reentrant), trading one
more forward for the activations inside the block.

    recompute_blocks(blocks)     # [(name, module)]: the blocks a layout cuts and ZeRO-3 gathers

Only the block's own ``forward`` is recomputed; its hooks stay outside, so ZeRO-3's gather before
the forward and free after it run once, and the gather that its output's gradient triggers has
the parameters back before the recomputation needs them. Module names are unchanged (no wrapper
module), so checkpoints and tensor-parallel plans see the same names. Random numbers (dropout)
are replayed: the recomputed forward is the forward that ran, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def recompute_blocks(blocks: list[tuple[str, nn.Module]]) -> None:
    for _, block in blocks:
        block.forward = _recomputed(block.forward)


def _recomputed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation, or checks: nothing to save
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run.recomputed = forward
    return run


def is_recomputed(module: nn.Module) -> bool:
    return hasattr(module.forward, "recomputed")
