"""Your own model and data, trained by `plait train examples/my_model.toml` (every layout)."""
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):  # not an nn.Sequential: the config names its chain of blocks
    def __init__(self, features: int = 16, dim: int = 32, depth: int = 4, classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def data(samples: int = 4096, features: int = 16, classes: int = 4, seed: int = 0):
    """(train, test) datasets of (input, target) pairs: a class is the largest of a few projections."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    cut = samples * 7 // 8
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])
