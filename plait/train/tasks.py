"""A task ties a dataset to its loss and its evaluation (classification or regression)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.data.datasets import DATASETS, ArrayDataset
from plait.callargs import check_call_args
from plait.errors import ConfigError


@dataclass
class Task:
    train: ArrayDataset
    test: ArrayDataset
    info: dict

    @property
    def kind(self) -> str:
        return self.info["kind"]

    def loss(self, output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.kind == "regression":
            return F.mse_loss(output.float(), target, reduction=reduction)
        if self.kind == "lm":  # [B, T, V] logits against [B, T] next tokens
            return F.cross_entropy(output.flatten(0, 1).float(), target.flatten(), reduction=reduction)
        # cross_entropy also takes log-probabilities (the seed CNN's output): log_softmax is idempotent.
        return F.cross_entropy(output.float(), target, reduction=reduction)

    @torch.no_grad()
    def score(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sums over a slice of the test split: [loss sum, correct, count] (float64)."""
        correct = (out.argmax(-1) == y).sum() if self.kind != "regression" else torch.zeros((), device=y.device)
        count = torch.tensor(float(y.numel() if self.kind == "lm" else len(y)), device=y.device, dtype=torch.float64)
        return torch.stack([self.loss(out, y, "sum").double(), correct.double(), count]).cpu()

    def metrics(self, sums: torch.Tensor) -> dict:
        loss_sum, correct, count = sums.tolist()
        metrics = {"test_loss": loss_sum / count}
        if self.kind != "regression":
            metrics["test_accuracy"] = correct / count
        if self.kind == "lm":
            metrics["unigram_entropy"] = self.info["unigram_entropy"]
        return metrics

    def report(self, model: nn.Module) -> dict:
        """Task-specific final figures: for regression, the learned weights against least squares."""
        if self.kind != "regression":
            return {}
        x, y = (t.double() for t in self.train.tensors)
        finite = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)  # samples a skipping run could use
        x, y = x[finite], y[finite]
        design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [N, F+1]
        exact = torch.linalg.lstsq(design, y).solution.flatten()  # closed form [w..., b]
        linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
        learned = torch.cat([linear.weight.detach().double().flatten(), linear.bias.detach().double().flatten()]).cpu()
        return {
            "closed_form_weights": exact.tolist(),
            "learned_weights": learned.tolist(),
            "weights_rel_error": float((learned - exact).norm() / exact.norm()),
        }


def check_data_args(name: str, args: dict) -> None:
    """``data.name`` and ``data.args`` (names and types), without loading anything."""
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    check_call_args(DATASETS[name], args, "data.args", f"dataset {name!r}", hidden=("path",))


def build_task(name: str, path: str, args: dict) -> Task:
    check_data_args(name, args)
    builder = DATASETS[name]
    try:
        train, test, info = builder(path=path or None, **args)
    except TypeError as exc:
        raise ConfigError(f"data.args: {exc}") from None
    return Task(train, test, info)
