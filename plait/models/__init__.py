"""Model registry: model code stays free of parallelism; strategies are applied from outside."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from plait.callargs import check_call_args
from plait.errors import ConfigError
from plait.models.gpt import GPT
from plait.models.simple import DigitsCNN, LinearRegression, mlp

MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "linreg": LinearRegression,
    "mlp": mlp,
    "gpt": GPT,
}


def check_model_args(name: str, args: dict) -> None:
    """``model.name`` and ``model.args`` (names and types), without building anything."""
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    check_call_args(MODELS[name], args, "model.args", f"model {name!r}")


def build_model(name: str, args: dict, data_info: dict) -> nn.Module:
    """Build a registered model from ``args``; arguments it takes that describe the data
    (``in_features``, ``num_classes``) are filled from ``data_info`` unless given."""
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    factory = MODELS[name]
    check_model_args(name, args)
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in data_info.items() if k in accepted}
    kwargs.update(args)
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.args: cannot build {name!r}: {exc}") from None


__all__ = ["GPT", "MODELS", "DigitsCNN", "LinearRegression", "build_model", "mlp"]
