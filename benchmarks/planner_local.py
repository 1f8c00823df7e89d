"""The planner against measured runs on this machine: the GPT and the 10M MLP on 4 processes,
every valid layout trained for a few steps (``plait plan --measure``), predicted against measured.

    .venv/bin/python benchmarks/planner_local.py                 # calibrate, measure all (~1.5 h on 2 cores)
    .venv/bin/python benchmarks/planner_local.py --calibrate     # calibrate again, keep the measurements
    .venv/bin/python benchmarks/planner_local.py --summarize     # only read docs/plan/*_measured.json
    .venv/bin/python benchmarks/planner_local.py --rescore       # predict them again (a changed model)
    .venv/bin/python benchmarks/planner_local.py --settle 8      # the 8 fastest and the plan's top 2: 5 rounds, in turn
    .venv/bin/python benchmarks/planner_local.py --remeasure 'ZeRO-3'   # those layouts run again (an engine changed)
    .venv/bin/python benchmarks/planner_local.py --missing       # layouts the plan weighs now that have no row

Each model gets its own calibration (``plait calibrate CONFIG --nproc 4``, which times that
model's blocks), written beside the measurements in docs/plan/. Printed per model: the measured
fastest layout and its rank in the plan, the median absolute error of step time and of peak
memory per rank, and the rows as a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"gpt": "examples/gpt_hybrid.toml", "mlp": "examples/mlp_10m.toml"}
PLANS = ROOT / "docs" / "plan"


def cluster_file(name: str, nproc: int) -> Path:
    return PLANS / f"cpu{nproc}-{name}.toml"


def saved(name: str, nproc: int) -> tuple[Path, list[dict], list]:
    """The model's measured rows (their file, the rows) and every layout as planned now, ranked,
    with the model's cluster file as it is now."""
    from plait.plan import load_cluster, plan_config
    from plait.train.config import load_config

    path = PLANS / f"{name}_measured.json"
    ranked, _ = plan_config(load_config(ROOT / MODELS[name], []), nproc, load_cluster(str(cluster_file(name, nproc))))
    return path, json.loads(path.read_text()), ranked


def measure(name: str, config: str, nproc: int, steps: int) -> None:
    out = PLANS
    out.mkdir(parents=True, exist_ok=True)
    cluster = cluster_file(name, nproc)
    plait = [sys.executable, "-m", "plait.cli"]
    subprocess.run([*plait, "calibrate", config, "--nproc", str(nproc), "-o", str(cluster)], check=True, cwd=ROOT)
    subprocess.run([*plait, "plan", config, "--nproc", str(nproc), "--cluster", str(cluster), "--top", "0",
                    "--measure", "1000", "--measure-steps", str(steps), "--measure-json",
                    str(out / f"{name}_measured.json")], check=True, cwd=ROOT)


def calibrate(name: str, nproc: int) -> None:
    """The model's cluster file measured again (the measured rows stay as they are)."""
    subprocess.run([sys.executable, "-m", "plait.cli", "calibrate", MODELS[name], "--nproc", str(nproc), "-o",
                    str(cluster_file(name, nproc))], check=True, cwd=ROOT)


def rescore(name: str, nproc: int) -> None:
    """Predict the measured layouts again with the cost model as it is now and the model's
    cluster file as it is now (the measured figures stay as they were)."""
    path, rows, ranked = saved(name, nproc)
    where = {e.candidate.describe(): (i, e) for i, e in enumerate(ranked)}
    gone = [r["layout"] for r in rows if r["layout"] not in where]
    if gone:  # the trainer refuses them now (and the plan with it)
        more = " ..." if len(gone) > 4 else ""
        print(f"{name}: {len(gone)} rows no longer planned, dropped: {', '.join(gone[:4])}{more}")
        rows = [r for r in rows if r["layout"] in where]
    for r in rows:
        i, e = where[r["layout"]]
        r.update(rank=i + 1, predicted_step_s=e.step_s, predicted_memory_bytes=e.memory_bytes)
        if "error" not in r:
            r.update(step_error=e.step_s / r["step_s"] - 1, memory_error=e.memory_bytes / r["memory_bytes"] - 1)
    rows.sort(key=lambda r: r["rank"])
    path.write_text(json.dumps(rows, indent=1))


