"""Build on the meta device, then give real memory only to what this rank holds.

A model built under ``torch.device("meta")`` has shapes and no storage. After the layout is
applied (tensor-parallel layers built from meta layers, the pipeline cut made), each rank
materialises the modules of its own stage, one module at a time: on the CPU, with the module's
own ``reset_parameters()``, under a seed drawn from the run's seed and the module's name in the
unsplit model. A tensor-parallel layer initialises its unsplit source the same way and keeps its
slice. So every layout starts from exactly the values of the one-process run, and no rank ever
holds more than its own part plus one unsplit module. ZeRO-3 materialises unit by unit and
shards each before the next.

Models that cannot be built this way (a module with parameters but no ``reset_parameters()``,
or buffers, which the meta device would not fill) are built whole, on every rank, as before.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch
from torch import nn


def meta_ready(model: nn.Module) -> bool:
    """Whether ``model`` (built on meta) can be materialised module by module."""
    if next(model.buffers(), None) is not None:
        return False
    return all(hasattr(m, "reset_parameters") for m in model.modules()
               if any(p is not None for p in m._parameters.values()))


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Children before their parent, siblings in the order they were registered: the order in
    which an eager build would have initialised them."""
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, module


def init_module(module: nn.Module, name: str, seed: int) -> None:
    """Give ``module``'s own parameters CPU memory and initialise them, seeded by ``name``."""
    module.to_empty(device="cpu", recurse=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        module.reset_parameters()


class Materializer:
    """Materialises the parts of ``model`` (built on meta, layout applied) that a rank asks for."""

    def __init__(self, model: nn.Module, seed: int, device: torch.device):
        self.model, self.seed, self.device = model, seed, device
        self.order = list(_post_order(model))  # names as in the unsplit model, before any cut
        # id of a meta parameter -> (it, its real one); holding it keeps its id from being reused
        self.done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def __call__(self, part: nn.Module) -> None:
        """Materialise every module of ``model`` whose own parameters are used by ``part``."""
        wanted = {id(p) for p in part.parameters() if p.is_meta}
        if not wanted:
            return
        for name, module in self.order:
            own = {k: p for k, p in module._parameters.items() if p is not None}
            if not any(id(p) in wanted for p in own.values()):
                continue
            if all(id(p) in self.done for p in own.values()):  # tied to a parameter made already
                for k, p in own.items():
                    module._parameters[k] = self.done[id(p)][1]
                continue
            rebuild = getattr(module, "materialize", None)
            if rebuild is not None:  # a tensor-parallel layer: from its unsplit source
                rebuild(lambda source: init_module(source, name, self.seed))
            else:
                init_module(module, name, self.seed)
            for k, old in own.items():
                new = module._parameters[k]
                if self.device.type != "cpu":
                    new = nn.Parameter(new.detach().to(self.device), requires_grad=old.requires_grad)
                    module._parameters[k] = new
                self.done[id(old)] = (old, new)


def build_deferred(factory, seed: int, deferred: bool = True) -> nn.Module:
    """``factory()`` on the meta device when ``deferred`` and its modules can be materialised by
    parts (see ``meta_ready``), else built whole under ``torch.manual_seed(seed)``. Only for
    models whose construction initialises nothing beyond each module's ``reset_parameters()``:
    the meta device would lose any other initialisation."""
    model = None
    if deferred:
        try:
            with torch.device("meta"):
                model = factory()
        except Exception:  # noqa: BLE001 - a constructor that computes with its tensors: build it whole
            model = None
    if model is not None and meta_ready(model):
        return model
    torch.manual_seed(seed)
    return factory()


def materialize_all(model: nn.Module, seed: int, device: torch.device) -> nn.Module:
    """The whole model with real memory: the values every layout starts from."""
    if is_meta(model):
        Materializer(model, seed, device)(model)
    return model.to(device)
