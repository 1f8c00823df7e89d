"""The shared-core replay of the planner (``plait.plan.shared``): arithmetic only, no processes.

Each property is exact up to float rounding over a few hundred additions (relative 1e-9)."""

from __future__ import annotations

import random

import pytest

from plait.parallel.pipeline.schedules import SCHEDULES, VIRTUAL, bubble_fraction, simulate
from plait.plan.cluster import Cluster, Link
from plait.plan.cost import Candidate, Workload, estimate
from plait.plan.profile import BlockCost, ModelProfile
from plait.plan.shared import replay

CASES = [(schedule, m, p, 1) for schedule in SCHEDULES for p in (1, 2, 4) for m in (1, 2, 4, 8) if m >= p or p == 1]
CASES += [(schedule, m, p, v) for schedule in VIRTUAL for p in (2, 4) for m in (2, 4, 8) for v in (2, 3)
          if m >= p and (schedule != "1f1b" or m % p == 0)]  # several chunks per stage


def _passes(rng: random.Random, p: int) -> list[dict]:
    rows = []
    for _ in range(p):
        f, b = rng.uniform(0.5, 2.0), rng.uniform(1.0, 4.0)
        rows.append({"F": f, "B": b, "I": b / 2, "W": b / 2})
    return rows


def _work(schedule: str, m: int, passes: list[dict], tails: list[float], v: int = 1) -> list[float]:
    """Each stage's CPU seconds in the step (with v chunks, each chunk's pass a v-th of the stage's)."""
    p = len(passes)
    if p == 1:
        return [m * (passes[0]["F"] + passes[0]["B"]) + tails[0]]
    return [sum(passes[s][kind] / v for kind, _, _ in SCHEDULES[schedule](m, p, s, v)) + tails[s] for s in range(p)]


