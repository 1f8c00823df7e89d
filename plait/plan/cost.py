"""The cost model: per-rank peak memory and step time of a layout, from a model's profile and a
cluster, with no model built and nothing run.

Ranks are laid out as the mesh lays them (``dp`` outermost, ``tp`` innermost): a tp group is tp
consecutive ranks, a pp group strides by tp, a dp group by pp x tp; a group whose span exceeds a
node's devices crosses nodes and pays the slower link.

Memory follows what the engines hold (``plait.parallel``): parameters and gradients of the stage
(tp's split part divided), optimizer state (divided by dp under ZeRO), ZeRO-2's transient full
gradient and ZeRO-3's two whole units (all of them kept whole into backward), the activations
autograd keeps per micro-batch times the micro-batches in flight (GPipe: all of them; 1F1B:
pp - stage; with several chunks per stage, each chunk's in flight at the schedule's peak), or
with recomputation each block's input plus one block's activations, and the runtime's own memory.

Time: each stage's forward and backward per micro-batch (FLOPs at the device's FLOP/s, its
weights read from memory once forward and twice backward, a fixed cost per dispatched
operation), tp's collectives, the pipeline's sends, (m + pp - 1) slots of the slowest stage (the
bubble is the pp - 1 extra; with v chunks per stage (pp - 1) / v, for v times the sends and the
per-micro-batch cost), then data-parallel gradient reduction
(DataParallel's buckets overlap backward by the cluster's ``overlap``; ZeRO reduces after it),
ZeRO's parameter gathers, and the optimizer step at memory bandwidth with a fixed cost per tensor
it updates. Where a node's processes share fewer cores than they are (CPUs), a waiting rank
gives its core to the others: the schedule is replayed under processor sharing instead
(``plait.plan.shared``), and the bubble is what the cores idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from plait.parallel.pipeline.cut import _balance
from plait.parallel.pipeline.schedules import SCHEDULES, in_flight
from plait.plan.cluster import Cluster
from plait.plan.profile import ModelProfile
from plait.plan.shared import shared_step

OPTIMIZER_STATE = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}
"""fp32 tensors of state per parameter element."""
OPTIMIZER_BYTES = {"sgd": 12, "sgd_momentum": 20, "adam": 36, "adamw": 36}
"""Bytes an optimizer step reads and writes per element (parameter, gradient, state)."""
CLIP_BYTES = 44
"""Bytes the gradient-norm clip reads and writes per element: each gradient made float64 and
squared (4 read, 8 written, 8 read, 8 written, 8 read for the sum), then scaled in place (4 + 4)."""


def optimizer_bytes(optimizer: str, grad_clip: bool) -> int:
    """Bytes per element of the trainer's optimizer span: the clip, if any, and the step."""
    return OPTIMIZER_BYTES[optimizer] + (CLIP_BYTES if grad_clip else 0)


@dataclass(frozen=True)
class Candidate:
    dp: int
    pp: int
    tp: int
    zero: int = 0
    microbatches: int = 1
    schedule: str = "1f1b"
    recompute: bool = False
    precision: str = "fp32"
    reshard: bool = True
    """ZeRO-3 frees a unit after its forward (``parallel.reshard_after_forward``); False keeps
    every unit whole from its forward into its backward: faster, the stage's parameters whole."""
    virtual: int = 1
    """Chunks per pipeline stage (``pipeline.virtual``): interleaved 1F1B or looped GPipe."""

    def describe(self) -> str:
        text = f"dp={self.dp} pp={self.pp} tp={self.tp}"
        if self.zero:
            text += f" ZeRO-{self.zero}" + (" no-reshard" if self.zero == 3 and not self.reshard else "")
        if self.pp > 1:
            text += f" m={self.microbatches} {self.schedule}" + (f" v={self.virtual}" if self.virtual > 1 else "")
        if self.recompute:
            text += " recompute"
        return text + (" bf16" if self.precision == "bf16" else "")

    def overrides(self) -> list[str]:
        """The ``--set`` values that train this layout."""
        sets = [f"parallel.dp={self.dp}", f"parallel.pp={self.pp}", f"parallel.tp={self.tp}",
                f"parallel.zero={self.zero}", f"pipeline.microbatches={self.microbatches}",
                f'pipeline.schedule="{self.schedule}"', f"pipeline.virtual={self.virtual}",
                f"train.recompute={str(self.recompute).lower()}",
                f"parallel.reshard_after_forward={str(self.reshard).lower()}"]
        if self.precision == "bf16":
            sets += ["train.bf16=true", 'parallel.grad_dtype="bf16"']
        return sets


