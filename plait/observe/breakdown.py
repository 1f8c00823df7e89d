"""A run's time breakdown per rank: each step's parts summed, gathered from every rank at each log.

Per logged interval and for the whole run, each rank's mean seconds per step in each part
(``time_data_s``, ``time_forward_s``, ``time_backward_s``, ``time_comm_s``, ``time_bubble_s``,
``time_optimizer_s``, and ``time_other_s``: the step's own statements outside any part), their
sum ``step_time_s``, and the rank's peak memory. Rank 0's figures are the record's top-level
keys; every rank's are lists under ``per_rank``.
"""

from __future__ import annotations

import resource

import torch

from plait.distributed.comm import all_gather_flat
from plait.observe.timing import CATEGORIES

PARTS = (*CATEGORIES, "other")
FIELDS = ("step_time_s", *(f"time_{p}_s" for p in PARTS), "peak_memory_bytes")


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: torch.device) -> int:
    """This process's peak memory so far: the CUDA allocator's peak on a GPU, else the peak
    resident set."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()


class Breakdown:
    """Seconds per part of this rank's steps, since the last log and since the start."""

    def __init__(self, world_size: int, device: torch.device):
        self.world_size, self.device = world_size, device
        self.interval = torch.zeros(len(PARTS), dtype=torch.float64)
        self.whole = torch.zeros(len(PARTS), dtype=torch.float64)
        self.interval_steps = self.whole_steps = 0

    def add(self, totals: dict[str, float]) -> None:
        """One step's totals (``Recorder.take()``); ``step`` holds the step's own time (other)."""
        row = torch.tensor([totals.get(p, 0.0) for p in CATEGORIES] + [totals.get("step", 0.0)], dtype=torch.float64)
        self.interval += row
        self.whole += row
        self.interval_steps += 1
        self.whole_steps += 1

    def interval_fields(self) -> dict:
        """The interval's figures from every rank (a collective: every rank calls it), then a new interval."""
        fields = self._gather(self.interval, self.interval_steps)
        self.interval.zero_()
        self.interval_steps = 0
        return fields

    def whole_fields(self) -> dict:
        """The whole run's figures from every rank (a collective)."""
        return self._gather(self.whole, self.whole_steps)

    def _gather(self, sums: torch.Tensor, steps: int) -> dict:
        means = sums / max(steps, 1)
        mine = torch.cat([means.sum().view(1), means, torch.tensor([float(peak_memory(self.device))],
                                                                   dtype=torch.float64)])
        if self.world_size > 1:
            mine = mine.to(self.device)  # NCCL gathers on the GPU
            everyone = mine.new_empty(self.world_size * len(mine))
            all_gather_flat(everyone, mine, None)
            rows = everyone.cpu().view(self.world_size, -1)
        else:
            rows = mine.view(1, -1)
        per_rank = {field: rows[:, k].tolist() for k, field in enumerate(FIELDS)}
        per_rank["peak_memory_bytes"] = [int(v) for v in per_rank["peak_memory_bytes"]]
        return {**{field: values[0] for field, values in per_rank.items()}, "per_rank": per_rank}
