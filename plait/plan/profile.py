"""What the planner knows of a model: per block, its parameters, FLOPs, dispatched operations,
the bytes autograd keeps for backward, what a pipeline cut sends and what tensor parallelism
all-reduces. All of it from one forward and backward on the meta device: shapes only, no
memory, no arithmetic, so a trillion-parameter GPT profiles in seconds.

Tensor parallelism is read from the model's plan without splitting anything: a ``colwise`` or
``qkv`` layer's output starts a region whose activations are split over tp ranks, and the next
``rowwise`` layer's output ends it (Megatron's layout), so what is kept inside a region is
divided by tp, what is kept outside is not. A ``rowwise`` layer and a ``vocab`` embedding
all-reduce their output in forward; a ``colwise`` layer all-reduces its input's gradient in
backward; ``colwise_gather`` all-gathers its output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from plait.errors import ConfigError, PlaitError

SAMPLES = 2
"""Samples in the profiled batch: every figure is linear in it and given per sample."""


@dataclass
class BlockCost:
    """One pipeline block (a ZeRO-3 unit): figures per sample unless said otherwise."""

    name: str
    params: int = 0
    """Parameter elements."""
    split_params: int = 0
    """Of those, the elements tensor parallelism splits over tp ranks."""
    largest: int = 0
    """Elements of its largest parameter."""
    tensors: int = 0
    """Parameter tensors (ZeRO-3 on gloo reduces each on its own)."""
    flops: float = 0.0
    """Forward FLOPs (matrix products and convolutions)."""
    split_flops: float = 0.0
    """Of those, what tensor parallelism divides over tp ranks."""
    ops: int = 0
    """Operations its forward dispatches per micro-batch (a fixed cost each, whatever the size)."""
    saved: float = 0.0
    """Bytes autograd keeps for backward, outside split regions."""
    saved_split: float = 0.0
    """Bytes kept inside split regions (divided by tp)."""
    input_bytes: float = 0.0
    """Bytes of its input (what recomputation keeps, and what a cut before it sends)."""
    tp_reduce: float = 0.0
    """Bytes all-reduced over tp, forward and backward."""
    tp_gather: float = 0.0
    """Bytes all-gathered over tp."""
    tp_calls: int = 0
    """Collectives over tp per micro-batch, forward and backward."""
    split: bool = False
    """Whether tensor parallelism splits anything in it."""


@dataclass
class ModelProfile:
    name: str
    blocks: list[BlockCost]
    backward_ratio: float
    """Backward FLOPs per forward FLOP (2 for linear layers; less when the first layer's input
    needs no gradient)."""
    backward_ops_ratio: float = 1.0
    """Operations backward dispatches per forward operation."""
    weights: list[float] = field(default_factory=list)
    """The pipeline cut's weights (parameters per block, the ends with the first and last), as
    the trainer cuts."""
    tp_ok: bool = False
    """Whether the model has a tensor-parallel plan."""

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def flops_per_sample(self) -> float:
        """Forward and backward FLOPs of one sample (no recomputation)."""
        return sum(b.flops for b in self.blocks) * (1 + self.backward_ratio)


class _Counter(TorchDispatchMode):
    """Counts the operations dispatched (under FlopCounterMode, which counts their FLOPs)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _nbytes(x) -> float:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(t) for t in x)
    return 0.0


def _styles(model: nn.Module, plan: dict[str, str] | None) -> dict[str, str]:
    """Module name -> its tensor-parallel style."""
    found: dict[str, str] = {}
    for pattern, style in (plan or {}).items():
        for name, _ in model.named_modules():
            if name and fnmatch(name, pattern):
                found[name] = style
    return found


def run_chain(model: nn.Module, chain, x: torch.Tensor) -> torch.Tensor:
    """The model's output on ``x`` as a pipeline runs it: its own forward around a named chain,
    else the blocks one after another (a tuple output unpacked into the next)."""
    if chain.path:
        out = model(x)
    else:
        out = x
        for _, block in chain.blocks:
            out = block(*(out if isinstance(out, tuple) else (out,)))
    return out[0] if isinstance(out, tuple) else out


