"""``plait report RUN_DIR [RUN_DIR ...]``: one static HTML page comparing runs.

    plait report runs/digits_cnn runs/mlp_pipeline -o report.html

The page needs no server and no network: every plot is a PNG inside it (matplotlib, as
``data:`` URLs), every table plain HTML. Sections: the runs at a glance; loss and test curves
overlaid; throughput and MFU; time per step by part on every rank (stacked bars); peak memory
per rank; the pipeline timeline of runs that traced one (``pipeline.trace``); the config keys
whose values differ between the runs.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from plait.errors import PlaitError
from plait.observe.breakdown import PARTS

COLORS = {"data": "#8d99ae", "forward": "#8ecae6", "backward": "#219ebc", "comm": "#fb8500",
          "bubble": "#ffb703", "optimizer": "#2a9d8f", "other": "#d9d9d9"}


class Run:
    """What a run folder holds: its metrics, summary and config."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        metrics = self.dir / "metrics.jsonl"
        if not metrics.is_file():
            raise PlaitError(f"report: {folder} is not a run folder (no metrics.jsonl); runs are under run.out_dir, "
                             "e.g. runs/digits_cnn")
        try:
            self.records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            self.summary = _json(self.dir / "summary.json")
            self.config = _json(self.dir / "config.json")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlaitError(f"report: {folder}: a damaged file ({exc})") from None
        self.name = self.summary.get("name") or self.dir.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``key`` at each logged step; test metrics also at the end, from the summary."""
        rows = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        final = self.summary.get(key)
        if key.startswith("test_") and isinstance(final, (int, float)) and "steps" in self.summary:
            rows.append((self.summary["steps"], final))
        return [s for s, _ in rows], [v for _, v in rows]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(width: float = 7.5, height: float = 3.6, cols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, cols, figsize=(width, height), squeeze=False)


def curves(runs: list[Run], panels: list[tuple[str, str, bool]]) -> str | None:
    """Panels of ``(key, y label, log scale)`` with every run's line; None if no run has any."""
    if not any(run.series(key)[0] for run in runs for key, _, _ in panels):
        return None
    fig, axes = _figure(width=5.0 * len(panels), cols=len(panels))
    for ax, (key, label, log) in zip(axes[0], panels):
        for run in runs:
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=run.name)
        if log and all(v > 0 for run in runs for v in run.series(key)[1]):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="#777")
    return _png(fig)


