"""Micro-batch schedules as action lists: ("F", i, c) runs the forward of micro-batch i on this
stage's chunk c, ("B", i, c) its backward; zero-bubble schedules split ("B", i, c) into ("I", i, c),
the gradient of the chunk's input (sent upstream at once), and ("W", i, c), its weights' gradient,
run later where the stage would wait. With v chunks (virtual stages) per stage, the model is cut
into p * v pieces and stage s holds pieces s, s + p, ... (chunk c is piece c * p + s), so that an
activation goes round the stages v times. Pure functions of (micro-batches m, stages p, this
stage s, chunks v); the stage runs them."""

from __future__ import annotations

Action = tuple[str, int, int]


def gpipe(m: int, p: int, s: int, v: int = 1) -> list[Action]:
    """All forwards, then all backwards: m micro-batches of activations held at the peak. With
    v chunks, chunk by chunk (torch's looped BFS): every micro-batch through chunk 0, then 1..."""
    forward = [("F", i, c) for c in range(v) for i in range(m)]
    return forward + [("B", i, c) for c in reversed(range(v)) for i in range(m)]


def one_f_one_b(m: int, p: int, s: int, v: int = 1) -> list[Action]:
    """Warm up with p-s-1 forwards, then alternate one forward and one backward, then drain:
    at most p-s micro-batches in flight on stage s (PipeDream-Flush / Megatron's 1F1B).

    With v chunks, Megatron's interleaved 1F1B (Narayanan et al., 2021): the m * v forwards
    go in rounds of p micro-batches through chunk 0, then the same p through chunk 1, ...; the
    backwards likewise from the last chunk; stage s warms up with 2(p-s-1) + (v-1)p forwards.
    The bubble shrinks v-fold, to (p-1)/(vm+p-1), for v-fold messages; m must divide by p."""
    if v == 1:
        warmup = min(p - s - 1, m)
        actions: list[Action] = [("F", i, 0) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [("F", warmup + i, 0), ("B", i, 0)]
        return actions + [("B", i, 0) for i in range(m - warmup, m)]
    if m % p:
        raise ValueError(f"interleaved 1F1B needs micro-batches ({m}) divisible by stages ({p})")
    total = m * v

    def nth(k: int, kind: str) -> Action:
        chunk = (k // p) % v
        return kind, (k // (p * v)) * p + k % p, chunk if kind == "F" else v - 1 - chunk

    warmup = min(2 * (p - s - 1) + (v - 1) * p, total)
    actions = [nth(k, "F") for k in range(warmup)]
    for k in range(total - warmup):
        actions += [nth(warmup + k, "F"), nth(k, "B")]
    return actions + [nth(k, "B") for k in range(total - warmup, total)]


def zb_h1(m: int, p: int, s: int, v: int = 1) -> list[Action]:
    """ZB-H1 (Qi et al., 2023): 1F1B with each backward split into I and W, stage s putting off
    its first s weight passes. A later stage idles longest at the end of 1F1B (its last backward
    comes first); the W it put off fill that, while its I reach the stages above sooner. With
    equal F, I and W times the bubble is a third of 1F1B's; at most p micro-batches in flight."""
    if v != 1:
        raise ValueError("ZB-H1 runs one chunk per stage")
    actions: list[Action] = []
    done = 0  # weight passes run so far
    for kind, i, c in one_f_one_b(m, p, s):
        if kind == "F":
            actions.append(("F", i, c))
            continue
        actions.append(("I", i, c))
        if i >= s:
            actions.append(("W", done, c))
            done += 1
    return actions + [("W", i, 0) for i in range(done, m)]


def in_flight(actions: list[Action]) -> int:
    """The most micro-batches (of any chunk) a stage holds at once: forwarded, and not yet done
    with (their B, or their W: the input pass keeps the graph for the weight pass)."""
    live, peak = set(), 0
    for kind, i, c in actions:
        if kind == "F":
            live.add((i, c))
        elif kind in "BW":
            live.discard((i, c))
        peak = max(peak, len(live))
    return peak


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "zbh1": zb_h1}
VIRTUAL = ("gpipe", "1f1b")
"""The schedules that run several chunks per stage (``pipeline.virtual``)."""


def simulate(schedule: str, m: int, p: int, duration, v: int = 1) -> float:
    """The schedule's bubble with free communication and no cost between passes: every stage
    runs its actions in order, each pass taking ``duration(stage, kind, micro-batch, chunk)``
    and starting once the pass it takes the output of has ended (F after the previous piece's F;
    B and I after the next piece's). The idle share of the step, averaged over stages, as
    ``trace.measured_bubble`` counts it from a real step."""
    actions = [SCHEDULES[schedule](m, p, s, v) for s in range(p)]
    ended: dict = {}  # (piece, kind, micro-batch) -> when it ended
    clock, pos, busy = [0.0] * p, [0] * p, [0.0] * p
    while any(pos[s] < len(actions[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(actions[s]):
                continue
            kind, i, c = actions[s][pos[s]]
            piece = c * p + s
            peer = {"F": piece - 1, "B": piece + 1, "I": piece + 1}.get(kind)  # whose output this pass takes
            if peer is not None and 0 <= peer < p * v:
                if (peer, kind, i) not in ended:
                    continue
                clock[s] = max(clock[s], ended[(peer, kind, i)])
            took = duration(s, kind, i, c)
            clock[s] += took
            busy[s] += took
            ended[(piece, kind, i)] = clock[s]
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline schedule {schedule!r} deadlocks at m={m}, p={p}, v={v}")
    span = max(clock)
    return sum(1 - b / span for b in busy) / p


def bubble_fraction(m: int, p: int, schedule: str = "1f1b", v: int = 1) -> float:
    """The idle share of a step in theory, with equal stages, free communication, and (for
    zero-bubble) equal forward, input-gradient and weight-gradient times; v chunks per stage
    cut the fill and drain v-fold."""
    if schedule == "zbh1":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (v * m + p - 1)
