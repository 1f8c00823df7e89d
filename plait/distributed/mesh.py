"""A named device mesh: the single source of process groups.

A world of 8 laid out as ``Mesh(dp=2, pp=2, tp=2)`` is the grid
``torch.arange(8).view(dp, pp, tp)``; the group along an axis is the set of ranks that differ
only in that coordinate. Built on torch's ``DeviceMesh``, so its groups also work with DTensor.
"""

from __future__ import annotations

import math

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait.errors import PlaitError

AXES = ("dp", "pp", "tp")


def resolve_degrees(world_size: int, dp: int = 0, pp: int = 1, tp: int = 1) -> dict[str, int]:
    """Fill in at most one degree left as 0 and check that dp * pp * tp == world_size."""
    sizes = {"dp": dp, "pp": pp, "tp": tp}
    for axis, size in sizes.items():
        if size < 0:
            raise PlaitError(f"mesh: {axis}={size} must be positive (or 0 to infer it)")
    missing = [a for a, s in sizes.items() if s == 0]
    if len(missing) > 1:
        raise PlaitError(f"mesh: only one of dp, pp, tp may be left to infer, got {missing} all 0")
    known = math.prod(s for s in sizes.values() if s)
    if missing:
        if world_size % known:
            raise PlaitError(
                f"mesh: cannot infer {missing[0]}: world size {world_size} is not divisible by "
                f"the product of the other degrees ({known})"
            )
        sizes[missing[0]] = world_size // known
    if math.prod(sizes.values()) != world_size:
        shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise PlaitError(
            f"mesh: {shown} = {math.prod(sizes.values())} processes, but the world size is {world_size}"
        )
    return sizes


class Mesh:
    """Named axes over the world; one process group per axis and this rank's coordinates.

    >>> mesh = Mesh(dp=0, pp=1, tp=1)          # dp inferred from the world size
    >>> mesh.size("dp"), mesh.coord("dp"), mesh.group("dp")
    """

    def __init__(self, dp: int = 0, pp: int = 1, tp: int = 1, device_type: str = "cpu"):
        if not dist.is_initialized():
            raise PlaitError("Mesh needs an initialised process group: call plait.init() first")
        self.sizes = resolve_degrees(dist.get_world_size(), dp, pp, tp)
        self.device_mesh: DeviceMesh = _device_mesh(device_type, tuple(self.sizes[a] for a in AXES))

    def size(self, axis: str) -> int:
        return self.sizes[self._check(axis)]

    def coord(self, axis: str) -> int:
        """This rank's index along ``axis`` (its rank inside that axis's group)."""
        return self.device_mesh.get_local_rank(self._check(axis))

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.device_mesh.get_group(self._check(axis))

    def coords_of(self, rank: int) -> dict[str, int]:
        """Any rank's coordinates: its place in the grid ``arange(world).view(dp, pp, tp)``."""
        pp, tp = self.sizes["pp"], self.sizes["tp"]
        return {"dp": rank // (pp * tp), "pp": rank // tp % pp, "tp": rank % tp}

    def describe(self) -> str:
        return " x ".join(f"{a}={self.sizes[a]}" for a in AXES)

    def _check(self, axis: str) -> str:
        if axis not in AXES:
            raise PlaitError(f"mesh: unknown axis {axis!r}; axes are {', '.join(AXES)}")
        return axis


_MADE: dict[tuple, tuple[object, object]] = {}  # key -> (the default group it was made under, it)


def _once(key: tuple, make):
    """``make()`` once per default process group: every group costs a gloo device whose thread
    wakes 100 times a second until the process ends (torch frees none of them), so a process
    that builds many trainers (a notebook, a test session) shares them. Sharing is safe: ranks
    issue collectives on a group in program order, whoever issues them."""
    world = dist.distributed_c10d._get_default_group()
    made = _MADE.get(key)
    if made is not None and made[0] is world:  # not one from an earlier default group
        return made[1]
    value = make()
    _MADE[key] = (world, value)
    return value


def _device_mesh(device_type: str, shape: tuple[int, ...]) -> DeviceMesh:
    return _once(("mesh", device_type, shape), lambda: init_device_mesh(device_type, shape, mesh_dim_names=AXES))