def breakdown_bars(runs: list[Run]) -> str | None:
    """One stacked bar per rank of each run: mean seconds per step in each part."""
    bars = [(f"{run.name}\nrank {r}", {p: per[f"time_{p}_s"][r] for p in PARTS})
            for run in runs if (per := run.summary.get("time_breakdown", {}).get("per_rank"))
            for r in range(len(per["step_time_s"]))]
    if not bars:
        return None
    fig, axes = _figure(width=max(6.0, 0.9 * len(bars) + 2.5), height=4.2)
    ax = axes[0][0]
    bottom = [0.0] * len(bars)
    for part in PARTS:
        heights = [parts[part] * 1e3 for _, parts in bars]
        ax.bar(range(len(bars)), heights, bottom=bottom, color=COLORS[part], label=part, edgecolor="white", linewidth=0.5)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    ax.set_ylabel("ms per step (mean)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def memory_bars(runs: list[Run]) -> str | None:
    rows = [(f"{run.name}\nrank {r}", m) for run in runs
            for r, m in enumerate(run.summary.get("time_breakdown", {}).get("per_rank", {}).get("peak_memory_bytes", []))]
    if not rows:
        return None
    fig, axes = _figure(width=max(6.0, 0.9 * len(rows) + 2.5), height=3.4)
    ax = axes[0][0]
    ax.bar(range(len(rows)), [m / 2**20 for _, m in rows], color="#6a4c93")
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    ax.set_ylabel("peak memory (MiB)")
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def config_differences(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(dotted key, each run's value) for every config key whose values differ."""
    flat = [_flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat))
    def shown(value) -> str:
        return "—" if value is None else json.dumps(value, ensure_ascii=False)

    return [(k, [shown(f.get(k)) for f in flat]) for k in keys if len({shown(f.get(k)) for f in flat}) > 1]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _glance(runs: list[Run]) -> str:
    def cell(s: dict, key: str, fmt: str) -> str:
        value = s.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "—"

    head = ("run", "layout", "processes", "steps", "samples/s", "final loss", "test loss", "test accuracy", "MFU",
            "peak memory (largest rank)")
    rows = [(run.name, run.summary.get("layout", "—"), cell(run.summary, "world_size", "d"), cell(run.summary, "steps", "d"),
             cell(run.summary, "samples_per_s", ".0f"), cell(run.summary, "final_loss", ".4g"),
             cell(run.summary, "test_loss", ".4g"), cell(run.summary, "test_accuracy", ".4f"),
             cell(run.summary, "mfu", ".2%"),
             f"{run.summary['peak_rss_bytes'] / 2**20:.0f} MiB" if "peak_rss_bytes" in run.summary else "—")
            for run in runs]
    return _table(head, rows)


def _table(head, rows) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(title)}</h2>{body}</section>'


def _plot(key: str, src: str | None, missing: str) -> str:
    if src is None:
        return f'<p class="missing">{html.escape(missing)}</p>'
    return f'<img class="plot" id="plot-{key}" alt="{key}" src="{src}">'


def build_report(folders: list[str | Path]) -> str:
    """The page's HTML for the runs in ``folders``."""
    runs = [Run(f) for f in folders]
    loss = curves(runs, [("loss", "training loss", True), ("test_loss", "test loss", True),
                         ("test_accuracy", "test accuracy", False)])
    speed = curves(runs, [("samples_per_s", "samples/s", False), ("mfu", "MFU (model FLOP/s / peak)", False)])
    timelines = "".join(
        f"<h3>{html.escape(run.name)}</h3><img class=\"plot\" id=\"plot-pipeline-{i}\" alt=\"pipeline timeline\" "
        f"src=\"data:image/png;base64,{base64.b64encode((run.dir / 'pipeline_timeline.png').read_bytes()).decode()}\">"
        for i, run in enumerate(runs) if (run.dir / "pipeline_timeline.png").is_file())
    differences = config_differences(runs)
    sections = [
        _section("runs", "Runs", _glance(runs)),
        _section("loss", "Loss and test metrics", _plot("loss", loss, "No logged losses.")),
        _section("throughput", "Throughput and MFU", _plot("throughput", speed, "No logged throughput.")),
        _section("breakdown", "Where the time goes, per rank",
                 "<p>Mean seconds per step on each rank: waiting for data, forward, backward, blocked on "
                 "communication that compute did not hide, idle in the pipeline bubble, the optimizer, and "
                 "the rest of the step.</p>"
                 + _plot("breakdown", breakdown_bars(runs), "No time breakdown in these runs.")),
        _section("memory", "Peak memory per rank", _plot("memory", memory_bars(runs), "No per-rank memory in these runs.")),
        _section("pipeline", "Pipeline timeline",
                 timelines or '<p class="missing">No run traced a pipeline step (pipeline.trace = true).</p>'),
        _section("config", "Configuration differences",
                 _table(["key", *(r.name for r in runs)], [(k, *v) for k, v in differences]) if differences
                 else "<p>The runs' configurations are the same.</p>"),
    ]
    title = "Plait report: " + ", ".join(run.name for run in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; max-width: 1400px; color: #222; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 18px; border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 28px; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f2f2f2; }} img.plot {{ display: block; max-width: 100%; }} .missing {{ color: #777; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{''.join(sections)}
</body></html>
"""


def write_report(folders: list[str | Path], output: str | Path) -> Path:
    page = build_report(folders)
    out = Path(output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise PlaitError(f"report: cannot write {out}: {exc.strerror or exc}") from None
    return out
