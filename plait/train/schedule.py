"""Learning-rate schedules: warmup, then constant, cosine or linear decay to ``min_lr``.

    lr(s), s = 0, 1, ... the optimizer steps taken before this one (step k of the run uses s = k - 1):
      s < W:            lr * (s + 1) / (W + 1)              linear warmup over W = train.warmup_steps
      after, with p = (s - W) / max(1, S - 1 - W)   (0 at the first step after warmup, 1 at the last
                        of the S = train.steps steps):
      constant:         lr
      cosine:           min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2
      linear:           lr - (lr - min_lr) * p

The value is a pure function of the step, so a resumed run continues it bitwise; a torch
``LRScheduler`` (``WarmupDecay``) applies it to the optimizer.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "linear")


def lr_at(s: int, lr: float, schedule: str, steps: int, warmup: int = 0, min_lr: float = 0.0) -> float:
    """The learning rate of the step after ``s`` steps (the formulas above)."""
    if s < warmup:
        return lr * (s + 1) / (warmup + 1)
    if schedule == "constant":
        return lr
    p = min(1.0, (s - warmup) / max(1, steps - 1 - warmup))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * p)) / 2
    return lr - (lr - min_lr) * p


def scheduled_lr(cfg):
    """``cfg``'s (a ``TrainConfig``) schedule as a function of the steps taken."""
    return lambda s: lr_at(s, cfg.lr, cfg.lr_schedule, cfg.steps, cfg.warmup_steps, cfg.min_lr)


class WarmupDecay(torch.optim.lr_scheduler.LRScheduler):
    """``lr_at`` as a torch scheduler: after ``scheduler.step()`` number s, every parameter group's
    learning rate is ``lr_at(s)`` exactly (not ``lr`` times a rounded factor)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg, done: int = 0):
        """``cfg``: a ``TrainConfig``. The optimizer's learning rate becomes that of step ``done + 1``."""
        self.cfg = cfg
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
            group.pop("initial_lr", None)
        super().__init__(optimizer)  # its first step sets the lr of s = 0
        if done:
            self.last_epoch = done
            for group, lr in zip(optimizer.param_groups, self.get_lr()):
                group["lr"] = lr
            self._last_lr = self.get_lr()

    def get_lr(self) -> list[float]:
        lr = scheduled_lr(self.cfg)(self.last_epoch)
        return [lr for _ in self.optimizer.param_groups]
