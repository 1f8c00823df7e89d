"""What part of each unsplit tensor a rank holds, whatever the layout: the map that lets a
checkpoint saved under one layout load under any other.

A rank trains some tensors (``T``: a tensor-parallel slice of a parameter, or a ZeRO shard,
a flat slice of several). Each is described by ``Piece``s: a contiguous range of ``T``'s
elements that is a box (offsets and sizes) of one unsplit parameter. Tensor parallelism makes
boxes of rows or columns (a fused q/k/v projection: three boxes, one per part); ZeRO's flat
slices cut parameters at any element, which is at most a few boxes per parameter.

    pieces = tensor_pieces("blocks.0.mlp.up.weight", p)          # p: this rank's tp slice
    pieces = unit_pieces(names, params, offsets, start, stop)    # a ZeRO shard [start, stop)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from plait.distributed.comm import all_gather_data, all_gather_ragged
from plait.errors import PlaitError

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


@dataclass(frozen=True)
class TPSplit:
    """How tensor parallelism split a parameter: along ``dim``, as ``parts`` equal parts side by
    side (3 for a fused q/k/v), each part cut into ``world`` slices; this rank holds slice ``rank``
    of every part. Set on the parameter as ``param.plait_tp`` by the tensor-parallel layers."""

    dim: int
    parts: int
    rank: int
    world: int


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of a trained tensor are the box ``offsets``/``sizes`` of the
    unsplit tensor ``name`` (of shape ``shape``). ``tp_replica``: every tp rank holds the same
    values (a norm counts them once)."""

    name: str
    start: int
    stop: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    shape: tuple[int, ...]
    tp_replica: bool

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This piece of ``flat`` (the trained tensor's elements, or its optimizer state's)."""
        return flat[self.start : self.stop].view(self.sizes)


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[int, Box]]:
    """The row-major element range [start, stop) of a tensor of ``shape`` as boxes, each
    contiguous in memory: a list of (first element, (offsets, sizes))."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [(start, ((start,), (stop - start,)))] if shape else [(0, ((), ()))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:  # inside one row
        return [(s + first * inner, ((first, *o), (1, *z)))
                for s, (o, z) in flat_boxes(shape[1:], start - first * inner, stop - first * inner)]
    boxes = []
    if start % inner:  # the partial first row
        boxes += flat_boxes(shape, start, (first + 1) * inner)
        first += 1
    full_end = last if stop % inner else last + 1
    if full_end > first:
        boxes.append((first * inner, ((first, *[0] * (len(shape) - 1)), (full_end - first, *shape[1:]))))
    if stop % inner:  # the partial last row
        boxes += flat_boxes(shape, last * inner, stop)
    return boxes


def unsplit_shape(param: torch.Tensor) -> tuple[int, ...]:
    split: TPSplit | None = getattr(param, "plait_tp", None)
    shape = list(param.shape)
    if split is not None:
        shape[split.dim] *= split.world
    return tuple(shape)


def _to_global(param: torch.Tensor, first: int, box: Box) -> list[tuple[int, Box]]:
    """A box of the local (tp) slice ``param`` as boxes of the unsplit tensor."""
    split: TPSplit | None = getattr(param, "plait_tp", None)
    if split is None:
        return [(first, box)]
    offsets, sizes = box
    d, local = split.dim, param.shape[split.dim]
    part = local // split.parts  # this rank's rows (or columns) of one part
    whole = part * split.world  # one part of the unsplit tensor
    lo, hi = offsets[d], offsets[d] + sizes[d]
    if split.parts > 1 and d != 0 and (lo // part != (hi - 1) // part):
        raise PlaitError("checkpoint: a fused projection split along a dimension other than 0 is not supported")
    stride = math.prod(param.shape[d + 1 :]) if d == 0 else 0
    out = []
    for j in range(split.parts):
        a, b = max(lo, j * part), min(hi, (j + 1) * part)
        if a >= b:
            continue
        o, z = list(offsets), list(sizes)
        o[d], z[d] = a - j * part + j * whole + split.rank * part, b - a
        out.append((first + (a - lo) * stride, (tuple(o), tuple(z))))
    return out


def tensor_pieces(name: str, param: torch.Tensor, start: int = 0, stop: int | None = None,
                  at: int = 0) -> list[Piece]:
    """Pieces for elements [start, stop) of ``param`` (its tp slice), which sit at element
    ``at`` of the trained tensor."""
    stop = param.numel() if stop is None else stop
    shape, replica = unsplit_shape(param), getattr(param, "plait_tp", None) is None
    pieces = []
    for first, box in flat_boxes(tuple(param.shape), start, stop):
        for begin, (offsets, sizes) in _to_global(param, first, box):
            pieces.append(Piece(name, at + begin - start, at + begin - start + math.prod(sizes),
                                offsets, sizes, shape, replica))
    return pieces


def unit_pieces(names: list[str], params: list[torch.Tensor], offsets: list[int], start: int,
                stop: int) -> list[Piece]:
    """Pieces of a ZeRO shard: elements [start, stop) of a flat buffer in which ``params[i]``
    sits from ``offsets[i]`` on."""
    pieces = []
    for name, p, offset in zip(names, params, offsets):
        a, b = max(start, offset), min(stop, offset + p.numel())
        if a < b:
            pieces += tensor_pieces(name, p, a - offset, b - offset, at=a - start)
    return pieces


def gather_unsplit(held: list[tuple[torch.Tensor, list[Piece]]], group=None) -> dict[str, torch.Tensor]:
    """Every unsplit tensor, assembled on every rank from what all ranks hold (for tests and
    small models: it sends every piece to every rank). Where each piece goes travels as JSON
    data, its values as tensors, one all-gather per dtype: nothing received is unpickled."""
    mine = [(p.name, p.offsets, p.sizes, p.shape, p.view(t.detach().reshape(-1)))
            for t, pieces in held for p in pieces]
    header = [[name, list(offsets), list(sizes), list(shape), str(values.dtype).removeprefix("torch."), values.numel()]
              for name, offsets, sizes, shape, values in mine]
    headers = all_gather_data(header, "gathering the unsplit parameters' layout", group)
    out: dict[str, torch.Tensor] = {}
    for dtype_name in sorted({row[4] for rows in headers for row in rows}):
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise PlaitError(f"gathering the unsplit parameters: a peer named {dtype_name!r}, not a dtype")
        ours = [values.reshape(-1) for *_, values in mine if values.dtype == dtype]
        flat = torch.cat(ours) if ours else torch.empty(0, dtype=dtype)
        everyone = all_gather_ragged(flat, "gathering the unsplit parameters", group)
        for rows, values in zip(headers, everyone):
            at = 0
            for name, offsets, sizes, shape, kind, n in rows:
                if kind != dtype_name:
                    continue
                whole = out.setdefault(name, torch.zeros(shape, dtype=dtype))
                whole[tuple(slice(o, o + z) for o, z in zip(offsets, sizes))] = values[at : at + n].view(sizes)
                at += n
    return out


class Chunks:
    """Boxes of one unsplit tensor that this rank holds, as ``torch.distributed.checkpoint``
    saves and loads them (its checkpointable protocol, as DTensor implements it): each box is
    written at its offsets, and on load DCP reads into each box whatever boxes of the saved
    tensor overlap it, however that run was laid out."""

    def __init__(self, shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], torch.Tensor]]):
        self.shape, self.boxes = torch.Size(shape), boxes

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, obj) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), t.size()),
                                                      properties=TensorProperties.create_from_tensor(t),
                                                      size=self.shape))
                for offsets, t in self.boxes]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(torch.Size(offsets), t.size()) for offsets, t in self.boxes]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        for offsets, t in self.boxes:
            if torch.Size(offsets) == index.offset:
                return t
        raise ValueError(f"no box at {tuple(index.offset)} of {index.fqn}")


