"""The parallel engines: each transforms (model, optimizer, data) along one mesh axis."""

from plait.parallel.consistency import check_consistency
from plait.parallel.data import DataParallel

__all__ = ["DataParallel", "check_consistency"]
