"""Plait: distributed training for PyTorch on torch.distributed.

Inside a script started by ``torchrun --nproc-per-node 2 script.py``::

    import plait
    info = plait.init()                                   # gloo on CPU, NCCL on CUDA
    mesh = plait.Mesh(dp=0)                               # dp inferred from the world size
    model = plait.DataParallel(model, mesh.group("dp"))
    sampler = plait.PartitionSampler(dataset, mesh.size("dp"), mesh.coord("dp"), global_batch=64)
"""

from plait.data.partition import PartitionSampler
from plait.dist.env import DistInfo, init, shutdown
from plait.dist.mesh import Mesh
from plait.errors import CommError, ConfigError, PlaitError
from plait.parallel.consistency import check_consistency
from plait.parallel.data import DataParallel

__version__ = "0.1.0"

__all__ = [
    "CommError", "ConfigError", "DataParallel", "DistInfo", "Mesh", "PartitionSampler", "PlaitError",
    "check_consistency", "init", "shutdown",
]
