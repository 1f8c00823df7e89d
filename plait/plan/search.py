"""Every valid layout of a model on a cluster, estimated and ranked, with the reasons.

The space: every dp x pp x tp that multiplies to the world (tp only with a tensor-parallel
plan whose sizes divide, pp up to the model's blocks), ZeRO 0-3 when dp > 1 (3 only without
weights tied across blocks; with each unit freed after its forward, or kept whole into its
backward), for pp > 1 the micro-batch counts that divide each rank's share of the batch from pp
to 4 pp and one sample per micro-batch, GPipe, 1F1B and ZB-H1, GPipe and 1F1B also with 2, 4
or 8 chunks per stage as the blocks allow (looped GPipe, interleaved 1F1B), recomputation off
and on, fp32 and (when the cluster gives bf16 FLOP/s) bf16. Layouts that fit rank by predicted
step time; those that do not, after them, by memory.
"""

from __future__ import annotations

from dataclasses import replace

from plait.errors import PlaitError
from plait.parallel.pipeline.schedules import SCHEDULES, VIRTUAL
from plait.plan.cluster import Cluster
from plait.plan.cost import Candidate, Estimate, Workload, estimate
from plait.plan.profile import ModelProfile


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def microbatch_counts(share: int, pp: int) -> list[int]:
    if pp == 1:
        return [1]
    counts = [m for m in divisors(share) if pp <= m <= 4 * pp]
    if share not in counts:
        counts.append(share)  # one sample per micro-batch
    return counts or [share]


CHUNKS = (2, 4, 8)
"""Chunks per stage weighed beside one (``pipeline.virtual``), as the model's blocks allow."""


def chunk_counts(schedule: str, m: int, pp: int, blocks: int) -> list[int]:
    """1, and the chunks per stage the schedule runs: pp x v pieces at most the blocks; interleaved
    1F1B needs micro-batches divisible by pp; with fewer micro-batches than stages a chunk's
    round waits for the activations to come round, and chunks gain nothing."""
    if pp == 1 or schedule not in VIRTUAL or m < pp or (schedule == "1f1b" and m % pp):
        return [1]
    return [1] + [v for v in CHUNKS if pp * v <= blocks]


