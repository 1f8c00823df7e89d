"""Convert a model in place from a plan: ``{module-name pattern: style}``.

    plan = {"blocks.*.mlp.up": "colwise", "blocks.*.mlp.down": "rowwise", "tok_emb": "vocab"}
    parallelize(model, plan, mesh.group("tp"))

Styles: ``colwise`` (output split, kept split), ``colwise_gather`` (output gathered), ``qkv``
(colwise on a fused q/k/v projection: each rank takes its heads' rows of q, of k and of v),
``rowwise`` (input split, output summed), ``vocab`` (embedding split by vocabulary). A linear whose weight is
an embedding's (a tied output head) shares the embedding's slice.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch.distributed as dist
from torch import nn

from plait.errors import PlaitError
from plait.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

STYLES = ("colwise", "colwise_gather", "qkv", "rowwise", "vocab")
_KINDS = {"colwise": nn.Linear, "colwise_gather": nn.Linear, "qkv": nn.Linear, "rowwise": nn.Linear,
          "vocab": nn.Embedding}


def parallelize(model: nn.Module, plan: dict[str, str], group) -> nn.Module:
    """Replace the modules ``plan`` names by their tensor-parallel versions on ``group``."""
    check_plan(model, plan, dist.get_world_size(group))
    shared: dict[int, nn.Parameter] = {}  # id of an unsplit weight -> its slice, for tied weights
    for pattern, style in plan.items():
        for name in _matches(model, pattern):
            _replace(model, name, style, group, shared)
    return model


def _matches(model: nn.Module, pattern: str) -> list[str]:
    return [n for n, _ in model.named_modules() if n and fnmatch(n, pattern)]


def check_plan(model: nn.Module, plan: dict[str, str], tp: int) -> None:
    """That ``plan`` splits ``model`` (unsplit; on the meta device is enough) over ``tp`` ranks:
    known styles, patterns that match modules of the right kind, sizes that divide by tp. One
    line naming the pattern or module and the numbers otherwise."""
    for pattern, style in plan.items():
        if style not in STYLES:
            raise PlaitError(f"tensor parallel plan: {pattern!r}: unknown style {style!r}; choose one of {', '.join(STYLES)}")
        names = _matches(model, pattern)
        if not names:
            raise PlaitError(f"tensor parallel plan: pattern {pattern!r} matches no module of {type(model).__name__}")
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, _KINDS[style]):
                raise PlaitError(f"tensor parallel plan: {name} is a {type(module).__name__}, style {style!r} "
                                 f"needs an {_KINDS[style].__name__}")
            if style == "vocab":
                size, what = module.num_embeddings, "vocabulary"
            elif style == "rowwise":
                size, what = module.in_features, "input features"
            elif style == "qkv":
                size, what = module.out_features // 3, "output features per part (q, k, v)"
            else:
                size, what = module.out_features, "output features"
            if size % tp:
                raise PlaitError(f"tensor parallel: {name}: {what} {size} is not divisible by tp={tp}")
            heads = _heads_of(model, name, style, size)
            if heads % tp:
                raise PlaitError(f"tensor parallel: {name}: its {heads} attention heads (of {size // heads}) "
                                 f"are not divisible by tp={tp}")
    for name, module in model.named_modules():
        heads = getattr(module, "heads", None)
        if isinstance(heads, int) and heads % tp:
            raise PlaitError(f"tensor parallel: {name}: {heads} attention heads are not divisible by tp={tp}")


def _heads_of(model: nn.Module, name: str, style: str, size: int) -> int:
    """The attention heads a colwise projection ``name`` of ``size`` outputs (per part) holds, by
    its parent's ``head_dim`` (transformers' name); 0 when it is not one (or its parent says its
    ``heads``, checked on their own)."""
    parent = model.get_submodule(name.rpartition(".")[0])
    head_dim = getattr(parent, "head_dim", None)
    if style not in ("colwise", "qkv") or isinstance(getattr(parent, "heads", None), int) \
            or not isinstance(head_dim, int) or head_dim <= 0 or size % head_dim:
        return 0
    return size // head_dim


def _replace(model: nn.Module, name: str, style: str, group, shared: dict) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, leaf)

    def build(source: nn.Module, tied: nn.Parameter | None) -> nn.Module:
        if style == "vocab":
            return VocabParallelEmbedding.from_module(source, group, name)
        if style == "rowwise":
            return RowParallelLinear.from_module(source, group, name)
        return ColumnParallelLinear.from_module(source, group, name, gather_output=style == "colwise_gather",
                                                weight=tied, parts=3 if style == "qkv" else 1)

    new = build(module, shared.get(id(module.weight)))
    shared[id(module.weight)] = new.weight
    if module.weight.is_meta:  # built on the meta device: the slices get memory later, from the source
        new.materialize = lambda init: _materialize(new, module, build, init)
    setattr(parent, leaf, new)


def _materialize(layer: nn.Module, source: nn.Module, build, init) -> None:
    """Initialise the unsplit ``source`` (``init(source)``) and take this rank's slices of it."""
    init(source)
    for key, param in build(source, None)._parameters.items():
        layer._parameters[key] = param
    del layer.materialize  # and let the unsplit source go
