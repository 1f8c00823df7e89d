"""Checking a config's ``args`` table against the function it will be passed to."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

from plait.errors import ConfigError, first_line

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_call_args(fn: Callable, args: dict, key: str, what: str, hidden: Iterable[str] = ()) -> None:
    """Every name in ``args`` is a parameter of ``fn`` (and not in ``hidden``), and every value has
    the type of that parameter's default (an integer passes for a float): one line naming
    ``key.name`` otherwise. ``what`` names ``fn`` in the message, e.g. "model 'mlp'"."""
    params = {k: p for k, p in inspect.signature(fn).parameters.items() if k not in hidden}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {k: p for k, p in params.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD,
                                                                 inspect.Parameter.VAR_POSITIONAL)}
    for name, value in args.items():
        if name not in params:
            if open_ended:
                continue  # **kwargs: it may take anything
            raise ConfigError(f"{key}.{name}: {what} takes no such argument (it takes: {', '.join(params) or 'none'})")
        default = params[name].default
        kind = type(default)
        if kind not in _KINDS:
            continue  # no default, or None: nothing to say about the type
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{key}.{name}: expected {_KINDS[kind]} (default {default!r}), got {value!r}")


def label(name) -> str:
    """How a message names a model or dataset given by name, or (from Python) as a callable."""
    return name if isinstance(name, str) else getattr(name, "__qualname__", repr(name))


def failed(key: str, what: str, exc: BaseException) -> ConfigError:
    """One line for an error raised by the user's own code: ``key: what failed: Type: message``."""
    return ConfigError(f"{key}: {what} failed: {type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}")


def is_import_spec(name: str) -> bool:
    """``package.module:callable`` names the user's own code; a bare word names a shipped one."""
    return ":" in name


def resolve(spec: str, key: str) -> Callable:
    """The callable that ``spec`` (``package.module:attr.attr``) names, imported as ``python -m``
    would: from the current directory, then the installed packages. One line naming ``key``,
    the module and the cause if it cannot be imported or is not callable."""
    import importlib
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not all(part.isidentifier() for part in module_name.split(".") + attr.split(".")):
        raise ConfigError(f"{key}: {spec!r} is not of the form package.module:callable")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = "" if exc.name == module_name else f" (it imports {exc.name!r}, which is not installed)"
        raise ConfigError(f"{key}: cannot import module {module_name!r}{where}: {exc} "
                          f"(looked in {os.getcwd()} and the installed packages)") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise failed(key, f"importing module {module_name!r}", exc) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}: {spec!r} is a {type(target).__name__}, not a callable")
    return target
