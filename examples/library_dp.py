"""Plait's data parallelism inside your own training loop, started by plain torchrun.

    torchrun --nproc-per-node 2 examples/library_dp.py

Three changes to a one-process loop: plait.init(), DataParallel around the model, and a
PartitionSampler for the DataLoader. The batch below is global: each of N ranks takes 1/N of it.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import plait


def main(info) -> None:
    mesh = plait.Mesh(dp=0)  # every rank on the data-parallel axis

    torch.manual_seed(0)  # the same data everywhere; rank 0's initial weights are broadcast anyway
    x = torch.randn(4096, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)  # a learnable 4-class problem
    dataset = TensorDataset(x, y)

    model = plait.DataParallel(
        nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)).to(info.device), mesh.group("dp"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    global_batch = 128
    sampler = plait.PartitionSampler(dataset, mesh.size("dp"), mesh.coord("dp"), global_batch=global_batch)
    loader = DataLoader(dataset, batch_size=global_batch // mesh.size("dp"), sampler=sampler, drop_last=True)

    for epoch in range(3):
        sampler.set_epoch(epoch)
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs.to(info.device)), targets.to(info.device))
            loss.backward()  # gradients are averaged over the dp group during backward
            optimizer.step()
        if info.is_main:
            print(f"epoch {epoch}: loss {loss.item():.4f} (rank 0's share of the last batch)")

    model.check_consistency()  # raises, naming tensor and rank, if any replica drifted
    if info.is_main:
        print(f"done: {mesh.size('dp')} replicas hold bitwise identical parameters")


info = plait.init()  # reads RANK, WORLD_SIZE, ... from torchrun; gloo on CPU, NCCL on CUDA
main(info)  # what it built is gone when it returns: nothing of it is left to the interpreter's exit
plait.shutdown()
