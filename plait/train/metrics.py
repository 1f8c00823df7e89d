"""What a run leaves behind: metrics.jsonl (one object per logged step), summary.json, loss.png,
and TensorBoard event files (``tensorboard --logdir runs`` shows every run)."""

from __future__ import annotations

import json
from pathlib import Path

from plait.observe.breakdown import PARTS


class RunLog:
    """Writes a run's outputs under ``out_dir/name``; used on rank 0 only."""

    def __init__(self, out_dir: str, name: str, resume_step: int | None = None, tensorboard: bool = True):
        """Start a fresh metrics file, or, resuming at ``resume_step``, keep the records up to it
        (and TensorBoard drops the earlier run's events after it)."""
        self.dir = Path(out_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.records: list[dict] = []
        if resume_step is not None and self.metrics_path.is_file():
            lines = self.metrics_path.read_text().splitlines()
            for i, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # the last line, torn by a worker killed while writing it
                        break
                    raise
                if record.get("step", 0) <= resume_step:
                    self.records.append(record)
        self._file = self.metrics_path.open("w")
        for record in self.records:
            self._file.write(json.dumps(record) + "\n")
        self.board = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            if resume_step is None:
                for old in self.dir.glob("events.out.tfevents.*"):  # a fresh run under an old name
                    old.unlink()
            self.board = SummaryWriter(str(self.dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.board:
            for tag, value in scalars(record):
                self.board.add_scalar(tag, value, record["step"])
            self.board.flush()

    def write_json(self, name: str, data: dict) -> Path:
        path = self.dir / name
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def plot_loss(self, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.records if "loss" in r]
        losses = [r["loss"] for r in self.records if "loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (global batch mean)")
        if losses and min(losses) > 0:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = self.dir / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def finish(self, summary: dict, config: dict, title: str) -> None:
        """The end of a run: summary.json, config.json, loss.png; the metrics file closed."""
        self.write_json("summary.json", summary)
        if self.board:  # the final evaluation, at the last step, beside the ones logged on the way
            for key, value in summary.items():
                if key.startswith("test_") and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, summary["steps"])
        self.write_json("config.json", config)
        self.plot_loss(title)
        self.close()

    def close(self) -> None:
        self._file.close()
        if self.board:
            self.board.close()


def scalars(record: dict):
    """(tag, value) of a record's numbers: ``loss``, ``time_comm_s``, ...; a ``per_rank`` list as
    ``rank1/time_comm_s``; the time parts under ``time/``, per rank under ``time_rank1/``."""
    def tag(key: str) -> str:
        return f"time/{key[5:-2]}" if key.startswith("time_") else key

    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield tag(key), value
    for key, values in record.get("per_rank", {}).items():
        for rank, value in enumerate(values):
            yield (f"time_rank{rank}/{key[5:-2]}" if key.startswith("time_") else f"rank{rank}/{key}"), value


def format_summary(s: dict, out_dir: str) -> str:
    n = s["world_size"]
    lines = [f"plait: {s['name']}: {s['steps']} steps on {n} process{'es' if n > 1 else ''} ({s['layout']}) "
             f"in {s['wall_time_s']:.1f} s, {s['samples_per_s']:.0f} samples/s"
             + (f", peak memory {s['peak_rss_bytes'] / 1e9:.2f} GB (largest rank)" if "peak_rss_bytes" in s else "")]
    figures = [f"final loss {s['final_loss']:.4g}", f"test loss {s['test_loss']:.4g}"]
    if "test_accuracy" in s:
        figures.append(f"test accuracy {s['test_accuracy']:.4f}")
    if "unigram_entropy" in s:
        figures.append(f"unigram entropy {s['unigram_entropy']:.3f} nats, {s['tokens_per_s']:.0f} tokens/s")
    if "weights_rel_error" in s:
        figures.append(f"weights vs closed-form least squares: relative error {s['weights_rel_error']:.2e}")
    lines.append("  " + ", ".join(figures))
    if "ps_mode" in s:
        gaps = f"largest clock gap {s['ps_max_clock_gap']}"
        if s["ps_mode"] == "ssp":
            gaps += f" (bound {s['ps_staleness']})"
        lost = "; ".join(f"rank {r} ({why})" for r, why in s["lost_workers"].items()) or "none"
        lines.append(f"  parameter server, {s['ps_mode']}: {sum(s['ps_updates'])} shard updates, {gaps}, "
                     f"largest staleness {s['ps_max_staleness']}; lost workers: {lost}")
    if "time_breakdown" in s:
        lines.append("  " + format_breakdown(s))
    lines.append(f"  outputs: {out_dir}/{s['name']}/ (metrics.jsonl, summary.json, loss.png"
                 f"{', TensorBoard events' if s.get('tensorboard', True) else ''}"
                 f"{', trace.json' if s.get('trace') else ''})")
    return "\n".join(lines)


def format_breakdown(s: dict) -> str:
    """'per step (rank 0): 8.8 ms = forward 3.4, ...; MFU 10.6% (peak 90.1 GFLOP/s, measured)'."""
    b = s["time_breakdown"]
    parts = sorted(((p, b[f"time_{p}_s"]) for p in PARTS if p != "other" and b[f"time_{p}_s"] > 0),
                   key=lambda kv: -kv[1]) + [("other", b["time_other_s"])]
    text = f"per step (rank 0): {b['step_time_s'] * 1e3:.1f} ms = " + ", ".join(f"{p} {v * 1e3:.1f}" for p, v in parts)
    if s.get("mfu") is not None:
        text += (f"; MFU {s['mfu']:.1%} (peak {s['peak_flops_per_s'] / 1e9:.1f} GFLOP/s, "
                 f"{s['peak_flops_source'].split(' (')[0]})")
    return text
