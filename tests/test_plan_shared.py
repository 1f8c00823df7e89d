"""The shared-core replay of the planner (``plait.plan.shared``): arithmetic only, no processes.

Each property is exact up to float rounding over a few hundred additions (relative 1e-9)."""

from __future__ import annotations

import random

import pytest

from plait.parallel.pipeline.schedules import SCHEDULES, simulate
from plait.plan.cluster import Cluster, Link
from plait.plan.cost import Candidate, Workload, estimate
from plait.plan.profile import BlockCost, ModelProfile
from plait.plan.shared import replay

CASES = [(schedule, m, p) for schedule in SCHEDULES for p in (1, 2, 4) for m in (1, 2, 4, 8) if m >= p or p == 1]


def _passes(rng: random.Random, p: int) -> list[dict]:
    rows = []
    for _ in range(p):
        f, b = rng.uniform(0.5, 2.0), rng.uniform(1.0, 4.0)
        rows.append({"F": f, "B": b, "I": b / 2, "W": b / 2})
    return rows


def _work(schedule: str, m: int, passes: list[dict], tails: list[float]) -> list[float]:
    """Each stage's CPU seconds in the step."""
    p = len(passes)
    if p == 1:
        return [m * (passes[0]["F"] + passes[0]["B"]) + tails[0]]
    return [sum(passes[s][kind] for kind, _, _ in SCHEDULES[schedule](m, p, s)) + tails[s] for s in range(p)]


@pytest.mark.parametrize("schedule, m, p", CASES)
def test_a_core_for_every_process_is_the_schedule_on_a_clock(schedule, m, p):
    """Cores to spare: every pass runs at full speed, and the step is the schedule's own
    makespan, the closed form for equal stages and ``schedules.simulate``'s for unequal ones."""
    split = schedule == "zbh1"
    equal = [{"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}] * p
    slots = 3 * m + p - 1 if split and p > 1 else (m + p - 1) * 3 if p > 1 else 3 * m
    assert replay(schedule, m, equal, [0.0] * p, group=2, cores=2 * p) == pytest.approx(slots, rel=1e-9)
    if p == 1:
        return
    passes = _passes(random.Random(f"{schedule}{m}{p}"), p)
    span = replay(schedule, m, passes, [0.0] * p, group=1, cores=p)
    idle = simulate(schedule, m, p, lambda s, kind, *_: passes[s][kind])
    busy = _work(schedule, m, passes, [0.0] * p)
    assert span == pytest.approx(sum(busy) / (p * (1 - idle)), rel=1e-9)


@pytest.mark.parametrize("schedule, m, p", CASES)
def test_one_core_is_kept_busy_to_the_end(schedule, m, p):
    """One core, one process per stage: some stage can always run (a schedule that never
    deadlocks), so the core never idles and the step is all the stages' work added up."""
    rng = random.Random(f"one{schedule}{m}{p}")
    passes, tails = _passes(rng, p), [rng.uniform(0.0, 3.0) for _ in range(p)]
    span = replay(schedule, m, passes, tails, group=1, cores=1)
    assert span == pytest.approx(sum(_work(schedule, m, passes, tails)), rel=1e-9)


@pytest.mark.parametrize("schedule, m, p", CASES)
@pytest.mark.parametrize("group", [1, 2])
def test_shared_cores_lie_between_the_bounds(schedule, m, p, group):
    """Two cores shared by group x p processes: no shorter than the node's work spread over the
    cores, nor than the slowest stage's chain at full speed; no longer than every pass run at the
    all-busy speed (each process at 2 / (group x p) of a core)."""
    rng = random.Random(f"bounds{schedule}{m}{p}{group}")
    passes, tails = _passes(rng, p), [rng.uniform(0.0, 3.0) for _ in range(p)]
    cores = 2
    span = replay(schedule, m, passes, tails, group, cores)
    work = _work(schedule, m, passes, tails)
    alone = replay(schedule, m, passes, tails, group, cores=group * p)  # every process with a core
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
                                    Candidate(2, 2, 1, zero=3, microbatches=2, schedule="zbh1")])
def test_the_estimate_on_shared_cores_is_the_replay(layout):
    """On 2 cores shared by 4 processes the step's parts add up to it, the mean stage's work
    first and the idle cores as the bubble; the bubble is what a stage waits less than the
    slowest stage's chain at the all-busy rate (devices of their own, ``cores = 0``), where
    the whole chain of the slowest stage is the step."""
    work = Workload(batch_size=32, optimizer="adam")
    shared, own = estimate(_profile(4), _cluster(2), work, layout), estimate(_profile(4), _cluster(0), work, layout)
    assert shared.step_s == pytest.approx(sum(shared.time.values()), rel=1e-12)
    assert shared.time["bubble"] >= 0.0
    assert shared.step_s <= own.step_s * (1 + 1e-9)
    if layout.pp == 1:  # every process busy at once: nothing to gain from idle cores
        assert shared.step_s == pytest.approx(own.step_s, rel=1e-9)
    else:
        assert shared.time["bubble"] < own.time["bubble"]
