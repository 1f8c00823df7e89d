"""Config, the trainer loop and its outputs (loaded on first use: see ``plait._lazy``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait._lazy import lazy

_LAZY = {"Config": "plait.train.config", "load_config": "plait.train.config", "Trainer": "plait.train.trainer"}
__all__ = list(_LAZY)
__getattr__, __dir__ = lazy(__name__, _LAZY)

if TYPE_CHECKING:
    from plait.train.config import Config, load_config
    from plait.train.trainer import Trainer
