"""Checking a config's ``args`` table against the function it will be passed to."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

from plait.errors import ConfigError

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_call_args(fn: Callable, args: dict, key: str, what: str, hidden: Iterable[str] = ()) -> None:
    """Every name in ``args`` is a parameter of ``fn`` (and not in ``hidden``), and every value has
    the type of that parameter's default (an integer passes for a float): one line naming
    ``key.name`` otherwise. ``what`` names ``fn`` in the message, e.g. "model 'mlp'"."""
    params = {k: p for k, p in inspect.signature(fn).parameters.items() if k not in hidden}
    for name, value in args.items():
        if name not in params:
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
