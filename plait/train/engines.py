"""How one optimizer step's forward and backward run under each layout.

An engine owns the module this rank trains and runs a batch through it:

``Replicated``      data parallel: the whole model on every rank, micro-batches under ``no_sync``.
``Pipelined``       data x pipeline: this rank's stage, micro-batches by the GPipe or 1F1B schedule.
``TensorParallel``  data x tensor: the model's layers split by its ``tp_plan()``, a vocab-parallel loss.
``Sharded``         ZeRO stage 1, 2 or 3 on the data-parallel axis.

The trainer around them is the same: optimizer, clipping, logging, checkpoints.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from plait.distributed.mesh import Mesh
from plait.errors import ConfigError
from plait.parallel.data import DataParallel
from plait.parallel.pipeline import PipelineStage, StageModule, blocks_of, cut_points
from plait.parallel.tensor import parallelize, vocab_parallel_cross_entropy
from plait.parallel.tensor.comm import gather_from
from plait.parallel.zero import Zero


class Replicated:
    """The whole model on every rank; gradients averaged over ``dp``."""

    has_loss = True  # every rank computes the loss of its share of the batch
    loss_copies = 1  # ranks that hold the same loss value
    norm_group = None  # gradients are whole on every rank: their norm needs no communication

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains."""
        return list(self.module.parameters())

    def attach(self, optimizer) -> None:
        pass

    def whole_model(self):
        return nullcontext(self.module)

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

    loss_copies = 1
    parameters, attach, whole_model = Replicated.parameters, Replicated.attach, Replicated.whole_model

    def __init__(self, model: nn.Module, mesh: Mesh, cfg, loss_fn, sample: torch.Tensor, device):
        pp, stage = mesh.size("pp"), mesh.coord("pp")
        pipe = cfg.pipeline
        blocks = blocks_of(model)
        starts = cut_points(blocks, pp, pipe.balance, pipe.cuts or None, (sample,)) + [len(blocks)]
        self.module = StageModule(blocks[starts[stage]:starts[stage + 1]]).to(device)
        self.blocks = [name for name, _ in blocks[starts[stage]:starts[stage + 1]]]
        self.ddp = DataParallel(self.module, mesh.group("dp"), bucket_mb=cfg.parallel.bucket_mb,
                                allow_unused=cfg.parallel.allow_unused)
        self.stage = PipelineStage(self.ddp, stage, pp, mesh.group("pp"), loss_fn=loss_fn, device=device)
        self.has_loss = self.stage.last
        self.microbatches, self.schedule = pipe.microbatches, pipe.schedule
        self.norm_group = mesh.group("pp")  # each stage holds a part of the gradients

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.stage.step(x, y, self.microbatches, self.schedule)
        return loss if loss is not None else torch.zeros((), device=x.device)

    def infer(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.stage.infer(x)

    def check(self, x: torch.Tensor) -> None:
        self.stage.check(x[: max(1, len(x) // self.microbatches)])


class TensorParallel(Replicated):
    """Layers split over ``tp`` by the model's plan; gradients of each slice averaged over ``dp``.
    The output head stays split by vocabulary and the loss is computed without gathering it."""

    def __init__(self, model: nn.Module, mesh: Mesh, cfg, device):
        if not hasattr(model, "tp_plan"):
            raise ConfigError(f"parallel.tp: model {cfg.model.name!r} has no tensor-parallel plan (a tp_plan() method)")
        self.tp_group = mesh.group("tp")
        parallelize(model, model.tp_plan(), self.tp_group)
        super().__init__(model.to(device), mesh, cfg, self._loss)
        self.loss_copies = mesh.size("tp")  # every rank of a tp group computes the same loss

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits.flatten(0, -2), target.flatten(), self.tp_group)  # [B*T, V/t]

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from(self.module(x), self.tp_group)  # full logits, for test metrics


class Sharded(Replicated):
    """ZeRO on the data-parallel axis: the optimizer trains this rank's slices."""

    def __init__(self, model: nn.Module, mesh: Mesh, cfg, loss_fn):
        self.module, self.loss_fn, self.accum = model, loss_fn, cfg.train.accum_steps
        self.ddp = Zero(model, mesh.group("dp"), stage=cfg.parallel.zero)
        self.norm_group = mesh.group("dp")  # each rank holds a slice of the gradients

    def parameters(self) -> list[nn.Parameter]:
        return self.ddp.shard_parameters()

    def attach(self, optimizer) -> None:
        self.ddp.attach(optimizer)

    def whole_model(self):
        return self.ddp.gathered()

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self.ddp(x)