@pytest.mark.parametrize("schedule, m, p, v", CASES)
def test_a_core_for_every_process_is_the_schedule_on_a_clock(schedule, m, p, v):
    """Cores to spare: every pass runs at full speed, and the step is the schedule's own
    makespan, the closed form for equal stages (the theory's bubble, v-fold smaller with v
    chunks) and ``schedules.simulate``'s for unequal ones."""
    equal = [{"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}] * p
    slots = 3 * m / (1 - bubble_fraction(m, p, schedule, v)) if p > 1 else 3 * m
    assert replay(schedule, m, equal, [0.0] * p, group=2, cores=2 * p, v=v) == pytest.approx(slots, rel=1e-9)
    if p == 1:
        return
    passes = _passes(random.Random(f"{schedule}{m}{p}{v}"), p)
    span = replay(schedule, m, passes, [0.0] * p, group=1, cores=p, v=v)
    idle = simulate(schedule, m, p, lambda s, kind, *_: passes[s][kind] / v, v)
    busy = _work(schedule, m, passes, [0.0] * p, v)
    assert span == pytest.approx(sum(busy) / (p * (1 - idle)), rel=1e-9)


@pytest.mark.parametrize("schedule, m, p, v", CASES)
def test_one_core_is_kept_busy_to_the_end(schedule, m, p, v):
    """One core, one process per stage: some stage can always run (a schedule that never
    deadlocks), so the core never idles and the step is all the stages' work added up."""
    rng = random.Random(f"one{schedule}{m}{p}{v}")
    passes, tails = _passes(rng, p), [rng.uniform(0.0, 3.0) for _ in range(p)]
    span = replay(schedule, m, passes, tails, group=1, cores=1, v=v)
    assert span == pytest.approx(sum(_work(schedule, m, passes, tails, v)), rel=1e-9)


@pytest.mark.parametrize("schedule, m, p, v", CASES)
@pytest.mark.parametrize("group", [1, 2])
def test_shared_cores_lie_between_the_bounds(schedule, m, p, v, group):
    """Two cores shared by group x p processes: no shorter than the node's work spread over the
    cores, nor than the slowest stage's chain at full speed; no longer than every pass run at the
    all-busy speed (each process at 2 / (group x p) of a core)."""
    rng = random.Random(f"bounds{schedule}{m}{p}{v}{group}")
    passes, tails = _passes(rng, p), [rng.uniform(0.0, 3.0) for _ in range(p)]
    cores = 2
    span = replay(schedule, m, passes, tails, group, cores, v)
    work = _work(schedule, m, passes, tails, v)
    alone = replay(schedule, m, passes, tails, group, cores=group * p, v=v)  # every process with a core
    slowest = min(1.0, cores / (group * p))
    assert span >= group * sum(work) / cores * (1 - 1e-9)
    assert span >= alone * (1 - 1e-9)
    assert span <= alone / slowest * (1 + 1e-9)


def _profile(blocks: int) -> ModelProfile:
    rows = [BlockCost(f"b{i}", params=1_000_000, largest=1_000_000, tensors=2, flops=2e6, ops=10, saved=4e3,
                      input_bytes=4e3) for i in range(blocks)]
    return ModelProfile("toy", rows, backward_ratio=2.0, weights=[1.0] * blocks)


def _cluster(cores: int) -> Cluster:
    return Cluster("toy", devices_per_node=4, memory_bytes=8e9, flops={"fp32": 1e10}, intra=Link(1e-4, 1e9),
                   inter=Link(1e-4, 1e9), memory_bandwidth=1e10, microbatch_overhead_s=1e-3, cores=cores)


@pytest.mark.parametrize("layout", [Candidate(4, 1, 1), Candidate(2, 2, 1, microbatches=4),
                                    Candidate(1, 4, 1, microbatches=8, schedule="gpipe"),
                                    Candidate(2, 2, 1, zero=3, microbatches=2, schedule="zbh1"),
                                    Candidate(2, 2, 1, microbatches=4, virtual=2),
                                    Candidate(1, 4, 1, microbatches=8, schedule="gpipe", virtual=2),
                                    Candidate(2, 2, 1, zero=3, microbatches=2, virtual=2, reshard=False)])
def test_the_estimate_on_shared_cores_is_the_replay(layout):
    """On 2 cores shared by 4 processes the step's parts add up to it, the mean stage's work
    first and the idle cores as the bubble; the bubble is what a stage waits less than the
    slowest stage's chain at the all-busy rate (devices of their own, ``cores = 0``), where
    the whole chain of the slowest stage is the step."""
    work = Workload(batch_size=32, optimizer="adam")
    shared, own = estimate(_profile(8), _cluster(2), work, layout), estimate(_profile(8), _cluster(0), work, layout)
    assert shared.step_s == pytest.approx(sum(shared.time.values()), rel=1e-12)
    assert shared.time["bubble"] >= 0.0
    assert shared.step_s <= own.step_s * (1 + 1e-9)
    if layout.pp == 1:  # every process busy at once: nothing to gain from idle cores
        assert shared.step_s == pytest.approx(own.step_s, rel=1e-9)
    else:
        assert shared.time["bubble"] < own.time["bubble"]


def test_closed_forms_of_what_a_stage_holds_and_gathers():
    """The planner's closed forms, with one chunk per stage, are the schedules' own counts: the
    micro-batches a stage holds at its peak (GPipe: all m; 1F1B: p - s; ZB-H1: p, each at most
    m), ZeRO-3's backwards whose chunk last ran a forward, and the passes that gather when units
    are kept whole into backward (counted on the action lists, as with several chunks)."""
    from plait.parallel.pipeline.schedules import in_flight
    from plait.plan.cost import _gathers_keeping_units, _held, _kept

    for schedule in SCHEDULES:
        for p in range(2, 7):
            for m in range(1, 3 * p + 2):
                for s in range(p):
                    actions = SCHEDULES[schedule](m, p, s)
                    assert _held(schedule, m, p, s) == ((in_flight(actions),),), (schedule, m, p, s)
                    # the action-list counts: as _kept and _gathers_keeping_units count chunks
                    after_forward = sum(a[0] in "BI" and b[0] == "F" for b, a in zip(actions, actions[1:]))
                    assert _kept(schedule, m, p, s) == (after_forward,), (schedule, m, p, s)
                    whole, gathers = False, [0, 0]
                    for kind, _, _ in actions:
                        gathers[kind != "F"] += not whole
                        whole = kind in "FI"
                    assert _gathers_keeping_units(schedule, m, p, s) == (tuple(gathers),), (schedule, m, p, s)
