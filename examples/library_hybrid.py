"""Hybrid parallelism inside your own training loop, started by plain torchrun.

    torchrun --nproc-per-node 4 examples/library_hybrid.py      # pp=2 x tp=2
    torchrun --nproc-per-node 8 examples/library_hybrid.py      # dp=2 x pp=2 x tp=2

A small GPT learns to continue a repeating sequence of tokens. One call lays it out over the
mesh (tensor parallel, then this rank's pipeline stage, then data parallel on what is left);
the loop is the usual one: step, clip, optimizer step.
"""

import torch

import plait
from plait.models import GPT


def main(info) -> None:
    mesh = plait.Mesh(dp=0, pp=2, tp=2)  # dp inferred: world size / 4
    layout = plait.Layout(dp=mesh.size("dp"), pp=2, tp=2, zero=1, microbatches=2)

    torch.manual_seed(0)
    vocab, block = 16, 12
    model = GPT(vocab, block, layers=2, heads=2, dim=32)
    par = plait.parallelize(model, mesh, layout, loss_fn=None)  # under tp: the vocab-parallel loss
    optimizer = torch.optim.AdamW(par.parameters(), lr=3e-3)  # this rank's stage, slices, ZeRO shards
    par.attach(optimizer)

    sequence = torch.arange(64) % vocab  # 0 1 2 ... 15 0 1 ...: each token predicts the next
    starts = torch.randint(0, 64 - block - 1, (1024,))
    ids = torch.stack([sequence[s : s + block] for s in starts])
    targets = torch.stack([sequence[s + 1 : s + block + 1] for s in starts])
    local = 32 // mesh.size("dp")  # a global batch of 32, split over dp
    for step in range(len(ids) // 32):
        rows = slice(step * 32 + mesh.coord("dp") * local, step * 32 + (mesh.coord("dp") + 1) * local)
        optimizer.zero_grad()
        loss = par.step(ids[rows], targets[rows])  # forward, backward, gradients synced; loss on the last stage
        norm = par.grad_norm()  # the global norm: every slice, stage and shard counted once
        torch._foreach_mul_(par.grads(), min(1.0, 1.0 / (norm + 1e-6)))
        optimizer.step()
        if par.has_loss and step % 8 == 7 and mesh.coord("dp") == 0 and mesh.coord("tp") == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}, gradient norm {norm:.3f}", flush=True)

    par.check_consistency()  # raises, naming tensor and rank, if dp replicas drifted
    if info.is_main:
        print(f"done: {layout.describe()} on {info.world_size} processes")


info = plait.init()
main(info)  # what it built is gone when it returns: nothing of it is left to the interpreter's exit
plait.shutdown()