@dataclass
class Workload:
    """What the config fixes besides the layout."""

    batch_size: int
    accum_steps: int = 1
    optimizer: str = "sgd"
    bucket_mb: float = 25.0
    nodes: int = 1
    grad_clip: bool = False
    """Clipping all-reduces the gradient norm over each split axis every step."""
    prefetch: bool = True
    """ZeRO-3 prefetches the next unit's gather (``parallel.prefetch``): two units whole at once."""


def _behind(link, nbytes: float, group: int, calls: int, backward: float, overlap: float) -> float:
    """Exposed seconds of ``calls`` all-reduces launched asynchronously during a backward of
    ``backward`` seconds: their latency waits behind the computation (it costs no core), the
    transfer only by the cluster's ``overlap`` (on shared cores it takes the cores backward needs)."""
    if group <= 1:
        return 0.0
    latency, bandwidth, skew = link.figures("all_reduce", group)
    transfer = nbytes * 2 * (group - 1) / group / bandwidth
    return skew + max(calls * latency - backward, latency) + transfer * (1 - overlap)


def _prefetched(link, nbytes: float, group: int, units: int, compute: float, overlap: float) -> float:
    """Exposed seconds of ZeRO-3's all-gathers of ``units`` units over one pass of ``compute``
    seconds: each unit's gather is launched before the pass of the one before it, so all but the
    first travel behind the computation, by the cluster's ``overlap`` (none on shared cores)."""
    serial = link.time("all_gather", nbytes, group, units)
    hidden = min(overlap * serial * (units - 1) / max(units, 1), compute)
    return serial - hidden


def _stages(profile: ModelProfile, pp: int, tp: int, v: int = 1) -> list[dict]:
    """Each stage's sums over its blocks under tp (per sample where the blocks' are), cached on
    the profile: thousands of layouts share a few (pp, tp, v). With v chunks per stage the model
    is cut into pp x v pieces and stage s holds pieces s, s + pp, ... (as the trainer cuts);
    ``chunks`` has each chunk's parameters, units, last unit and FLOPs, ``sent`` the bytes per
    sample its pieces send and receive (activations out, gradients back)."""
    cache = profile.__dict__.setdefault("_stage_cache", {})
    if (pp, tp, v) not in cache:
        starts = stage_starts(profile, pp * v)
        pieces = pp * v
        rows = []
        for s in range(pp):
            chunks, blocks, held, kept, sent = [], [], [], [], 0.0
            for q in range(s, pieces, pp):  # chunk c is piece c * pp + s
                piece = profile.blocks[starts[q] : starts[q + 1]]
                params = [bl.params - bl.split_params + bl.split_params / tp for bl in piece]
                saved = [bl.saved + bl.saved_split / tp for bl in piece]
                chunks.append({"params": sum(params), "units": len(piece), "last": params[-1] if params else 0.0,
                               "flops": sum(bl.flops - bl.split_flops + bl.split_flops / tp for bl in piece),
                               "saved": sum(saved), "inputs": sum(bl.input_bytes for bl in piece)})
                blocks += piece
                held += params
                kept += saved
                if q < pieces - 1:  # its output to the next piece, and that one's gradient back
                    sent += profile.blocks[starts[q + 1]].input_bytes
                if q > 0:  # its input from the previous piece, and its gradient back
                    sent += piece[0].input_bytes
            rows.append({"params": sum(held), "largest": max(held, default=0.0), "units": len(blocks),
                         "chunks": chunks, "sent": sent, "ops": sum(bl.ops for bl in blocks),
                         "flops": sum(ch["flops"] for ch in chunks),
                         "tp_reduce": sum(bl.tp_reduce for bl in blocks), "tp_gather": sum(bl.tp_gather for bl in blocks),
                         "tp_calls": sum(bl.tp_calls for bl in blocks), "tensors": sum(bl.tensors for bl in blocks),
                         "most_saved": max(kept, default=0.0)})
        cache[(pp, tp, v)] = rows
    return cache[(pp, tp, v)]