def settle(name: str, nproc: int, steps: int, count: int, repeats: int) -> None:
    """Run again the ``count`` layouts fastest in the sweep and the plan's first two, in
    ``repeats`` rounds that each run every one of them once (in turn, so that the machine's
    slow minutes fall on all alike), and again for any layout that the new medians bring into
    the fastest ``count``. A settled layout's time is the median of these runs alone: the
    sweep's run, for which it was picked, is left out (a layout picked for a lucky run measures
    slower the next times). Earlier settled runs are discarded."""
    import tempfile

    from plait.plan.measure import measured

    path, rows, ranked = saved(name, nproc)
    where = {e.candidate.describe(): e for e in ranked}
    ok = [r for r in rows if "error" not in r]
    for r in ok:  # back to the sweep's one run
        sweep = r.pop("sweep_step_s", None) or (r["runs_step_s"][0] if "runs_step_s" in r else r["step_s"])
        for key in ("runs_step_s", "settle_error"):
            r.pop(key, None)
        r.update(step_s=sweep, step_error=r["predicted_step_s"] / sweep - 1)
    with tempfile.TemporaryDirectory() as tmp:
        while True:
            fastest = sorted(ok, key=lambda r: r["step_s"])[:count]
            todo = [r for r in ok if (r["rank"] <= 2 or r in fastest) and "runs_step_s" not in r
                    and "settle_error" not in r]
            if not todo:
                break
            runs: dict[int, list[float]] = {id(r): [] for r in todo}
            for round_ in range(repeats):
                for r in todo[round_ % len(todo):] + todo[: round_ % len(todo)]:  # each round starts elsewhere
                    if "settle_error" in r:
                        continue
                    got = measured(str(ROOT / MODELS[name]), [], where[r["layout"]], nproc, steps, Path(tmp), "s", 1)
                    if "error" in got:  # it keeps its sweep run, and says so
                        r["settle_error"] = got["error"]
                        print(f"  {r['layout']}: failed again ({got['error']})", flush=True)
                        continue
                    runs[id(r)].append(got["step_s"])
                    print(f"  round {round_ + 1}/{repeats} {r['layout']}: {got['step_s']:.4f}", flush=True)
            for r in todo:
                if "settle_error" not in r:
                    r.update(sweep_step_s=r["step_s"], runs_step_s=runs[id(r)], step_s=statistics.median(runs[id(r)]))
                    r.update(step_error=r["predicted_step_s"] / r["step_s"] - 1)
    path.write_text(json.dumps(rows, indent=1))


