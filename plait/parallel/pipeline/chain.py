"""Cutting a model that is not a chain of modules: the model runs its own forward, holding only
this stage's part of a chain of blocks inside it.

Most models are not an ``nn.Sequential``: a transformers ``LlamaForCausalLM`` embeds tokens,
makes a causal mask and rotary embeddings, runs ``model.layers`` one after another, then a norm
and a head. Naming that ``ModuleList`` (``pipeline.blocks = "model.layers"``) is enough:

- the blocks are cut into stages; the modules with parameters that the forward runs before the
  blocks (the embeddings; found by running it once on one sample, on the meta device where the
  model is) belong to the first stage, the others (norm, head) to the last;
  modules without parameters (rotary embeddings, dropout) stay on every stage;
- every stage calls the model's own forward on the micro-batch's input. The list holds only this
  stage's blocks; on a later stage the first-stage modules are stand-ins returning zeros, and the
  activation received from the previous stage replaces the first block's input; on an earlier
  stage, the forward stops at the first last-stage module (after its last block), and the last
  block's output is what it sends on.

What it needs of the model: a forward that runs the blocks one after another, each taking the
previous one's output as its first argument (the other arguments, masks and positions, computed
from the input, may be anything), and each module outside them run either before them or after.
Without a sample forward (``parallelize`` given no sample, or a forward the meta device cannot
run), the order in which the model registered its modules stands in; a module that breaks it is
caught on the first forward with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from plait.errors import ConfigError, PlaitError


@dataclass
class Chain:
    """A model's blocks, as pipelines cut them and ZeRO-3 gathers them."""

    blocks: list[tuple[str, nn.Module]]
    """The blocks, named as in the model."""
    path: str = ""
    """The container of the blocks in the model (``pipeline.blocks``); "" when the blocks are
    chained by Plait (an ``nn.Sequential``, a list, or a model's ``pipeline_blocks()``)."""
    before: list[tuple[str, nn.Module]] = field(default_factory=list)
    """Modules with parameters that belong to the first stage (model chains only)."""
    after: list[tuple[str, nn.Module]] = field(default_factory=list)
    """... and to the last."""

    def stage(self, start: int, end: int, first: bool, last: bool) -> list[tuple[str, nn.Module]]:
        """The modules of the stage holding blocks ``start:end``, the ends with the first and last."""
        return (self.before if first else []) + self.blocks[start:end] + (self.after if last else [])

    def parts(self, starts: list[int]) -> list[list[nn.Module]]:
        """The modules of each stage, for the stages starting at ``starts`` (one more, the end)."""
        last = len(starts) - 2
        return [[m for _, m in self.stage(starts[s], starts[s + 1], s == 0, s == last)] for s in range(last + 1)]

    def units(self) -> list[tuple[str, nn.Module]]:
        """Every module gathered on its own under ZeRO-3, in the order forward runs them."""
        return self.before + self.blocks + self.after

    def weights(self) -> list[float]:
        """Each block's parameter count (plus one), the ends counted with the first and last blocks."""
        weights = [float(_count(m)) + 1.0 for _, m in self.blocks]
        weights[0] += sum(_count(m) for _, m in self.before)
        weights[-1] += sum(_count(m) for _, m in self.after)
        return weights


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def call_order(model: nn.Module, sample: torch.Tensor | None) -> dict[str, int] | None:
    """The order in which ``model``'s forward first calls each of its modules, by name, on one
    sample (on the meta device if the model is there); None if there is no sample or the forward
    fails (then the order of registration stands in)."""
    if sample is None:
        return None
    order: dict[str, int] = {}

    def seen(name: str) -> None:
        order.setdefault(name, len(order))

    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: seen(n)) for name, m in model.named_modules() if name]
    x = sample[:1]
    if any(p.is_meta for p in model.parameters()):
        x = x.to("meta")
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001 - a forward that the meta device cannot run, say
        return None
    finally:
        for handle in handles:
            handle.remove()
    return order


