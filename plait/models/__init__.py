"""Model registry: model code stays free of parallelism; strategies are applied from outside."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from plait.callargs import check_call_args, failed, is_import_spec, label, resolve
from plait.errors import ConfigError
from plait.models.gpt import GPT
from plait.models.simple import DigitsCNN, LinearRegression, mlp

MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "linreg": LinearRegression,
    "mlp": mlp,
    "gpt": GPT,
}


def model_factory(name: str) -> Callable[..., nn.Module]:
    """What ``model.name`` names: a shipped model, the user's ``package.module:callable``, or
    (from Python) a callable."""
    if callable(name):
        return name
    if is_import_spec(name):
        return resolve(name, "model.name")
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(MODELS)}, "
                          "or name your own as package.module:callable")
    return MODELS[name]


def check_model_args(name, args: dict) -> None:
    """``model.name`` and ``model.args`` (names and types), without building anything."""
    check_call_args(model_factory(name), args, "model.args", f"model {label(name)!r}")


def build_model(name, args: dict, data_info: dict) -> nn.Module:
    """Build the model ``name`` names from ``args``; arguments it takes that describe the data
    (``in_features``, ``num_classes``, ``vocab_size``, ...) are filled from ``data_info`` unless
    given."""
    factory = model_factory(name)
    check_model_args(name, args)
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in data_info.items() if k in accepted}
    kwargs.update(args)
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.args: cannot build {label(name)!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's own code failed: say where, in one line
        if name in MODELS:
            raise
        raise failed("model.name", repr(label(name)), exc) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: {label(name)!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def builds_deferred(name, asked: bool) -> bool:
    """Whether the model ``name`` names is built on the meta device, each rank materialising its
    part: the shipped models always (they initialise by ``reset_parameters()`` alone), a user's
    only when asked (``model.deferred_init``), since the meta device would lose whatever else
    its constructor initialises."""
    return asked or (isinstance(name, str) and name in MODELS)


__all__ = ["GPT", "MODELS", "DigitsCNN", "LinearRegression", "build_model", "builds_deferred", "mlp", "model_factory"]