def as_checkpointable(pieces: list[Piece], flat: torch.Tensor) -> dict[str, torch.Tensor | Chunks]:
    """``{name: tensor}`` for the pieces of ``flat`` (a trained tensor's elements, or its
    optimizer state's): a whole unsplit tensor as itself, parts of one as ``Chunks``."""
    grouped: dict[str, list[Piece]] = {}
    for p in pieces:
        grouped.setdefault(p.name, []).append(p)
    out = {}
    for name, parts in grouped.items():
        first = parts[0]
        if len(parts) == 1 and first.sizes == first.shape:
            out[name] = first.view(flat)
        else:
            out[name] = Chunks(first.shape, [(p.offsets, p.view(flat)) for p in parts])
    return out


Held = list[tuple[torch.Tensor, list[Piece], list[str]]]
"""What a rank trains: (tensor, its pieces of unsplit tensors, the names whose optimizer step
count it carries)."""


def unsplit_names(model: torch.nn.Module) -> list[str]:
    """The names a checkpoint keys ``model``'s tensors by: each parameter once (a tied weight under
    the first module that holds it, as ``named_parameters`` gives it), then each buffer."""
    return [n for n, _ in model.named_parameters()] + list(tensor_names(model.named_modules())[1].values())


def tensor_names(modules) -> tuple[dict[int, str], dict[int, str]]:
    """id -> name of the parameters, and of the buffers that ``state_dict()`` holds (not the
    non-persistent ones), of the ``(name, module)`` pairs ``modules`` (a tied tensor: its first name)."""
    params, buffers = {}, {}
    for module_name, module in modules:
        prefix = f"{module_name}." if module_name else ""
        for key, p in module._parameters.items():
            if p is not None:
                params.setdefault(id(p), prefix + key)
        for key, b in module._buffers.items():
            if b is not None and key not in module._non_persistent_buffers_set:
                buffers.setdefault(id(b), prefix + key)
    return params, buffers


def held_whole(model: torch.nn.Module) -> Held:
    """A model that every rank holds whole (tensor-parallel slices marked as such)."""
    return [(p, tensor_pieces(name, p), [name]) for name, p in model.named_parameters() if p.requires_grad]


def checkpoint_tensors(held: Held, buffers: dict[str, torch.Tensor], optimizer) -> dict:
    """A rank's share of model and optimizer state for DCP, keyed by unsplit names:
    ``model.<name>`` and ``optim.state.<name>.<key>`` (torch's flattened optimizer keys)."""
    tensors: dict = {}
    for t, pieces, owners in held:
        for name, value in as_checkpointable(pieces, t.detach().reshape(-1)).items():
            tensors[f"model.{name}"] = value
        for key, value in optimizer.state.get(t, {}).items():
            if not torch.is_tensor(value):
                continue
            if value.shape == t.shape:  # laid out like the tensor: its pieces
                for name, part in as_checkpointable(pieces, value.reshape(-1)).items():
                    tensors[f"optim.state.{name}.{key}"] = part
            else:  # a step count: the same for every name it covers
                tensors.update({f"optim.state.{name}.{key}": value for name in owners})
    tensors.update({f"model.{name}": b for name, b in buffers.items()})
    return tensors
