"""``plait plan ... --measure K``: train the K best and the K worst layouts here for a few steps
each (``--measure-repeats R``: R runs each, their median) and set what was measured beside what
was predicted.

Each layout is one ``plait train`` of the config with the layout's ``--set`` values (no
checkpoints, no evaluation between steps, no progress bar). Step time: the slowest rank's mean
over the second half of the steps (the first ones warm up); peak memory: the largest rank's
peak while training (resident set on CPU, the allocator's peak on CUDA), as logged at the last
step, before the final evaluation and plots (which the planner does not predict).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from plait.errors import PlaitError
from plait.plan.cost import Estimate
from plait.plan.search import gb

QUIET = ["run.progress=false", "run.tensorboard=false", "checkpoint.every=0", "train.eval_every=0",
         "pipeline.trace=false", "run.trace=false", "parallel.check_consistency=false"]


def chosen(ranked: list[Estimate], k: int) -> list[int]:
    """Indices of the k best and the k worst layouts that fit (all of them when 2k covers them)."""
    fit = [i for i, e in enumerate(ranked) if e.fits]
    return fit if 2 * k >= len(fit) else fit[:k] + fit[-k:]


SLOW_S = 1.0
"""A layout predicted slower than this per step trains half the steps (at least 4): its second
half is still several seconds of steps, and a whole run of such layouts takes minutes less."""


def steps_for(e: Estimate, steps: int) -> int:
    return steps if e.step_s < SLOW_S else max(4, steps // 2)


def run_layout(config: str, overrides: list[str], e: Estimate, nproc: int, steps: int, out: Path, name: str) -> dict:
    """Train one layout; its measured step time and peak memory per rank."""
    steps = steps_for(e, steps)
    sets = [*overrides, *e.candidate.overrides(), *QUIET, f"train.steps={steps}", f"run.log_every={max(1, steps // 2)}",
            f'run.out_dir="{out}"', f'run.name="{name}"']
    cmd = [sys.executable, "-m", "plait.cli", "train", config, "--nproc", str(nproc)]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or "no output"
        return {"error": tail}
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "per_rank" in r][-1]
    per_rank = last["per_rank"]
    return {"step_s": max(per_rank["step_time_s"]), "memory_bytes": max(per_rank["peak_memory_bytes"])}


def measured(config: str, overrides: list[str], e: Estimate, nproc: int, steps: int, out: Path, name: str,
             repeats: int) -> dict:
    """The median step time and memory of ``repeats`` runs of one layout (a crash is said and
    tried once more: one crash should not lose the comparison)."""
    runs = []
    for r in range(repeats):
        got = run_layout(config, overrides, e, nproc, steps, out, f"{name}_{r}")
        if "error" in got:
            print(f"  {e.candidate.describe()} failed ({got['error']}); once more", flush=True)
            first = got["error"]
            got = run_layout(config, overrides, e, nproc, steps, out, f"{name}_{r}b")
            got["first_try"] = first
        if "error" in got:
            return got
        runs.append(got)
    row = {k: statistics.median(g[k] for g in runs) for k in ("step_s", "memory_bytes")}
    if repeats > 1:
        row["runs_step_s"] = [g["step_s"] for g in runs]
    return row


def compare(config: str, overrides: list[str], ranked: list[Estimate], k: int, nproc: int, steps: int,
            save: str | None = None, repeats: int = 1) -> list[dict]:
    """Run the chosen layouts, print predicted against measured, return the rows."""
    rows = []
    picks = chosen(ranked, k)
    if not picks:
        raise PlaitError("plan --measure: no layout fits, none to run")
    times = f", {repeats} runs each (their median)" if repeats > 1 else ""
    print(f"\nmeasuring {len(picks)} layouts here, {steps} steps each{times}:", flush=True)
    with tempfile.TemporaryDirectory(prefix="plait-measure-") as tmp:
        for n, i in enumerate(picks):
            e = ranked[i]
            got = measured(config, overrides, e, nproc, steps, Path(tmp), f"layout{i}", repeats)
            row = {"rank": i + 1, "layout": e.candidate.describe(), "predicted_step_s": e.step_s,
                   "predicted_memory_bytes": e.memory_bytes, **got}
            if "error" not in got:
                row["step_error"] = e.step_s / got["step_s"] - 1
                row["memory_error"] = e.memory_bytes / got["memory_bytes"] - 1
            rows.append(row)
            print(f"  [{n + 1}/{len(picks)}] {_line(row)}", flush=True)
    ok = [r for r in rows if "error" not in r]
    if ok:
        fastest = min(ok, key=lambda r: r["step_s"])
        print(f"measured fastest: {fastest['layout']} (predicted #{fastest['rank']}); median |error|: step time "
              f"{statistics.median(abs(r['step_error']) for r in ok):.1%}, peak memory "
              f"{statistics.median(abs(r['memory_error']) for r in ok):.1%} over {len(ok)} layouts")
    if save:
        Path(save).write_text(json.dumps(rows, indent=1))
    return rows


def _line(r: dict) -> str:
    head = f"#{r['rank']:<3} {r['layout']:<34}"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    return (f"{head} step {r['predicted_step_s']:.4f} s predicted, {r['step_s']:.4f} measured ({r['step_error']:+.0%});"
            f" memory {gb(r['predicted_memory_bytes'])} / {gb(r['memory_bytes'])} ({r['memory_error']:+.0%})")
