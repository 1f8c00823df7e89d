"""A cluster file: what the planner needs to know of the machines (TOML).

    name = "8 x A100 80GB SXM per node, InfiniBand HDR across"
    devices_per_node = 8
    memory_bytes = 80e9          # per device: what the model may use
    base_memory_bytes = 0        # held by every process besides the model (a CPU process's runtime)
    zero3_base_memory_bytes = 0  # the same under ZeRO-3 (default: base_memory_bytes)
    memory_bandwidth = 2.0e12    # bytes/s, what an optimizer step streams at
    weights_bandwidth = 2.0e12   # bytes/s, the weights read by each forward and backward pass
                                 # (optional; default memory_bandwidth)
    optimizer_tensor_s = 0.0     # the optimizer step's fixed cost per parameter tensor it updates
    op_overhead_s = 5e-6         # fixed cost of each dispatched operation (launch, Python)
    step_overhead_s = 0.0        # fixed cost of each step (data, bookkeeping)
    microbatch_overhead_s = 0.0  # a pipeline stage's own cost per micro-batch (schedule, send latency);
                                 # or per schedule: { gpipe = 2e-3, 1f1b = 2e-3, zbh1 = 3e-3 }
    recompute_factor = 1.0       # what recomputation adds to a backward, in forwards (1: one more)
    pass_scale = { "1" = 1.3, "64" = 1.0 }  # optional: samples per micro-batch -> the blocks' measured time
                                 # over the fitted one (between sizes interpolated, beyond clamped)
    overlap = 0.9                # share of a bucketed all-reduce that backward hides (0..1)
    cores = 0                    # cores the node's processes share (0: none shared; CPUs)

    [flops]                      # FLOP/s of one device on the model's matrix products
    fp32 = 19.5e12
    bf16 = 312e12
    efficiency = 0.7             # the share of those a large matrix product reaches

    [intra]                      # links inside a node
    latency_s = 10e-6
    bandwidth = 230e9            # bytes/s per device: bus bandwidth (nccl-tests' busbw)
    [inter]                      # links across nodes
    latency_s = 30e-6
    bandwidth = 22e9

A link may also give a collective its own figures, as ``plait calibrate`` measures them:
``all_reduce`` (and ``all_gather``, ``reduce_scatter``, ``send_recv``) in ``[intra]`` or
``[inter]``, a list of ``{ group = 2, latency_s = ..., bandwidth = ..., skew_s = ... }``, one
per group size measured (``group = 0``: any size); a group of g ranks takes the entry of the
largest size up to g. ``skew_s`` (optional, 0 by default; a link may give it too): how much
later a collective that follows compute completes, because its ranks arrive apart. Time of a collective over g ranks of n bytes: latency plus n / bandwidth
times 2(g-1)/g for an all-reduce, (g-1)/g for an all-gather or reduce-scatter (n the whole
tensor), 1 for a send.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from plait.errors import ConfigError

OPS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
SHIPPED = Path(__file__).with_name("clusters")


@dataclass(frozen=True)
class Link:
    latency_s: float
    bandwidth: float
    ops: dict = field(default_factory=dict)
    """Per collective: {group size: (latency_s, bandwidth)}, where measured (0: any size)."""

    skew_s: float = 0.0

    def figures(self, op: str, group: int) -> tuple[float, float, float]:
        """(latency, bandwidth, skew) of ``op`` over ``group`` ranks: measured for the nearest
        group size at most ``group`` (else the smallest measured), else the link's own."""
        sizes = self.ops.get(op)
        if not sizes:
            return self.latency_s, self.bandwidth, self.skew_s
        below = [g for g in sizes if g <= group]
        return sizes[max(below) if below else min(sizes)]

    def time(self, op: str, nbytes: float, group: int, calls: int = 1, skewed: int | None = None) -> float:
        """Seconds for ``calls`` collectives ``op`` of ``nbytes`` in all, over ``group`` ranks, of
        which ``skewed`` (default: all) follow compute; calls issued back to back after one
        burst of compute pay the skew once, a pipeline's sends none (its waits are its bubble)."""
        if group <= 1 or (nbytes <= 0 and calls <= 0):
            return 0.0
        latency, bandwidth, skew = self.figures(op, group)
        factor = {"all_reduce": 2 * (group - 1) / group, "send_recv": 1.0}.get(op, (group - 1) / group)
        return calls * latency + (calls if skewed is None else skewed) * skew + nbytes * factor / bandwidth


