"""Peak memory per rank under each layout: what the meta-device build and sharding save.

    .venv/bin/python benchmarks/memory.py                        # the 120.7M-parameter MLP, Adam, 4 processes
    .venv/bin/python benchmarks/memory.py --hidden 1024          # a small one

Runs ``plait train`` (fresh processes each time: a process's peak resident set only grows) on the
digits MLP (``model.args.hidden``, ``depth = 8``, Adam, 2 steps) in one process, under plain data
parallelism, ZeRO-1/2/3 and pp=4, and prints the largest rank's peak resident set (what
``summary.json`` reports as ``peak_rss_bytes``), and its growth from just before the model is
built (``model_rss_bytes``: torch and the data excluded), each against the one-process run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "one process": (1, []),
    "dp4": (4, []),
    "dp4, ZeRO-1": (4, ["parallel.zero=1"]),
    "dp4, ZeRO-2": (4, ["parallel.zero=2"]),
    "dp4, ZeRO-3": (4, ["parallel.zero=3"]),
    "pp4": (4, ["parallel.pp=4", "pipeline.microbatches=4"]),
}


def run(nproc: int, options: list[str], hidden: int, out: Path) -> dict:
    sets = [f"model.args.hidden={hidden}", "model.args.depth=8", "train.optimizer=adam", "train.steps=2",
            "train.batch_size=64", "run.progress=false", f"run.out_dir={out}", "pipeline.trace=false", *options]
    cmd = [sys.executable, "-m", "plait.cli", "train", str(ROOT / "examples" / "mlp_pipeline.toml"),
           "--nproc", str(nproc), "--set", "parallel.pp=1", *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads((out / "mlp_pipeline" / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    params = 784 * args.hidden + args.hidden + 7 * (args.hidden * args.hidden + args.hidden) + args.hidden * 10 + 10
    rows = {}
    for name in args.layouts:
        nproc, options = LAYOUTS[name]
        with tempfile.TemporaryDirectory() as out:
            rows[name] = run(nproc, options, args.hidden, Path(out))
        print(f"{name}: {rows[name]['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    one = rows.get("one process")
    print(f"\nMLP of {params / 1e6:.1f}M parameters (hidden {args.hidden}, depth 8), Adam, the largest rank")
    print(f"{'layout':12} | {'peak RSS GB':>11} | {'x one proc':>10} | {'model GB':>8} | {'x one proc':>10}")
    for name, s in rows.items():
        peak, grown = s["peak_rss_bytes"], s["model_rss_bytes"]
        ratio = f"{peak / one['peak_rss_bytes']:10.2f}" if one else f"{'':10}"
        ratio2 = f"{grown / one['model_rss_bytes']:10.2f}" if one else f"{'':10}"
        print(f"{name:12} | {peak / 1e9:11.2f} | {ratio} | {grown / 1e9:8.2f} | {ratio2}")


if __name__ == "__main__":
    main()