def stage_starts(profile: ModelProfile, pieces: int) -> list[int]:
    """Where each piece starts and the end, as the trainer's parameter balance cuts (cached on
    the profile: every layout of a pp x v shares its cut)."""
    cache = profile.__dict__.setdefault("_cut_cache", {})
    if pieces not in cache:
        cache[pieces] = ([0, *_balance(profile.weights, pieces), len(profile.blocks)] if pieces > 1
                         else [0, len(profile.blocks)])
    return cache[pieces]


@dataclass
class Estimate:
    candidate: Candidate
    memory: dict
    """Bytes per part on the rank that holds the most."""
    time: dict
    """Seconds per part of a step (the slowest stage's)."""
    fits: bool
    flops_per_step: float
    world: int
    notes: dict
    """What the explanations quote: bytes moved per link, bubble share."""
    stages: list
    """Each pipeline stage's memory parts (``memory`` is the largest)."""

    @property
    def memory_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def step_s(self) -> float:
        return sum(self.time.values())

    @property
    def tflops_per_device(self) -> float:
        return self.flops_per_step / self.step_s / self.world / 1e12


def _step(times: list[dict], shares: list[dict], c: Candidate, k: int, cluster: Cluster, local: int) -> dict:
    """The step's parts, from each stage's (``times``; ``shares``: its passes per micro-batch and
    its tail, for the replay). Devices of their own: the slowest stage's. Cores shared by the
    node's ``local`` processes (CPUs): the schedule replayed under processor sharing
    (``plait.plan.shared``); the parts are then the mean stage's work, and the ``bubble`` is
    what the replay takes beyond it, the cores idle while ranks wait."""
    if not 0 < cluster.cores < local:
        return max(times, key=lambda t: sum(t.values()))
    span = shared_step(c.schedule, c.microbatches, k, shares, c.dp * c.tp, cluster.cores, local, c.virtual)
    work = {part: sum(t[part] for t in times) / len(times) for part in times[0] if part not in ("bubble", "other")}
    return {**work, "bubble": max(span - sum(work.values()), 0.0), "other": times[0]["other"]}


@lru_cache(maxsize=65536)
def _held(schedule: str, m: int, p: int, s: int, v: int = 1) -> tuple[tuple[int, ...], ...]:
    """Micro-batches stage s of the schedule holds at once, per chunk: the counts at every
    moment none of whose counts another moment exceeds (with one chunk, the peak alone); what a
    stage holds at its peak is the most any of them weighs (its chunks' activations differ)."""
    if v == 1:  # in_flight(SCHEDULES[schedule](m, p, s)), in closed form where known (tests/test_plan_shared.py)
        closed = {"gpipe": m, "1f1b": min(p - s, m), "zbh1": min(p, m)}.get(schedule)
        return ((in_flight(SCHEDULES[schedule](m, p, s)) if closed is None else closed,),)
    live, seen = [0] * v, set()
    for kind, _, c in SCHEDULES[schedule](m, p, s, v):
        live[c] += kind == "F"
        live[c] -= kind in "BW"
        if kind == "F":  # only a forward adds: the peaks are right after one
            seen.add(tuple(live))
    front: list[tuple[int, ...]] = []
    for a in sorted(seen, key=sum, reverse=True):  # none later exceeds an earlier one everywhere
        if not any(all(x >= y for x, y in zip(b, a)) for b in front):
            front.append(a)
    return tuple(front)


