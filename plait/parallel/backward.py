"""When a backward ends, for the wrappers that finish their gradient reduction then."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EndOfBackward:
    """For a class with a ``_finish()``: ``_arm()``, called at a backward's first ready gradient,
    runs ``self._finish()`` once that backward ends; inside ``one_backward()``, once the block ends
    instead (the several autograd calls of a zero-bubble pipeline's weight pass are one backward
    to the gradient reduction)."""

    _armed = False
    _held = False

    def _arm(self) -> None:
        if not self._armed:
            self._armed = True
            if not self._held:
                torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    @contextmanager
    def one_backward(self) -> Iterator[None]:
        self._held = True
        try:
            yield
        finally:
            self._held = False
        if self._armed:
            self._finish()
