"""A step on cores that a node's processes share (CPUs): the schedule replayed under processor
sharing.

On devices of their own, a pipeline stage that waits leaves its device idle, and the step is
the slowest stage's chain (``cost.estimate``). When P processes share C < P cores, a waiting
process gives its core to the others: the runnable ones then compute faster than the rate
measured with all of them busy. The replay follows that. Each stage's passes are CPU work (the
figures measured with every process busy, times C / P: what a process with a core to itself
takes); at any moment the n runnable processes each run at min(1, C / n) of a core; a pass
starts once the pass whose output it takes has ended (the schedule's own order and
dependencies, as ``schedules.simulate``), and after its last pass each stage runs its tail
(gradient reduction, ZeRO's gathers, the optimizer), which waits on no other stage. A stage
stands for its dp x tp processes, which run in step.

The step can be no shorter than the node's work spread over its cores (the mean stage's busy
time at the all-busy rate) and no shorter than the slowest stage's chain at the speed of a
process alone; the replay lands between the two, where the cores go idle while every runnable
process already has one.
"""

from __future__ import annotations

import math

from plait.parallel.pipeline.schedules import SCHEDULES


def replay(schedule: str, m: int, passes: list[dict], tails: list[float], group: int, cores: int,
           v: int = 1) -> float:
    """Seconds from the first pass to the last tail. ``passes[s]``: CPU seconds of stage s's
    "F", "B" (and for split schedules "I", "W") per micro-batch, alone on a core (with ``v``
    chunks per stage, of all its chunks: each chunk's pass takes 1/v of it); ``tails[s]``: its
    tail's; ``group``: processes per stage; ``cores``: the node's cores."""
    p = len(passes)
    work = [[(kind, i, c, passes[s][kind] / v) for kind, i, c in SCHEDULES[schedule](m, p, s, v)] if p > 1
            else [("F", 0, 0, passes[0]["F"] * m), ("B", 0, 0, passes[0]["B"] * m)] for s in range(p)]
    for s in range(p):
        work[s].append(("T", 0, 0, tails[s]))
    ended: dict = {}  # (piece, kind, micro-batch) -> when it ended; chunk c of stage s is piece c * p + s
    pos, left = [0] * p, [work[s][0][3] for s in range(p)]
    now = 0.0
    while True:
        ready = []
        for s in range(p):
            if pos[s] == len(work[s]):
                continue
            kind, i, c, _ = work[s][pos[s]]
            piece = c * p + s
            peer = {"F": piece - 1, "B": piece + 1, "I": piece + 1}.get(kind)  # whose output this pass takes
            if kind == "T" or peer is None or not 0 <= peer < p * v:
                ready.append(s)
            elif (peer, kind, i) in ended:
                ready.append(s)
        if not ready:
            if all(pos[s] == len(work[s]) for s in range(p)):
                return now
            raise RuntimeError(f"shared-core replay of {schedule!r} deadlocks at m={m}, p={p}, v={v}")
        speed = min(1.0, cores / (group * len(ready)))
        first = min(left[s] for s in ready)
        now += first / speed
        for s in ready:
            left[s] -= first
            if left[s] <= first * 1e-9:  # this one ends now (and any within rounding of it)
                kind, i, c, _ = work[s][pos[s]]
                ended[(c * p + s, kind, i)] = now
                pos[s] += 1
                left[s] = work[s][pos[s]][3] if pos[s] < len(work[s]) else math.inf


def shared_step(schedule: str, m: int, accum: int, stages: list[dict], group: int, cores: int, local: int,
                v: int = 1) -> float:
    """The step's seconds on shared cores, bar its per-step fixed cost. ``stages[s]``: stage s's
    parts per micro-batch as measured with every process busy ("F", "B", split "I" and "W"),
    and once per step ("tail"); ``local``: the node's processes. Each accumulation step runs the
    schedule; the tails follow the last."""
    alone = cores / local
    passes = [{k: v * alone for k, v in st.items() if k != "tail"} for st in stages]
    tails = [st["tail"] * alone for st in stages]
    last = replay(schedule, m, passes, tails, group, cores, v)
    if accum == 1:
        return last
    return (accum - 1) * replay(schedule, m, passes, [0.0] * len(stages), group, cores, v) + last