def profile_model(model: nn.Module, chain, plan: dict[str, str] | None, inputs: torch.Tensor,
                  targets: torch.Tensor, loss_fn, label: str = "") -> ModelProfile:
    """Profile ``model`` (on the meta device) cut into ``chain``'s blocks, on one batch of
    ``inputs`` and ``targets`` (moved to the meta device), with ``loss_fn(output, target)``."""
    inputs, targets = inputs.to("meta"), targets.to("meta")
    n = len(inputs)
    names = {id(m): name for name, m in model.named_modules()}
    styles = _styles(model, plan)
    blocks = [BlockCost(name) for name, _ in chain.blocks]
    groups = [[m] for _, m in chain.blocks]
    if chain.path:  # the modules the model's own forward runs before and after the blocks
        groups[0] += [m for _, m in chain.before]
        groups[-1] += [m for _, m in chain.after]
    param_ids = {id(p) for p in model.parameters()}
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    for cost, modules in zip(blocks, groups):
        params = [p for m in modules for p in m.parameters() if id(p) in param_ids and id(p) not in seen]
        seen.update(id(p) for p in params)
        cost.params = sum(p.numel() for p in params)
        cost.tensors = len(params)
        cost.largest = max((p.numel() for p in params), default=0)
        split_ids = set()
        for m in modules:
            for sub in m.modules():
                style = styles.get(names.get(id(sub), ""))
                if style:
                    cost.split = True
                    keep_bias = style == "rowwise"  # a rowwise bias is added once, whole
                    split_ids.update(id(p) for pname, p in sub.named_parameters()
                                     if not (keep_bias and pname == "bias"))
        cost.split_params = sum(p.numel() for p in params if id(p) in split_ids)

    state = {"block": 0, "split": False, "attention": False}
    kept: dict = {}  # storage -> the block it was first kept in
    alive: list = []

    def keep(t: torch.Tensor, size: float | None = None) -> None:
        key = t.untyped_storage()._cdata if size is None else object()
        if id(t) in param_ids or key in param_storages or key in kept:
            return
        kept[key] = state["block"]
        alive.append(t)  # a freed storage's address may come back for another tensor
        cost = blocks[state["block"]]
        size = t.untyped_storage().nbytes() if size is None else size
        if state["split"]:
            cost.saved_split += size
        else:
            cost.saved += size

    def pack(t: torch.Tensor):
        if not state["attention"]:
            keep(t)
        return t

    class Attention(TorchFunctionMode):
        """Attention as the fused kernels run it (CPU and CUDA alike): the meta device has only
        the math path, which would keep the [T, T] weights; the fused kernels keep q, k, v, the
        output and one float per query and head (the log-sum-exp)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is not F.scaled_dot_product_attention:
                return func(*args, **(kwargs or {}))
            state["attention"] = True
            try:
                out = func(*args, **(kwargs or {}))
            finally:
                state["attention"] = False
            if torch.is_grad_enabled():
                for t in (*args[:3], out):
                    keep(t)
                keep(out, size=out[..., 0].numel() * 4)
            return out

    hooks = []

    def styled(module, style):
        def before(mod, args):
            if style in ("colwise", "colwise_gather", "qkv"):
                cost = blocks[state["block"]]
                cost.tp_reduce += _nbytes(args)  # the input's gradient, in backward
                cost.tp_calls += 1

        def after(mod, args, out):
            cost = blocks[state["block"]]
            if style in ("rowwise", "vocab"):
                cost.tp_reduce += _nbytes(out)
                cost.tp_calls += 1
                state["split"] = False
            elif style == "colwise_gather":
                cost.tp_gather += _nbytes(out)
                cost.tp_calls += 1
            else:
                state["split"] = True
        hooks.append(module.register_forward_pre_hook(before))
        hooks.append(module.register_forward_hook(after))

    for name, module in model.named_modules():
        if name in styles:
            styled(module, styles[name])
    counter, flops = _Counter(), FlopCounterMode(display=False)
    marks = []  # (block, flops so far, ops so far) where each block starts

    def enter(i):
        def hook(mod, args, kwargs=None):
            state["block"], state["split"] = i, False
            marks.append((i, flops.get_total_flops(), counter.count))
            if not blocks[i].input_bytes:
                blocks[i].input_bytes = _nbytes(args)
        return hook

    for i, modules in enumerate(groups):
        for m in modules:
            hooks.append(m.register_forward_pre_hook(enter(i)))
    try:
        with flops, counter, Attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run_chain(model, chain, inputs)
            state["block"] = len(blocks) - 1
            marks.append((len(blocks) - 1, flops.get_total_flops(), counter.count))
            if state["split"]:  # vocab-parallel cross-entropy: max, sum of exponentials, target logit
                blocks[-1].tp_calls += 3
            loss = loss_fn(out, targets)
            forward_total, forward_ops = flops.get_total_flops(), counter.count
            loss.backward()
    except Exception as exc:  # noqa: BLE001 - the user's model: say what failed, in one line
        raise PlaitError(f"plan: cannot run {label or type(model).__name__} on the meta device to profile it: "
                         f"{type(exc).__name__}: {exc}") from None
    finally:
        for h in hooks:
            h.remove()
    marks.append((len(blocks) - 1, forward_total, forward_ops))
    for (i, f0, c0), (_, f1, c1) in zip(marks, marks[1:]):
        blocks[i].flops += f1 - f0
        blocks[i].ops += c1 - c0  # forward and the loss; backward is counted by ratio below
    total_forward = sum(b.flops for b in blocks) or 1.0
    backward = flops.get_total_flops() - forward_total
    for b in blocks:
        b.split_flops = b.flops if b.split else 0.0
        for key in ("flops", "split_flops", "saved", "saved_split", "input_bytes", "tp_reduce", "tp_gather"):
            setattr(b, key, getattr(b, key) / n)
    return ModelProfile(label or type(model).__name__, blocks, backward / total_forward,
                        (counter.count - forward_ops) / max(forward_ops, 1), chain.weights(), bool(plan))


def profile_config(cfg) -> tuple[ModelProfile, nn.Module]:
    """The profile of the model a config names, built on the meta device, and that model (for
    the layout checks)."""
    from torch.utils.data import DataLoader

    from plait.models import build_model
    from plait.parallel.compose import Layout
    from plait.train.tasks import build_task

    task = build_task(cfg.data.name, cfg.data.path, cfg.data.args, cfg.train.loss)
    try:
        with torch.device("meta"):
            model = build_model(cfg.model.name, cfg.model.args, task.info)
    except PlaitError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"plan: the model cannot be built on the meta device ({exc}); planning never builds it "
                          "in memory") from None
    layout = Layout(blocks=cfg.pipeline.blocks, tp_plan=tuple(cfg.parallel.tp_plan.items()))
    from plait.parallel.pipeline.chain import call_order

    x, y = next(iter(DataLoader(task.train, batch_size=SAMPLES, collate_fn=task.collate)))
    order = call_order(model, x[:1].to("meta")) if layout.blocks else None
    chain = layout.chain(model, order)
    profile = profile_model(model, chain, layout.plan(model), x, y, task.loss, cfg.model.name
                            if isinstance(cfg.model.name, str) else "")
    return profile, model
