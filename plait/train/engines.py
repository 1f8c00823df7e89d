"""How one optimizer step's forward and backward run under each layout.

An engine owns the module this rank trains and runs a batch through it:

``Replicated``  data parallel: the whole model on every rank, micro-batches under ``no_sync``.
``Pipelined``   data x pipeline: this rank's stage, micro-batches by the GPipe or 1F1B schedule.

The trainer around them is the same: optimizer, clipping, logging, checkpoints.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from plait.dist.mesh import Mesh
from plait.errors import ConfigError
from plait.parallel.data import DataParallel
from plait.parallel.pipeline import PipelineStage, StageModule, blocks_of, cut_points


class Replicated:
    """The whole model on every rank; gradients averaged over ``dp``."""

    has_loss = True  # every rank computes the loss of its share of the batch

    def __init__(self, model: nn.Module, mesh: Mesh, cfg, loss_fn):
        self.module, self.loss_fn, self.accum = model, loss_fn, cfg.train.accum_steps
        self.ddp = DataParallel(model, mesh.group("dp"), bucket_mb=cfg.parallel.bucket_mb,
                                allow_unused=cfg.parallel.allow_unused)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of this rank's batch; returns its mean loss."""
        total = torch.zeros((), device=x.device)
        micro = list(zip(x.chunk(self.accum), y.chunk(self.accum)))
        for i, (xm, ym) in enumerate(micro):
            with self.ddp.no_sync() if i < len(micro) - 1 else nullcontext():
                loss = self.loss_fn(self.ddp(xm), ym) / len(micro)
                loss.backward()
            total += loss.detach()
        return total

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def check(self, x: torch.Tensor) -> None:
        pass  # one module: nothing to fit together


class Pipelined:
    """This rank's pipeline stage; gradients averaged over ``dp`` once per step."""

    def __init__(self, model: nn.Module, mesh: Mesh, cfg, loss_fn, sample: torch.Tensor, device):
        pp, stage = mesh.size("pp"), mesh.coord("pp")
        pipe = cfg.pipeline
        if cfg.train.accum_steps != 1:
            raise ConfigError("train.accum_steps: with pipeline parallelism, use pipeline.microbatches instead")
        blocks = blocks_of(model)
        starts = cut_points(blocks, pp, pipe.balance, pipe.cuts or None, (sample,)) + [len(blocks)]
        self.module = StageModule(blocks[starts[stage]:starts[stage + 1]]).to(device)
        self.blocks = [name for name, _ in blocks[starts[stage]:starts[stage + 1]]]
        self.ddp = DataParallel(self.module, mesh.group("dp"), bucket_mb=cfg.parallel.bucket_mb,
                                allow_unused=cfg.parallel.allow_unused)
        self.stage = PipelineStage(self.ddp, stage, pp, mesh.group("pp"), loss_fn=loss_fn, device=device)
        self.has_loss = self.stage.last
        self.microbatches, self.schedule = pipe.microbatches, pipe.schedule

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.stage.step(x, y, self.microbatches, self.schedule)
        return loss if loss is not None else torch.zeros((), device=x.device)

    def infer(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.stage.infer(x)

    def check(self, x: torch.Tensor) -> None:
        self.stage.check(x[: max(1, len(x) // self.microbatches)])
