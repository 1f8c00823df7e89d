"""Config, the trainer loop and its outputs."""

from plait.train.config import Config, load_config
from plait.train.trainer import Trainer

__all__ = ["Config", "Trainer", "load_config"]