def remeasure(name: str, nproc: int, steps: int, pattern: str) -> None:
    """Run again, once, every saved layout whose description matches ``pattern`` (a regular
    expression), replacing its measured figures: for layouts whose engine changed since."""
    import re
    import tempfile
    import time

    from plait.plan.measure import measured

    path, rows, ranked = saved(name, nproc)
    where = {e.candidate.describe(): e for e in ranked}
    todo = [r for r in rows if re.search(pattern, r["layout"])]
    print(f"{name}: {len(todo)} layouts match {pattern!r}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n, r in enumerate(todo):
            got = measured(str(ROOT / MODELS[name]), [], where[r["layout"]], nproc, steps, Path(tmp), "r", 1)
            for key in ("step_s", "memory_bytes", "runs_step_s", "sweep_step_s", "settle_error", "error", "step_error",
                        "memory_error"):
                r.pop(key, None)
            r.update(got, remeasured=time.strftime("%Y-%m-%d"))
            if "error" not in got:
                r.update(step_error=r["predicted_step_s"] / r["step_s"] - 1,
                         memory_error=r["predicted_memory_bytes"] / r["memory_bytes"] - 1)
            print(f"  [{n + 1}/{len(todo)}] {r['layout']}: {got}", flush=True)
            path.write_text(json.dumps(rows, indent=1))  # what is done is kept if stopped


def missing(name: str, nproc: int, steps: int) -> None:
    """Run, once, every layout that fits in the plan as it is now but has no saved row (the
    planner weighs a choice it did not), and add their rows; then rank every row again."""
    import tempfile
    import time

    from plait.plan.measure import measured

    path, rows, ranked = saved(name, nproc)
    known = {r["layout"] for r in rows}
    todo = [(i, e) for i, e in enumerate(ranked) if e.fits and e.candidate.describe() not in known]
    print(f"{name}: {len(todo)} layouts in the plan have no row", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n, (i, e) in enumerate(todo):
            got = measured(str(ROOT / MODELS[name]), [], e, nproc, steps, Path(tmp), "m", 1)
            row = {"rank": i + 1, "layout": e.candidate.describe(), "predicted_step_s": e.step_s,
                   "predicted_memory_bytes": e.memory_bytes, **got, "measured": time.strftime("%Y-%m-%d")}
            rows.append(row)
            print(f"  [{n + 1}/{len(todo)}] {row['layout']}: {got}", flush=True)
            path.write_text(json.dumps(rows, indent=1))  # what is done is kept if stopped
    rescore(name, nproc)


def summarize(name: str) -> None:
    rows = [r for r in json.loads((PLANS / f"{name}_measured.json").read_text()) if "error" not in r]
    fastest = min(rows, key=lambda r: r["step_s"])
    step = statistics.median(abs(r["step_error"]) for r in rows)
    memory = statistics.median(abs(r["memory_error"]) for r in rows)
    print(f"\n{name}: {len(rows)} layouts; measured fastest {fastest['layout']} ({fastest['step_s']:.4f} s), "
          f"predicted #{fastest['rank']}; median |error| step time {step:.1%}, peak memory {memory:.1%}")
    by_measured = sorted(rows, key=lambda r: r["step_s"])
    for r in rows[:2]:
        if r is not fastest and "runs_step_s" in r and "runs_step_s" in fastest:
            print(f"  the plan's #{r['rank']} measured {r['step_s'] / fastest['step_s'] - 1:.1%} slower than the fastest; "
                  f"that it is slower at all, on their runs: p = {slower_p(r['runs_step_s'], fastest['runs_step_s']):.2f} "
                  "(permutation test of the medians' difference)")
    print("| plan # | layout | predicted s | measured s (rank) | error | predicted GB | measured GB | error |")
    print("|---|---|---|---|---|---|---|---|")
    shown = rows[:5] + [r for r in rows[5:] if r in by_measured[:3]] + rows[-3:]
    for r in sorted({id(r): r for r in shown}.values(), key=lambda r: r["rank"]):
        print(f"| {r['rank']} | {r['layout']} | {r['predicted_step_s']:.3f} | {r['step_s']:.3f} "
              f"({by_measured.index(r) + 1}) | {r['step_error']:+.0%} | {r['predicted_memory_bytes'] / 1e9:.3f} | "
              f"{r['memory_bytes'] / 1e9:.3f} | {r['memory_error']:+.0%} |")


def slower_p(a: list[float], b: list[float]) -> float:
    """How often the runs ``a`` and ``b``, dealt into two groups of their sizes every way
    there is (or 20,000 ways drawn at random, where there are over 100,000), put a median
    difference at least as large as median(a) - median(b): the p-value of "a's layout is slower
    than b's" when both layouts are in truth equally fast."""
    import itertools
    import math
    import random

    runs, seen = a + b, median_gap(a, b)
    if math.comb(len(runs), len(a)) > 100_000:  # too many ways to deal them all: 20,000 drawn at random
        rng, hits = random.Random(0), 0
        for _ in range(20_000):
            pool = rng.sample(runs, len(runs))
            hits += median_gap(pool[: len(a)], pool[len(a) :]) >= seen - 1e-15
        return hits / 20_000
    splits = list(itertools.combinations(range(len(runs)), len(a)))
    return sum(median_gap([runs[i] for i in pick], [runs[i] for i in range(len(runs)) if i not in pick]) >= seen - 1e-15
               for pick in splits) / len(splits)


def median_gap(a: list[float], b: list[float]) -> float:
    return statistics.median(a) - statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summarize", action="store_true", help="only read the saved measurements")
    parser.add_argument("--calibrate", action="store_true",
                        help="calibrate again and predict the saved measurements with it (no runs)")
    parser.add_argument("--rescore", action="store_true",
                        help="predict the saved measurements again with the current model and cluster files")
    parser.add_argument("--settle", type=int, metavar="N", default=0,
                        help="run the N fastest in the sweep and the plan's first two --rounds times each, in "
                             "turn (medians of these runs), and any layout those medians bring into the N fastest")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --settle")
    parser.add_argument("--remeasure", metavar="REGEX",
                        help="run again, once, the saved layouts whose description matches REGEX")
    parser.add_argument("--missing", action="store_true",
                        help="run, once, the layouts of the plan that have no saved row, and add them")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    for name in args.models:
        if args.calibrate:
            calibrate(name, args.nproc)
            rescore(name, args.nproc)
        elif args.missing:
            missing(name, args.nproc, args.steps)
        elif args.remeasure:
            remeasure(name, args.nproc, args.steps, args.remeasure)
        elif args.settle:
            settle(name, args.nproc, args.steps, args.settle, args.rounds)
        elif args.rescore:
            rescore(name, args.nproc)
        elif not args.summarize:
            measure(name, MODELS[name], args.nproc, args.steps)
        summarize(name)


if __name__ == "__main__":
    main()