def model_chain(model: nn.Module, path: str, order: dict[str, int] | None = None) -> Chain:
    """The chain ``path`` names in ``model``; one line naming ``pipeline.blocks`` otherwise.
    ``order`` (``call_order``): modules run before the first block go to the first stage, the
    others to the last; without it, by the order in which the model registered them."""
    try:
        container = model.get_submodule(path)
    except AttributeError:
        tops = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"pipeline.blocks: {type(model).__name__} has no module {path!r} (its modules: {tops}; "
                          "name them with dots, e.g. model.layers)") from None
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ConfigError(f"pipeline.blocks: {path} is a {type(container).__name__}, not a ModuleList or Sequential")
    if len(container) == 0:
        raise ConfigError(f"pipeline.blocks: {path} is empty")
    blocks = [(f"{path}.{i}", m) for i, m in enumerate(container)]
    registered = {name: i for i, (name, _) in enumerate(model.named_modules())}
    if order is None or blocks[0][0] not in order:
        order = registered
    else:  # modules the forward never called: after the blocks
        order = {**{name: len(order) + i for name, i in registered.items()}, **order}
    first = order[blocks[0][0]]
    before, after, chain_parts = [], [], path.split(".")
    for depth in range(len(chain_parts)):  # the siblings of the container and of each of its ancestors
        parent_name = ".".join(chain_parts[:depth])
        parent = model.get_submodule(parent_name)
        if any(p is not None for p in parent._parameters.values()):
            held = next(k for k, p in parent._parameters.items() if p is not None)
            raise ConfigError(f"pipeline.blocks: parameter {held!r} is held by {parent_name or type(model).__name__} "
                              f"itself, around {path}; pipelines need it inside a module before or after {path}")
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full == ".".join(chain_parts[: depth + 1]) or not any(True for _ in child.parameters()):
                continue  # the way down to the blocks, or a module without parameters (kept everywhere)
            (before if order[full] < first else after).append((full, child))
    return Chain(blocks, path, sorted(before, key=lambda b: order[b[0]]), sorted(after, key=lambda b: order[b[0]]))


class _StageDone(Exception):
    """Raised by a later stage's module: this stage's blocks are done."""


class _Elsewhere(nn.Module):
    """Stands in for a module with parameters that another stage holds."""

    def __init__(self, stage: ModelStage, name: str, role: str, original: nn.Module):
        super().__init__()
        self.name, self.role = name, role
        object.__setattr__(self, "stage", stage)  # not a submodule
        object.__setattr__(self, "original", original.to("meta"))  # its attributes, without memory

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the model may read its attributes (a weight's dtype, a config)
            return getattr(self.original, name)

    def forward(self, *args, **kwargs):
        stage = self.stage
        if self.role == "before":
            if stage.started:
                raise PlaitError(f"pipeline.blocks: {self.name} was placed on the first stage, before {stage.path}, "
                                 f"but runs after its blocks (placed by the order of registration where the forward could "
                                 f"not be run on one sample); each module outside the blocks must run before or after them")
            return torch.zeros_like(stage.received)  # its output is replaced by what was received
        if stage.output is None:
            raise PlaitError(f"pipeline.blocks: {self.name} was placed on the last stage, after {stage.path}, "
                             f"but runs before its blocks end (placed by the order of registration where the forward "
                             f"could not be run on one sample); each module outside the blocks must run before or after them")
        raise _StageDone


class ModelStage(nn.Module):
    """Blocks ``start:end`` of ``chain`` (in ``model``) with the model around them: stage ``stage``
    of ``stages``. Called as ``stage(input)`` on the first stage and ``stage(input, received)``
    on the others: the micro-batch's input (every stage computes masks and positions from it)
    and the previous stage's output."""

    def __init__(self, model: nn.Module, chain: Chain, start: int, end: int, stage: int, stages: int):
        super().__init__()
        self.model, self.path = model, chain.path
        self.first, self.last = stage == 0, stage == stages - 1
        self.blocks = chain.blocks[start:end]
        container = model.get_submodule(chain.path)
        held = [m for _, m in self.blocks]
        _set(model, chain.path, nn.Sequential(*held) if isinstance(container, nn.Sequential) else nn.ModuleList(held))
        ends = [(n, m, "before") for n, m in chain.before if not self.first]
        ends += [(n, m, "after") for n, m in chain.after if not self.last]
        for name, module, role in ends:
            _set(model, name, _Elsewhere(self, name, role, module))
        self.units = chain.stage(start, end, self.first, self.last)
        self.received: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.started = False
        first_block, last_block = held[0], held[-1]
        first_block.register_forward_pre_hook(self._enter, with_kwargs=True)
        last_block.register_forward_hook(self._leave)

    def _enter(self, module, args, kwargs):
        self.started = True
        if self.first:
            return None
        if args:
            return (self.received, *args[1:]), kwargs
        key = next(iter(kwargs))  # called with keywords only: the first is the chain's input
        return args, {**kwargs, key: self.received}

    def _leave(self, module, args, out):
        self.output = out[0] if isinstance(out, tuple) else out

    def forward(self, x, *received):
        self.received = received[0] if received else None
        self.output, self.started = None, False
        out = None
        try:
            out = self.model(x)
        except _StageDone:  # an earlier stage: its blocks are done, self.output is what it sends
            pass
        finally:
            self.received = None
        if not self.last:
            if self.output is None:
                raise PlaitError(f"pipeline.blocks: the model's forward never ran {self.blocks[-1][0]}")
            return self.output
        return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)
