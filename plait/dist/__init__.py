"""Everything that talks to torch.distributed: start-up, the device mesh, guarded collectives."""

from plait.dist.env import DistInfo, init, shutdown
from plait.dist.mesh import AXES, Mesh

__all__ = ["AXES", "DistInfo", "Mesh", "init", "shutdown"]