def _held_bytes(held: tuple[tuple[int, ...], ...], per_chunk: list[float]) -> float:
    if len(per_chunk) == 1:
        return held[0][0] * per_chunk[0]
    return max(sum(n * b for n, b in zip(counts, per_chunk)) for counts in held)


@lru_cache(maxsize=65536)
def _kept(schedule: str, m: int, p: int, s: int, v: int = 1) -> tuple[int, ...]:
    """Per chunk, backward passes of stage s whose chunk last ran a forward: ZeRO-3 (one engine
    per chunk) keeps the chunk's last unit whole from that forward into such a backward (one
    gather fewer); the chunk's next forward frees it."""
    if v == 1 and schedule in ("gpipe", "1f1b", "zbh1"):  # closed forms (tests/test_plan_shared.py)
        return (1 if schedule == "gpipe" else max(m - (p - s - 1), 1),)
    last, kept = [""] * v, [0] * v
    for kind, _, c in SCHEDULES[schedule](m, p, s, v):
        kept[c] += kind in "BI" and last[c] == "F"
        last[c] = kind
    return tuple(kept)


@lru_cache(maxsize=65536)
def _gathers_keeping_units(schedule: str, m: int, p: int, s: int, v: int = 1) -> tuple[tuple[int, int], ...]:
    """ZeRO-3 with ``reshard_after_forward`` off: per chunk, (forward, backward) passes of stage
    s that gather its units. A forward leaves them whole; a pass that reduces the gradients (B,
    or ZB-H1's W) frees them, so that only a pass after such a one gathers."""
    if v == 1 and schedule in ("gpipe", "1f1b"):  # closed forms (tests/test_plan_shared.py)
        forwards = 1 if schedule == "gpipe" else max(m - min(p - s - 1, m), 1)
        return ((forwards, m - forwards),)
    whole, counts = [False] * v, [[0, 0] for _ in range(v)]
    for kind, _, c in SCHEDULES[schedule](m, p, s, v):
        if not whole[c]:
            counts[c][kind != "F"] += 1
        whole[c] = kind in "FI"
    return tuple(map(tuple, counts))


