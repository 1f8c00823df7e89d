"""The planner's model against published large-scale runs: Megatron-LM's GPT weak-scaling table.

    .venv/bin/python benchmarks/planner_published.py                  # table, a few seconds
    .venv/bin/python benchmarks/planner_published.py --cluster h100-80gb

Source: D. Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", SC '21 (arXiv:2104.04473), Table 1: GPT models of vocabulary 51,200 and
sequence 2,048 on DGX A100 80GB nodes (Selene), mixed precision, activation recomputation,
end-to-end throughput per GPU. The paper counts FLOPs with the recomputed forward
(96 B s l h^2 (1 + s/6h + V/16lh) per step): the prediction here is counted the same way.

Each model is profiled on the meta device (Plait's own GPT at that shape), then:
- "published layout": the cost model on the paper's tp, pp, dp, with recomputation, bf16
  and one sample per micro-batch (pipeline micro-batches, or accumulation steps without a
  pipeline), 1F1B;
- "planner": what ``plait plan`` chooses itself on the same GPUs, and how long planning took.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from plait.models.gpt import GPT
from plait.parallel.pipeline.chain import Chain
from plait.parallel.pipeline.cut import blocks_of
from plait.plan import layout_check
from plait.plan.cluster import load_cluster
from plait.plan.cost import Candidate, Workload, estimate
from plait.plan.profile import profile_model
from plait.plan.search import plan
from plait.train.config import Config

# (name, heads, hidden, layers, tp, pp, GPUs, batch, published TFLOP/s per GPU), Table 1.
ROWS = [
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137),
    ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135),
    ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138),
    ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148),
    ("1008B", 160, 25600, 128, 8, 64, 3072, 3072, 163),
]
VOCAB, SEQ = 51200, 2048


def profile(heads: int, hidden: int, layers: int):
    with torch.device("meta"):
        model = GPT(VOCAB, SEQ, layers=layers, heads=heads, dim=hidden)
    ids = torch.zeros(2, SEQ, dtype=torch.long)

    def loss(out, target):
        return F.cross_entropy(out.flatten(0, 1).float(), target.flatten())
    return profile_model(model, Chain(blocks_of(model)), GPT.tp_plan(), ids, ids, loss, "gpt"), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="a100-80gb")
    args = parser.parse_args()
    cluster = load_cluster(args.cluster)
    header = ("model", "GPUs", "published layout", "published", "predicted", "ratio", "planner's choice",
              "its prediction", "plan s")
    rows = [header]
    for name, heads, hidden, layers, tp, pp, gpus, batch, published in ROWS:
        start = time.perf_counter()
        prof, model = profile(heads, hidden, layers)
        dp = gpus // (tp * pp)
        # one sample per micro-batch, as the paper's runs: pipeline micro-batches, or without a
        # pipeline gradient accumulation (train.accum_steps)
        work = Workload(batch, 1 if pp > 1 else batch // dp, "adam", 25.0, gpus // cluster.devices_per_node,
                        grad_clip=True)
        theirs = Candidate(dp, pp, tp, 0, batch // dp if pp > 1 else 1, "1f1b", True, "bf16")
        e = estimate(prof, cluster, work, theirs)
        recount = 1 + 1 / (1 + prof.backward_ratio)  # the recomputed forward, as the paper counts
        predicted = e.tflops_per_device * recount

        ranked = plan(prof, cluster, work, gpus, layout_check(Config(), model))
        took = time.perf_counter() - start
        best = ranked[0]
        mine = best.tflops_per_device * (recount if best.candidate.recompute else 1)
        rows.append((name, str(gpus), f"tp={tp} pp={pp} dp={dp}", f"{published}", f"{predicted:.0f}"
                     + ("" if e.fits else " (no fit)"), f"{predicted / published:.2f}", best.candidate.describe(),
                     f"{mine:.0f}" + ("" if best.fits else " (no fit)"), f"{took:.1f}"))
        print(f"{name}: {len(ranked)} layouts in {took:.1f} s", flush=True)
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    print(f"\nTFLOP/s per GPU (the paper's count), {cluster.name}")
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    main()
