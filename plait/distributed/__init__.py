"""Everything that talks to torch.distributed: start-up, the device mesh, guarded collectives."""

from plait.distributed.env import DistInfo, init, shutdown
from plait.distributed.mesh import AXES, Mesh

__all__ = ["AXES", "DistInfo", "Mesh", "init", "shutdown"]