@dataclass(frozen=True)
class Cluster:
    name: str
    devices_per_node: int
    memory_bytes: float
    flops: dict
    """Precision -> FLOP/s of one device (peak times efficiency)."""
    intra: Link
    inter: Link
    base_memory_bytes: float = 0.0
    zero3_base_memory_bytes: float | None = None
    """A process's runtime under ZeRO-3, where ``plait train`` returns freed blocks of 4 MiB and
    more to the system (glibc; None: ``base_memory_bytes``)."""
    memory_bandwidth: float = 1e12
    weights_bandwidth: float | None = None
    """What a forward or backward pass reads its weights at (None: ``memory_bandwidth``).
    ``plait calibrate`` sets it where the blocks' own times show the weights read faster than the
    optimizer streams its state."""
    optimizer_tensor_s: float = 0.0
    """The optimizer step's fixed cost per parameter tensor (a per-tensor loop's operations, and
    the gradient-norm clip's), beyond the bytes it streams."""
    op_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    microbatch_overhead_s: float = 0.0
    schedule_overhead_s: dict = field(default_factory=dict)
    """Per schedule, where the file gives ``microbatch_overhead_s`` as a table; a schedule the
    table does not name costs ``microbatch_overhead_s``, which a table sets to its smallest entry."""
    recompute_factor: float = 1.0
    """What activation recomputation adds to a backward, as a share of the forward: one more
    forward, and (on a CPU) the checkpoint's own bookkeeping per saved tensor."""
    pass_scale: dict = field(default_factory=dict)
    """Samples per micro-batch -> the blocks' time measured there over the fitted line's (a pass
    is not linear in its samples at a few: matrix-vector kernels, kernel choices)."""
    overlap: float = 0.0
    cores: int = 0
    """Cores a node's processes share (0: each device computes on its own). Fewer than the
    devices: a process computes faster while others idle (the pipeline's fill and drain)."""
    nodes: int = 1
    source: str = ""

    def weight_reads(self) -> float:
        """Bytes per second a pass reads its weights at."""
        return self.weights_bandwidth or self.memory_bandwidth

    def scale_at(self, samples: float) -> float:
        """``pass_scale`` at ``samples``: linear in log(samples) between the sizes it gives,
        the nearest one's beyond them, 1 without it."""
        if not self.pass_scale:
            return 1.0
        sizes = sorted(self.pass_scale)
        if samples <= sizes[0]:
            return self.pass_scale[sizes[0]]
        for lo, hi in zip(sizes, sizes[1:]):
            if samples <= hi:
                w = math.log(samples / lo) / math.log(hi / lo)
                return self.pass_scale[lo] * (1 - w) + self.pass_scale[hi] * w
        return self.pass_scale[sizes[-1]]

    def microbatch_overhead(self, schedule: str) -> float:
        """A pipeline stage's own cost per micro-batch under ``schedule``."""
        return self.schedule_overhead_s.get(schedule, self.microbatch_overhead_s)

    def link(self, span: int) -> Link:
        """The link a group spanning ``span`` consecutive ranks crosses."""
        return self.intra if span <= self.devices_per_node else self.inter