def estimate(profile: ModelProfile, cluster: Cluster, work: Workload, c: Candidate) -> Estimate:
    world = c.dp * c.pp * c.tp
    b = work.batch_size / (c.dp * work.accum_steps * c.microbatches)  # samples per micro-batch
    m, k, v = c.microbatches, work.accum_steps, c.virtual
    rate = cluster.flops.get(c.precision) or cluster.flops.get("fp32") or next(iter(cluster.flops.values()))
    act_scale = 0.5 if c.precision == "bf16" else 1.0
    grad_bytes = 2 if c.precision == "bf16" else 4
    tp_link = cluster.link(c.tp)
    pp_link = cluster.link(c.tp * c.pp)
    dp_link = cluster.link(world)
    state_per = OPTIMIZER_STATE[work.optimizer]
    worst_mem: dict = {}
    stages: list = []
    times: list = []
    shares: list = []
    notes: dict = {}
    slowest = 0.0
    for s, st in enumerate(_stages(profile, c.pp, c.tp, v)):
        params, largest, ops = st["params"], st["largest"], st["ops"]
        flops = st["flops"] * b
        reads = params * (2 if c.precision == "bf16" else 4) / cluster.weight_reads()  # the weights, per pass
        scale = cluster.scale_at(b)  # where a pass at b samples is off the calibrated line
        t_f = (flops / rate + ops * cluster.op_overhead_s + reads) * scale
        t_b = (flops * profile.backward_ratio / rate + ops * profile.backward_ops_ratio * cluster.op_overhead_s
               + 2 * reads) * scale
        if c.recompute:  # the forward again, and what the checkpoint's bookkeeping costs (calibrated);
            # ZB-H1 recomputes for its input pass and again for its weight pass
            t_b += cluster.recompute_factor * t_f * (2 if c.schedule == "zbh1" and c.pp > 1 else 1)
        tp_bytes = st["tp_reduce"] * b * act_scale
        tp_gather = st["tp_gather"] * b * act_scale
        tp_calls = st["tp_calls"]
        t_tp = 0.0
        if c.tp > 1:
            t_tp = tp_link.time("all_reduce", tp_bytes, c.tp, tp_calls) + tp_link.time("all_gather", tp_gather, c.tp, 0)
        # activations forward to the next piece, gradients back to the previous: whole on every tp rank
        sent = st["sent"] * b * act_scale
        t_p2p = 0.0
        if c.pp > 1:  # the bytes, and the stage's own cost per micro-batch and chunk (which holds the sends' latency)
            t_p2p = pp_link.time("send_recv", sent, 2, 0) + cluster.microbatch_overhead(c.schedule) * v
        slot = t_f + t_b + t_tp + t_p2p
        # data-parallel gradient reduction and ZeRO's gathers, once per step (ZeRO-3: per micro-batch)
        grad = params * grad_bytes
        # DataParallel's and ZeRO 1-2's, one wrapper per chunk
        buckets = sum(max(1, math.ceil(ch["params"] * grad_bytes / (work.bucket_mb * 2**20))) for ch in st["chunks"])
        t_dp = t_gather = 0.0
        if c.dp > 1:
            if c.zero < 3:  # buckets reduced as backward fills them (ZeRO 1-2: then slices gathered)
                t_dp = _behind(dp_link, grad, c.dp, buckets, t_b, cluster.overlap)
                if c.zero:
                    t_gather = dp_link.time("all_gather", params * 4, c.dp, v)
            else:
                tensors = st["tensors"]  # on gloo each reduced where autograd left it
                t_dp = m * k * _behind(dp_link, grad, c.dp, tensors, t_b, cluster.overlap)
                overlap = cluster.overlap if work.prefetch else 0.0  # without it, each gather waits
                kept = _kept(c.schedule, m, c.pp, s, v) if c.pp > 1 else (m,)
                gathered = _gathers_keeping_units(c.schedule, m, c.pp, s, v) if c.pp > 1 else ((m, 0),)
                for ch, kept_c, (forwards, backwards) in zip(st["chunks"], kept, gathered):  # each chunk's units
                    share = ch["flops"] / st["flops"] if st["flops"] else 1 / v
                    forward = _prefetched(dp_link, ch["params"] * 4, c.dp, ch["units"], t_f * share, overlap)
                    backward = _prefetched(dp_link, ch["params"] * 4, c.dp, ch["units"], t_b * share, overlap)
                    if c.reshard:  # a backward whose chunk last ran a forward finds its last unit whole
                        last = ch["last"] if ch["units"] > 1 else ch["params"]
                        short = _prefetched(dp_link, (ch["params"] - last) * 4, c.dp, ch["units"] - 1, t_b * share,
                                            overlap)
                        t_gather += k * (m * forward + kept_c * short + (m - kept_c) * backward)
                    else:  # units whole from each forward into its backward
                        t_gather += k * (forwards * forward + backwards * backward)
        # the trainer's own per step: the gradient norm over each split axis (the loss is all-reduced
        # at log steps only, between steps)
        t_step = 0.0
        if work.grad_clip:
            for size, span in ((c.tp, c.tp), (c.pp, c.tp * c.pp), (c.dp if c.zero else 1, world)):
                t_step += cluster.link(span).time("all_reduce", 8, size)
        shard = c.dp if c.zero else 1
        # the step streams this rank's elements, and pays a fixed cost per tensor it updates: each
        # parameter's, or ZeRO's flat shards (one per bucket; stage 3: one per unit)
        updated = {0: st["tensors"], 3: st["units"]}.get(c.zero, buckets)
        t_opt = (params / shard * optimizer_bytes(work.optimizer, work.grad_clip) / cluster.memory_bandwidth
                 + updated * cluster.optimizer_tensor_s)
        held = _held(c.schedule, m, c.pp, s, v) if c.pp > 1 else ((1,),)
        # ZeRO-3's units whole at once: the one computing and the one prefetched, or all of them
        whole = (2 if work.prefetch else 1) * largest if c.reshard else params
        key = "inputs" if c.recompute else "saved"  # what each micro-batch in flight keeps, per chunk
        saved_peak = (_held_bytes(held, [ch[key] for ch in st["chunks"]])
                      + (st["most_saved"] if c.recompute else 0.0)) * b * act_scale
        mem = {
            "params": (params / c.dp + whole if c.zero == 3 else params) * 4,
            # ZeRO-2 holds whole gradients only for the buckets in flight (at most two)
            "grads": {0: params, 1: params, 2: min(params, 2 * work.bucket_mb * 2**20 / 4) + params / c.dp,
                      3: 2 * largest + params / c.dp}[c.zero] * 4,
            "optimizer": params * state_per * 4 / shard,
            "activations": saved_peak,
            "buffers": (sent * 2 + (min(grad, work.bucket_mb * 2**20) if c.precision == "bf16" else 0)
                        + (2 * params * 2 if c.precision == "bf16" else 0)),
            "runtime": cluster.base_memory_bytes if c.zero < 3 or cluster.zero3_base_memory_bytes is None
            else cluster.zero3_base_memory_bytes,
        }
        time = {
            "compute": (t_f + t_b) * m * k,
            "tp": t_tp * m * k,
            "p2p": t_p2p * m * k,
            # each accumulation step is a schedule; zero-bubble fills all but F of each slot (the
            # input's gradient and the weights' taken as equal halves of the backward)
            "bubble": (c.pp - 1) * (slot - t_b if c.schedule == "zbh1" else slot) * k / v,
            "dp": t_dp,
            "zero_gather": t_gather,
            "optimizer": t_opt,
            "other": t_step + cluster.step_overhead_s,
        }
        stages.append(mem)
        times.append(time)
        edge = (t_tp + t_p2p) / 2  # a pass's share of its stage's collectives and sends
        shares.append({"F": t_f + edge, "B": t_b + edge, "I": t_b / 2 + edge, "W": t_b / 2,
                       "tail": t_dp + t_gather + t_opt})
        if sum(mem.values()) > sum(worst_mem.values()):
            worst_mem = mem
        took = sum(time.values())
        if took >= slowest:  # the slowest stage so far
            slowest = took
            notes = {"tp_bytes": (tp_bytes + tp_gather) * m * k, "tp_link": tp_link, "dp_bytes": grad, "dp_link": dp_link,
                     "p2p_bytes": sent * m * k, "pp_link": pp_link, "stage": s, "flops": flops * m * k}
    local = min(world, cluster.devices_per_node)
    worst_time = _step(times, shares, c, k, cluster, local)
    notes["shared"] = (cluster.cores, local) if 0 < cluster.cores < local else None
    if notes["shared"]:  # the parts are the mean stage's: so is the compute its reason quotes
        notes["flops"] = sum(st["flops"] for st in _stages(profile, c.pp, c.tp, v)) * b * m * k / c.pp
    fits = sum(worst_mem.values()) <= cluster.memory_bytes
    per_step = profile.flops_per_sample * work.batch_size
    return Estimate(c, worst_mem, worst_time, fits, per_step, world, notes, stages)
