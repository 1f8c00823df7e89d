"""Micro-batch schedules as action lists: ("F", i) runs forward of micro-batch i, ("B", i) its
backward. Pure functions of (micro-batches m, stages p, this stage s); the stage runs them."""

from __future__ import annotations

Action = tuple[str, int]


def gpipe(m: int, p: int, s: int) -> list[Action]:
    """All forwards, then all backwards: m micro-batches of activations held at the peak."""
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b(m: int, p: int, s: int) -> list[Action]:
    """Warm up with p-s-1 forwards, then alternate one forward and one backward, then drain:
    at most p-s micro-batches in flight on stage s (PipeDream-Flush / Megatron's 1F1B)."""
    warmup = min(p - s - 1, m)
    actions: list[Action] = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [("F", warmup + i), ("B", i)]
    actions += [("B", i) for i in range(m - warmup, m)]
    return actions


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def bubble_fraction(m: int, p: int) -> float:
    """The idle share of a step in theory, with equal stages and free communication."""
    return (p - 1) / (m + p - 1)
