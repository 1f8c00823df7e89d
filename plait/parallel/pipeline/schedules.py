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


def in_flight(actions: list[Action]) -> int:
    """The most micro-batches a stage holds at once: forwarded, and not yet done with (their B,
    or their W: the input pass keeps the graph for the weight pass)."""
    live, peak = set(), 0
    for kind, i in actions:
        if kind == "F":
            live.add(i)
        elif kind in "BW":
            live.discard(i)
        peak = max(peak, len(live))
    return peak


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "zbh1": zb_h1}


def simulate(schedule: str, m: int, p: int, duration) -> float:
    """The schedule's bubble with free communication and no cost between passes: every stage
    runs its actions in order, each pass taking ``duration(stage, kind)`` and starting once the
    neighbour's pass it takes the output of has ended (F after the previous stage's F; B and I
    after the next stage's). The idle share of the step, averaged over stages, as
    ``trace.measured_bubble`` counts it from a real step."""
    actions = [SCHEDULES[schedule](m, p, s) for s in range(p)]
    ended: dict = {}  # (stage, kind, micro-batch) -> when it ended
    clock, pos, busy = [0.0] * p, [0] * p, [0.0] * p
    while any(pos[s] < len(actions[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(actions[s]):
                continue
            kind, i = actions[s][pos[s]]
            peer = {"F": s - 1, "B": s + 1, "I": s + 1}.get(kind)  # whose output this pass takes
            if peer is not None and 0 <= peer < p:
                if (peer, kind, i) not in ended:
                    continue
                clock[s] = max(clock[s], ended[(peer, kind, i)])
            took = duration(s, kind)
            clock[s] += took
            busy[s] += took
            ended[(s, kind, i)] = clock[s]
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline schedule {schedule!r} deadlocks at m={m}, p={p}")
    span = max(clock)
    return sum(1 - b / span for b in busy) / p


def bubble_fraction(m: int, p: int, schedule: str = "1f1b") -> float:
    """The idle share of a step in theory, with equal stages, free communication, and (for
    zero-bubble) equal forward, input-gradient and weight-gradient times."""
    if schedule == "zbh1":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)
