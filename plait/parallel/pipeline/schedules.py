"""Micro-batch schedules as action lists: ("F", i) runs forward of micro-batch i, ("B", i) its
backward; zero-bubble schedules split ("B", i) into ("I", i), the gradient of the stage's input
(sent upstream at once), and ("W", i), its weights' gradient, run later where the stage would
wait. Pure functions of (micro-batches m, stages p, this stage s); the stage runs them."""

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


def zb_h1(m: int, p: int, s: int) -> list[Action]:
    """ZB-H1 (Qi et al., 2023): 1F1B with each backward split into I and W, stage s putting off
    its first s weight passes. A later stage idles longest at the end of 1F1B (its last backward
    comes first); the W it put off fill that, while its I reach the stages above sooner. With
    equal F, I and W times the bubble is a third of 1F1B's; at most p micro-batches in flight."""
    actions: list[Action] = []
    done = 0  # weight passes run so far
    for kind, i in one_f_one_b(m, p, s):
        if kind == "F":
            actions.append(("F", i))
            continue
        actions.append(("I", i))
        if i >= s:
            actions.append(("W", done))
            done += 1
    return actions + [("W", i) for i in range(done, m)]


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "zbh1": zb_h1}


def bubble_fraction(m: int, p: int, schedule: str = "1f1b") -> float:
    """The idle share of a step in theory, with equal stages, free communication, and (for
    zero-bubble) equal forward, input-gradient and weight-gradient times."""
    if schedule == "zbh1":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)
