"""A task ties a dataset to its loss and its evaluation.

The data is a shipped dataset (``data.name = "digits"``) or the user's own: ``data.name =
"package.module:callable"``, called with ``data.args``, returning ``(train, test)`` map-style
datasets of ``(input, target)`` pairs, or ``(train, test, info)``, or an object with ``train``,
``test`` and optionally ``info`` attributes. The loss is ``train.loss``: ``cross_entropy``,
``mse``, the user's ``package.module:callable`` (``loss(output, target)``, a mean), or ``auto``
(the shipped dataset's own; cross-entropy for the user's data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from plait.callargs import check_call_args, failed, is_import_spec, label, resolve
from plait.data.datasets import DATASETS, ArrayDataset, stacked
from plait.errors import ConfigError
from plait.train.config import LOSSES


def cross_entropy(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (or log-probabilities: log_softmax is idempotent) against class
    indices; a sequence model's ``[batch, time, classes]`` against ``[batch, time]`` is flattened."""
    if output.dim() > 2 and target.dim() == output.dim() - 1:
        output, target = output.flatten(0, -2), target.flatten()
    return F.cross_entropy(output.float(), target, reduction=reduction)


def mse(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.mse_loss(output.float(), target.float(), reduction=reduction)


@dataclass
class Task:
    train: Dataset
    test: Dataset
    info: dict
    objective: str
    """cross_entropy, mse or custom."""
    custom_loss: Callable | None = None

    @property
    def kind(self) -> str:
        """The shipped dataset's kind (classification, regression, lm), or 'custom'."""
        return self.info.get("kind", "custom")

    def loss(self, output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.objective == "cross_entropy":
            return cross_entropy(output, target, reduction)
        if self.objective == "mse":
            return mse(output, target, reduction)
        value = self.custom_loss(output, target)
        return value if reduction == "mean" else value * len(target)

    @torch.no_grad()
    def score(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sums over a slice of the test split: [loss sum, correct, count] (float64)."""
        classes = self.objective == "cross_entropy"
        correct = (out.argmax(-1) == y).sum() if classes else torch.zeros((), device=y.device)
        count = y.numel() if self.objective != "custom" else len(y)
        count = torch.tensor(float(count), device=y.device, dtype=torch.float64)
        return torch.stack([self.loss(out, y, "sum").double(), correct.double(), count]).cpu()

    def metrics(self, sums: torch.Tensor) -> dict:
        loss_sum, correct, count = sums.tolist()
        metrics = {"test_loss": loss_sum / count}
        if self.objective == "cross_entropy":
            metrics["test_accuracy"] = correct / count
        if "unigram_entropy" in self.info:
            metrics["unigram_entropy"] = self.info["unigram_entropy"]
        return metrics

    def sample(self, n: int) -> torch.Tensor:
        """The inputs of the first ``n`` training samples, as one batch."""
        if isinstance(self.train, ArrayDataset):
            return self.train.tensors[0][:n]
        return default_collate([self.train[i] for i in range(n)])[0]

    @property
    def collate(self) -> Callable:
        return stacked if isinstance(self.train, ArrayDataset) else default_collate

    def test_batches(self, lo: int, hi: int, size: int):
        """Samples ``lo:hi`` of the test split as ``(inputs, targets)`` batches: one for the
        shipped arrays, batches of ``size`` for a user's dataset."""
        if isinstance(self.test, ArrayDataset):
            x, y = self.test.tensors
            yield x[lo:hi], y[lo:hi]
            return
        for start in range(lo, hi, size):
            yield default_collate([self.test[i] for i in range(start, min(start + size, hi))])

    def report(self, model: nn.Module) -> dict:
        """Task-specific final figures: for regression, the learned weights against least squares."""
        if self.kind != "regression" or not isinstance(self.train, ArrayDataset):
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


def data_factory(name) -> Callable:
    """What ``data.name`` names: a shipped dataset, the user's ``package.module:callable``, or
    (from Python) a callable."""
    if callable(name):
        return name
    if is_import_spec(name):
        return resolve(name, "data.name")
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
                          "or name your own as package.module:callable")
    return DATASETS[name]


def check_data_args(name, args: dict, path: str = "") -> None:
    """``data.name`` and ``data.args`` (names and types), without loading anything."""
    shipped = isinstance(name, str) and name in DATASETS
    if path and not shipped:
        raise ConfigError("data.path: only the shipped datasets read a file; pass your own data's location "
                          "in data.args")
    check_call_args(data_factory(name), args, "data.args", f"dataset {label(name)!r}", hidden=("path",) if shipped else ())


def loss_function(loss: str, info: dict) -> tuple[str, Callable | None]:
    """``train.loss`` as (objective, the user's callable or None)."""
    if loss == "auto":
        return ("mse" if info.get("kind") == "regression" else "cross_entropy"), None
    if loss in LOSSES:
        return loss, None
    if callable(loss):
        return "custom", loss
    if not is_import_spec(loss):
        raise ConfigError(f"train.loss: {loss!r} is not one of {', '.join(LOSSES)}, nor package.module:callable")
    return "custom", resolve(loss, "train.loss")


def build_task(name, path: str, args: dict, loss="auto") -> Task:
    check_data_args(name, args, path)
    builder = data_factory(name)
    shipped = isinstance(name, str) and name in DATASETS
    try:
        made = builder(path=path or None, **args) if shipped else builder(**args)
    except TypeError as exc:
        raise ConfigError(f"data.args: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's own code failed: say where, in one line
        if shipped:
            raise
        raise failed("data.name", repr(label(name)), exc) from None
    train, test, info = _unpack(made, label(name))
    objective, custom = loss_function(loss, info)
    return Task(train, test, info, objective, custom)


def _unpack(made, label: str) -> tuple[Dataset, Dataset, dict]:
    """(train, test, info) from what a data callable returned, checked: one line otherwise."""
    expected = "expected (train, test) datasets of (input, target) pairs, or (train, test, info)"
    if isinstance(made, tuple) and len(made) in (2, 3):
        train, test, info = (*made, {}) if len(made) == 2 else made
    elif hasattr(made, "train") and hasattr(made, "test"):
        train, test, info = made.train, made.test, getattr(made, "info", None) or {}
    else:
        raise ConfigError(f"data.name: {label!r} returned a {type(made).__name__}; {expected}")
    if not isinstance(info, dict):
        raise ConfigError(f"data.name: {label!r} returned info of type {type(info).__name__}; expected a dict")
    for split, data in (("train", train), ("test", test)):
        if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            raise ConfigError(f"data.name: {label!r}: its {split} split is a {type(data).__name__}, not a map-style "
                              f"dataset (len() and [i]); {expected}")
        if len(data) == 0:
            raise ConfigError(f"data.name: {label!r}: its {split} split is empty")
        first = data[0]
        if not (isinstance(first, (tuple, list)) and len(first) == 2):
            raise ConfigError(f"data.name: {label!r}: its {split} split's samples are {type(first).__name__}s; {expected}")
    return train, test, info
