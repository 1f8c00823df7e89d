"""Plait: distributed training for PyTorch on torch.distributed.

Inside a script started by ``torchrun --nproc-per-node 2 script.py``::

    import plait
    info = plait.init()                                   # gloo on CPU, NCCL on CUDA
    mesh = plait.Mesh(dp=0)                               # dp inferred from the world size
    model = plait.DataParallel(model, mesh.group("dp"))
    sampler = plait.PartitionSampler(dataset, mesh.size("dp"), mesh.coord("dp"), global_batch=64)

Or the whole trainer (layouts, checkpoints, resume, outputs) on your own model and data::

    plait.fit(Net, load_data, "train.toml")               # under torchrun, or alone

The names load on first use: ``import plait`` itself costs no torch start-up, so the command
line and the parameter-server guard start at once and answer Ctrl-C at any moment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait._lazy import lazy
from plait.errors import CommError, ConfigError, PlaitError

__version__ = "0.1.0"

_LAZY = {
    "PartitionSampler": "plait.data.partition",
    "DistInfo": "plait.distributed.env", "init": "plait.distributed.env", "shutdown": "plait.distributed.env",
    "Mesh": "plait.distributed.mesh",
    "check_consistency": "plait.parallel.consistency",
    "DataParallel": "plait.parallel.data", "Compression": "plait.parallel.compress",
    "Layout": "plait.parallel.compose", "parallelize": "plait.parallel.compose",
    "fit": "plait.train.api",
}
__all__ = ["CommError", "ConfigError", "PlaitError", *_LAZY]
__getattr__, __dir__ = lazy(__name__, _LAZY)

if TYPE_CHECKING:
    from plait.data.partition import PartitionSampler
    from plait.distributed.env import DistInfo, init, shutdown
    from plait.distributed.mesh import Mesh
    from plait.parallel.compress import Compression
    from plait.parallel.consistency import check_consistency
    from plait.parallel.compose import Layout, parallelize
    from plait.parallel.data import DataParallel
    from plait.train.api import fit