def candidates(profile: ModelProfile, cluster: Cluster, work: Workload, world: int, check) -> list[Candidate]:
    """``check(candidate)``: raises ConfigError if the model does not allow it (cached by the caller)."""
    found = []
    precisions = ["fp32"] + (["bf16"] if "bf16" in cluster.flops else [])
    for tp in divisors(world):
        if tp > 1 and not profile.tp_ok:
            continue
        for pp in divisors(world // tp):
            dp = world // (tp * pp)
            if pp > len(profile.blocks) or work.batch_size % (dp * work.accum_steps):
                continue
            share = work.batch_size // (dp * work.accum_steps)
            for zero in ([0, 1, 2, 3] if dp > 1 else [0]):
                base = Candidate(dp, pp, tp, zero)
                try:
                    check(base)
                except PlaitError:  # the model does not split so (ConfigError is one)
                    continue
                for m in microbatch_counts(share, pp):
                    for schedule in (list(SCHEDULES) if pp > 1 else ["1f1b"]):
                        for v in chunk_counts(schedule, m, pp, len(profile.blocks)):
                            try:
                                check(replace(base, virtual=v))
                            except PlaitError:  # not cut so: its own forward, or a piece without parameters
                                continue
                            for recompute in (False, True):
                                for precision in precisions:
                                    for reshard in ((True, False) if zero == 3 else (True,)):
                                        found.append(replace(base, microbatches=m, schedule=schedule, virtual=v,
                                                             recompute=recompute, precision=precision,
                                                             reshard=reshard))
    return found


def rank(estimates: list[Estimate]) -> list[Estimate]:
    fit = sorted((e for e in estimates if e.fits), key=lambda e: e.step_s)
    unfit = sorted((e for e in estimates if not e.fits), key=lambda e: e.memory_bytes)
    return fit + unfit


def plan(profile: ModelProfile, cluster: Cluster, work: Workload, world: int, check) -> list[Estimate]:
    """Every valid layout's estimate, best first."""
    found = candidates(profile, cluster, work, world, check)
    if not found:
        raise PlaitError(f"plan: no layout of {profile.name} splits over {world} processes with a batch of "
                         f"{work.batch_size} (dp must divide the batch, pp at most {len(profile.blocks)} blocks)")
    return rank([estimate(profile, cluster, work, c) for c in found])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def rate(bps: float) -> str:
    return f"{bps / 1e9:.0f} GB/s" if bps >= 1e10 else f"{bps / 1e9:.2f} GB/s"


PARTS = {"compute": "compute", "tp": "tp collectives", "p2p": "pipeline sends", "bubble": "pipeline bubble",
         "dp": "gradient reduction", "zero_gather": "ZeRO gathers", "optimizer": "optimizer",
         "other": "per-step fixed cost"}


def cost_phrase(e: Estimate, part: str, cluster: Cluster) -> str:
    """What a part of a layout's step is, in words and numbers."""
    c, n, t = e.candidate, e.notes, e.time[part]
    where = {True: "crosses nodes", False: "inside a node"}
    if part == "tp":
        return (f"tp={c.tp} {where[n['tp_link'] is cluster.inter]}: {gb(n['tp_bytes'])} per step at "
                f"{rate(n['tp_link'].ops.get('all_reduce', (0, n['tp_link'].bandwidth))[1])} ({t:.3g} s)")
    if part == "bubble":
        if n.get("shared"):
            cores, local = n["shared"]
            return f"cores idle while ranks wait: the schedule replayed on {cores} cores shared by {local} processes ({t:.3g} s)"
        if c.schedule == "zbh1":  # the idle forward of each of the p-1 slots, out of three per micro-batch
            return f"the pipeline bubble: {c.pp - 1} of {3 * c.microbatches + c.pp - 1} pass slots idle ({t:.3g} s)"
        if c.virtual > 1:  # the fill and drain in chunk passes, v of them per micro-batch
            return (f"the pipeline bubble: {c.pp - 1} of {c.virtual * c.microbatches + c.pp - 1} chunk slots idle "
                    f"({t:.3g} s)")
        return f"the pipeline bubble: {c.pp - 1} of {c.microbatches + c.pp - 1} slots idle ({t:.3g} s)"
    if part == "dp":
        hidden = "after backward" if c.zero else "less what backward hides"
        return (f"gradients: {gb(n['dp_bytes'])} reduced over dp={c.dp} "
                f"{where[n['dp_link'] is cluster.inter]} ({t:.3g} s, {hidden})")
    if part == "zero_gather":
        return f"ZeRO-{c.zero} parameter all-gathers ({t:.3g} s)"
    if part == "p2p":
        return f"pipeline sends: {gb(n['p2p_bytes'])} per step ({t:.3g} s)"
    if part == "compute":
        extra = ", one more forward for recomputation" if c.recompute else ""
        where = "per rank, the stages' mean" if n.get("shared") else "on the slowest rank"
        return f"compute: {n['flops'] / 1e9:.3g} GFLOP {where} ({t:.3g} s{extra})"
    if part == "other":
        return f"each step's fixed cost: the cluster's step overhead and the gradient-norm all-reduces ({t:.3g} s)"
    return f"the optimizer step ({t:.3g} s)"


def explain(ranked: list[Estimate], cluster: Cluster, runners: int = 3) -> list[str]:
    """A sentence for the winner and for each of the next ``runners``: what costs them most."""
    best = ranked[0]
    lines = []
    if not best.fits:
        return lines
    top = max(best.time, key=best.time.get)
    lines.append(f"{best.candidate.describe()} wins: {best.step_s:.3g} s per step in {gb(best.memory_bytes)} per rank; "
                 f"its largest cost is {cost_phrase(best, top, cluster)}.")
    for e in ranked[1 : 1 + runners]:
        if not e.fits:
            break
        worse = max(e.time, key=lambda k: e.time[k] - best.time.get(k, 0.0))
        if e.step_s < best.step_s * 1.005:
            lines.append(f"{e.candidate.describe()}: as fast within 0.5%; it holds {gb(e.memory_bytes)} per rank.")
            continue
        lines.append(f"{e.candidate.describe()}: {e.step_s / best.step_s:.2f}x slower, mostly "
                     f"{cost_phrase(e, worse, cluster)}.")
    return lines


def shortfall(ranked: list[Estimate], cluster: Cluster) -> str:
    """Why no layout fits: the least memory any needs, and its largest part."""
    least = min(ranked, key=lambda e: e.memory_bytes)
    part = max(least.memory, key=least.memory.get)
    return (f"plan: no layout fits in {gb(cluster.memory_bytes)} of memory per device: the smallest "
            f"({least.candidate.describe()}) needs {gb(least.memory_bytes)}, {gb(least.memory_bytes - cluster.memory_bytes)} "
            f"short, most of it {part} ({gb(least.memory[part])}); add devices or memory")


def as_json(ranked: list[Estimate]) -> list[dict]:
    out = []
    for i, e in enumerate(ranked):
        c = e.candidate
        out.append({"dp": c.dp, "pp": c.pp, "tp": c.tp, "zero": c.zero, "microbatches": c.microbatches,
                    "schedule": c.schedule, "recompute": c.recompute, "precision": c.precision, "fits": e.fits,
                    "memory_bytes": int(e.memory_bytes), "step_s": e.step_s,
                    "tflops_per_device": e.tflops_per_device, "chosen": i == 0 and e.fits,
                    "memory": {k: int(v) for k, v in e.memory.items()}, "time": e.time})
    return out


def table(ranked: list[Estimate], top: int | None = None) -> str:
    rows = [("#", "layout", "memory/rank", "fits", "step s", "TFLOP/s/dev", "largest cost")]
    shown = ranked if top is None else ranked[:top]
    for i, e in enumerate(shown, 1):
        part = max(e.time, key=e.time.get)
        rows.append((str(i), e.candidate.describe(), gb(e.memory_bytes), "yes" if e.fits else "NO",
                     f"{e.step_s:.4g}", f"{e.tflops_per_device:.3g}", f"{PARTS[part]} {e.time[part] / e.step_s:.0%}"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if top is not None and len(ranked) > top:
        lines.append(f"... {len(ranked) - top} more (--top 0 shows all)")
    return "\n".join(lines)
