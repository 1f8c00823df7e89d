"""A user's module with mistakes in it, for the bad-input tests of test_own_models."""
import torch.nn.functional as F
from torch import nn

from examples.my_model import Net


def not_a_model(width: int = 4):
    return {"width": width}


def not_datasets():
    return 42


def pairs_missing():
    return [1, 2, 3], [4, 5, 6]


def failing_model():
    raise RuntimeError("out of coffee")


def sequential_net():
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))


def zero_head_net():
    """Initialises its own head (the meta device would lose that)."""
    net = Net(depth=2)
    nn.init.zeros_(net.head.weight)
    return net


def smoothed_cross_entropy(output, target):
    """A loss of the user's own: (output, target) -> the mean over the batch."""
    return F.cross_entropy(output, target, label_smoothing=0.1)


LOSS_NOT_CALLABLE = 3
