"""What a run leaves behind: metrics.jsonl (one object per logged step), summary.json, loss.png."""

from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    """Writes a run's outputs under ``out_dir/name``; used on rank 0 only."""

    def __init__(self, out_dir: str, name: str, resume_step: int | None = None):
        """Start a fresh metrics file, or, resuming at ``resume_step``, keep the records up to it."""
        self.dir = Path(out_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.records: list[dict] = []
        if resume_step is not None and self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                record = json.loads(line)
                if record.get("step", 0) <= resume_step:
                    self.records.append(record)
        self._file = self.metrics_path.open("w")
        for record in self.records:
            self._file.write(json.dumps(record) + "\n")

    def log(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

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
        self.write_json("config.json", config)
        self.plot_loss(title)
        self.close()

    def close(self) -> None:
        self._file.close()
