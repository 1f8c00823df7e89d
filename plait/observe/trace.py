"""A Perfetto (Chrome trace event) file of a few training steps on every rank.

One process row per rank, its spans nested as they ran: the step, then waiting for data,
forward and backward (per pipeline micro-batch, ``F0``, ``B0``, ...), the optimizer, and every
wait on communication (named by the operation: ``gradient all-reduce (bucket 1 of 2)``,
``ZeRO parameter all-gather``, ``pipeline receive from rank 1 (activations)``). Open it at
ui.perfetto.dev or chrome://tracing. The ranks' clocks start together after a barrier.
"""

from __future__ import annotations

import json
from pathlib import Path

from plait.observe.timing import Span


def trace_events(spans_per_rank: list[list[Span]], names: list[str]) -> list[dict]:
    events = []
    for rank, spans in enumerate(spans_per_rank):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": names[rank]}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        # Outer spans first at equal start times, so that viewers nest them correctly.
        for category, name, begin, end in sorted(spans, key=lambda s: (s[2], -s[3])):
            events.append({"name": name, "cat": category, "ph": "X", "ts": begin * 1e6, "dur": (end - begin) * 1e6,
                           "pid": rank, "tid": 0})
    return events


def write_run_trace(spans_per_rank: list[list[Span]], names: list[str], path: str | Path, title: str) -> Path:
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": trace_events(spans_per_rank, names), "displayTimeUnit": "ms",
                                "otherData": {"title": title}}))
    return path
