"""The whole trainer from your own script, under plain torchrun:

    torchrun --nproc-per-node 4 examples/fit_script.py --set parallel.pp=2 --set parallel.tp=2

Same outputs as plait train (runs/fit_script/: metrics, summary, checkpoints), same layouts.
"""
import argparse
import sys
from pathlib import Path

import plait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that examples.my_model imports
from examples.my_model import Net, data  # noqa: E402

CONFIG = {
    "run": {"name": "fit_script"},
    "train": {"steps": 100, "batch_size": 64, "optimizer": "adamw", "lr": 0.003, "loss": "cross_entropy"},
    "pipeline": {"blocks": "layers", "microbatches": 4},
    "parallel": {"tp_plan": {"layers.*.up": "colwise", "layers.*.down": "rowwise"}},
    "checkpoint": {"every": 50},
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plait.fit(Net, data, CONFIG, overrides=parser.parse_args().overrides)