def _number(table: dict, key: str, where: str, positive: bool = True, default=None) -> float:
    if key not in table:
        if default is not None:
            return default
        raise ConfigError(f"{where}: missing field {key!r}")
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{where}: {key} must be {'positive' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _link(table: dict, key: str, where: str) -> Link:
    if key not in table or not isinstance(table[key], dict):
        raise ConfigError(f"{where}: missing table [{key}] (latency_s and bandwidth of the links "
                          f"{'inside' if key == 'intra' else 'across'} a node)")
    t = table[key]
    unknown = set(t) - {"latency_s", "bandwidth", "skew_s", *OPS}
    if unknown:
        raise ConfigError(f"{where}: [{key}] has unknown field {sorted(unknown)[0]!r}")
    ops = {}
    for op in (o for o in OPS if o in t):
        entries = t[op] if isinstance(t[op], list) else [t[op]]
        label = f"{where}: [{key}] {op}"
        if not entries or not all(isinstance(e, dict) for e in entries):
            raise ConfigError(f"{label}: expected {{ group = G, latency_s = S, bandwidth = B }} entries")
        ops[op] = {int(_number(e, "group", label, positive=False, default=0.0)):
                   (_number(e, "latency_s", label, positive=False), _number(e, "bandwidth", label),
                    _number(e, "skew_s", label, positive=False, default=0.0)) for e in entries}
    return Link(_number(t, "latency_s", f"{where}: [{key}]", positive=False), _number(t, "bandwidth", f"{where}: [{key}]"),
                ops, _number(t, "skew_s", f"{where}: [{key}]", positive=False, default=0.0))


def _pass_scale(table, where: str) -> dict:
    label = f"{where}: pass_scale"
    if not isinstance(table, dict):
        raise ConfigError(f"{label}: expected a table of samples per micro-batch -> factor, got {table!r}")
    out = {}
    for key in table:
        if not str(key).isdigit() or int(key) < 1:
            raise ConfigError(f"{label}: keys are samples per micro-batch (whole numbers from 1), got {key!r}")
        out[int(key)] = _number(table, key, label)
    return out


def _overheads(data: dict, where: str) -> dict:
    """``microbatch_overhead_s``: one number, or a table of them by schedule."""
    from plait.parallel.pipeline.schedules import SCHEDULES

    table = data.get("microbatch_overhead_s")
    if not isinstance(table, dict):
        return {"microbatch_overhead_s": _number(data, "microbatch_overhead_s", where, positive=False, default=0.0)}
    label = f"{where}: microbatch_overhead_s"
    unknown = set(table) - set(SCHEDULES)
    if unknown or not table:
        raise ConfigError(f"{label}: expected seconds per schedule ({', '.join(SCHEDULES)}), "
                          f"got {sorted(unknown)[0] if unknown else 'an empty table'!r}")
    each = {k: _number(table, k, label, positive=False) for k in table}
    return {"microbatch_overhead_s": min(each.values()), "schedule_overhead_s": each}


FIELDS = {"name", "devices_per_node", "cores", "memory_bytes", "base_memory_bytes", "zero3_base_memory_bytes",
          "memory_bandwidth", "weights_bandwidth",
          "optimizer_tensor_s", "op_overhead_s",
          "step_overhead_s", "microbatch_overhead_s", "recompute_factor", "pass_scale", "overlap", "flops", "intra",
          "inter"}


def parse_cluster(data: dict, where: str) -> Cluster:
    unknown = set(data) - FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(sorted(FIELDS))})")
    per_node = _number(data, "devices_per_node", where)
    if per_node != int(per_node):
        raise ConfigError(f"{where}: devices_per_node must be an integer, got {data['devices_per_node']!r}")
    flops = data.get("flops")
    if not isinstance(flops, dict) or not ({"fp32", "bf16"} & set(flops)):
        raise ConfigError(f"{where}: missing table [flops] with fp32 and/or bf16 (FLOP/s of one device)")
    unknown = set(flops) - {"fp32", "bf16", "efficiency"}
    if unknown:
        raise ConfigError(f"{where}: [flops] has unknown field {sorted(unknown)[0]!r}")
    efficiency = _number(flops, "efficiency", f"{where}: [flops]", default=1.0)
    if efficiency > 1:
        raise ConfigError(f"{where}: [flops] efficiency must be at most 1, got {efficiency}")
    rates = {k: _number(flops, k, f"{where}: [flops]") * efficiency for k in ("fp32", "bf16") if k in flops}
    overlap = _number(data, "overlap", where, positive=False, default=0.0)
    if overlap > 1:
        raise ConfigError(f"{where}: overlap must be between 0 and 1, got {overlap}")
    return Cluster(
        name=str(data.get("name", where)), devices_per_node=int(per_node),
        memory_bytes=_number(data, "memory_bytes", where), flops=rates,
        intra=_link(data, "intra", where), inter=_link(data, "inter", where),
        base_memory_bytes=_number(data, "base_memory_bytes", where, positive=False, default=0.0),
        zero3_base_memory_bytes=(_number(data, "zero3_base_memory_bytes", where, positive=False)
                                 if "zero3_base_memory_bytes" in data else None),
        memory_bandwidth=_number(data, "memory_bandwidth", where, default=1e12),
        weights_bandwidth=_number(data, "weights_bandwidth", where) if "weights_bandwidth" in data else None,
        optimizer_tensor_s=_number(data, "optimizer_tensor_s", where, positive=False, default=0.0),
        op_overhead_s=_number(data, "op_overhead_s", where, positive=False, default=0.0),
        step_overhead_s=_number(data, "step_overhead_s", where, positive=False, default=0.0),
        **_overheads(data, where),
        recompute_factor=_number(data, "recompute_factor", where, positive=False, default=1.0),
        pass_scale=_pass_scale(data.get("pass_scale", {}), where),
        overlap=overlap, cores=int(_number(data, "cores", where, positive=False, default=0.0)), source=where)


def shipped_clusters() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def load_cluster(path: str) -> Cluster:
    """A cluster file by path, or a shipped one by name (``a100-80gb``)."""
    file = Path(path)
    if not file.exists() and (SHIPPED / f"{path}.toml").exists():
        file = SHIPPED / f"{path}.toml"
    if not file.exists():
        raise ConfigError(f"--cluster: no file {path!r} (shipped: {', '.join(shipped_clusters())})")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--cluster {path}: not valid TOML: {exc}") from None
    return parse_cluster(data, f"cluster file {file}")
