"""What a pipeline step looked like: a Chrome/Perfetto trace, a PNG timeline, the bubble."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from plait.parallel.pipeline.schedules import simulate

Trace = list[tuple[str, int, float, float, int]]  # (kind "F"/"B"/"I"/"W", micro-batch, start s, end s, chunk) of one stage
KINDS = {"F": ("forward", "#8ecae6"), "B": ("backward", "#219ebc"), "I": ("input gradient", "#219ebc"),
         "W": ("weight gradient", "#ffb703")}


def aligned(stamped: list[tuple[str, float, Trace]]) -> list[Trace]:
    """The stages' traces on one clock, from each stage's (host, origin, trace), its times
    counted from ``origin`` (``time.perf_counter``, the host's monotonic clock). The stages
    enter a step up to ~3 ms apart here, as much as a traced pass: on one host the traces shift
    by their origins' differences; across hosts the clocks are not comparable and each trace
    stays on its own origin (the step's start)."""
    if len({host for host, _, _ in stamped}) > 1:
        return [trace for _, _, trace in stamped]
    first = min(origin for _, origin, _ in stamped)
    return [[(k, i, b + shift, e + shift, c) for k, i, b, e, c in trace]
            for shift, trace in ((origin - first, trace) for _, origin, trace in stamped)]


def measured_bubble(traces: list[Trace]) -> float:
    """Mean over stages of the idle share of the step (from the first start to the last end)."""
    start = min(t[2] for trace in traces for t in trace)
    span = max(t[3] for trace in traces for t in trace) - start
    busy = [sum(end - begin for _, _, begin, end, _ in trace) for trace in traces]
    return sum(1 - b / span for b in busy) / len(traces)


def ideal_bubble(traces: list[Trace], schedule: str) -> float:
    """The bubble this schedule would have with these passes' typical times (each stage's median
    per kind) and nothing between them: what it exceeds the closed form by is the cost of
    unequal stages and passes."""
    times: dict = {}
    for s, trace in enumerate(traces):
        for kind, _, begin, end, _ in trace:
            times.setdefault((s, kind), []).append(end - begin)
    median = {key: statistics.median(v) for key, v in times.items()}
    return _replay(traces, schedule, lambda s, kind, *_: median[(s, kind)])


def replayed_bubble(traces: list[Trace], schedule: str) -> float:
    """The bubble this schedule would have with each traced pass's own time and nothing between
    passes: what ``measured_bubble`` exceeds it by is the engine's (messages on the wire, the
    bookkeeping between passes); what it exceeds ``ideal_bubble`` by, the passes' spread."""
    took = {(s, kind, mb, c): end - begin for s, trace in enumerate(traces) for kind, mb, begin, end, c in trace}
    return _replay(traces, schedule, lambda s, kind, i, c: took[(s, kind, i, c)])


def _replay(traces: list[Trace], schedule: str, duration) -> float:
    v = chunks(traces)
    m = sum(1 for kind, *_ in traces[0] if kind == "F") // v
    return simulate(schedule, m, len(traces), duration, v)


def chunks(traces: list[Trace]) -> int:
    """How many chunks (virtual stages) each stage ran."""
    return 1 + max(t[4] for t in traces[0])


def _label(kind: str, mb: int, chunk: int, v: int) -> str:
    return f"{kind}{mb}" + (f".{chunk}" if v > 1 else "")


def write_chrome_trace(traces: list[Trace], path: str | Path) -> Path:
    """A trace that chrome://tracing and ui.perfetto.dev load: one row (thread) per stage."""
    v = chunks(traces)
    events = [{"name": _label(kind, mb, c, v), "cat": KINDS[kind][0], "ph": "X",
               "ts": begin * 1e6, "dur": (end - begin) * 1e6, "pid": 0, "tid": stage, "args": {"chunk": c}}
              for stage, trace in enumerate(traces) for kind, mb, begin, end, c in trace]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stage {s}"}}
               for s in range(len(traces))]
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path


def plot_timeline(traces: list[Trace], path: str | Path, title: str) -> Path:
    """Stages as rows, micro-batches as labelled boxes (forward light, backward dark, a
    zero-bubble schedule's weight gradients yellow; "F3.1": micro-batch 3 on chunk 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start, v = min(t[2] for trace in traces for t in trace), chunks(traces)
    fig, ax = plt.subplots(figsize=(10, 0.7 * len(traces) + 1.2))
    for stage, trace in enumerate(traces):
        for kind, mb, begin, end, c in trace:
            left, width = (begin - start) * 1e3, (end - begin) * 1e3
            ax.broken_barh([(left, width)], (stage - 0.4, 0.8), color=KINDS[kind][1],
                           edgecolor="black", linewidth=0.5)
            ax.text(left + width / 2, stage, _label(kind, mb, c, v), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(traces)), [f"stage {s}" for s in range(len(traces))])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
