"""One composition for every layout: tensor parallel, then the pipeline cut, then data parallel
or ZeRO, in that order, on one mesh (as torchtitan and picotron compose them).

    layout = Layout.from_config(cfg, world_size)            # dp, pp, tp, zero, micro-batches, ...
    par = parallelize(model, mesh, layout, loss_fn)
    optimizer = torch.optim.AdamW(par.parameters(), lr=1e-3)
    par.attach(optimizer)
    loss = par.step(x, y)                                   # forward and backward, gradients synced
    optimizer.step()

1. Tensor parallel by the model's ``tp_plan()`` on the ``tp`` axis, on the whole model, so the
   plan's patterns are the unsplit model's names.
2. The pipeline cut on the ``pp`` axis: this rank keeps the run of blocks (``blocks_of``) that
   is its stage; one stage holding every block when pp = 1, so every layout runs the same path.
3. The stage wrapped in ``DataParallel`` or ``Zero`` on the ``dp`` axis; ZeRO-3's units are the
   stage's blocks, the modules its forward calls.

The trainer asks the result what it runs: the parameters to optimize, the global gradient norm
(each tp slice, stage and ZeRO slice counted once, replicas once), what a checkpoint holds (keyed
by the unsplit model's names, so that it loads under any other layout), the loss's copies.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.distributed.comm import all_reduce
from plait.distributed.mesh import Mesh, resolve_degrees
from plait.errors import ConfigError, PlaitError
from plait.parallel.data import DataParallel
from plait.parallel.materialize import Materializer, is_meta
from plait.parallel.pipeline import PipelineStage, StageModule, blocks_of, cut_points
from plait.parallel.pipeline.chain import Chain, ModelStage, call_order, model_chain
from plait.parallel.pipeline.cut import block_times
from plait.parallel.compress import Compression
from plait.parallel.recompute import recompute_blocks
from plait.parallel.shards import (Held, as_checkpointable, checkpoint_tensors, gather_unsplit, tensor_names, tensor_pieces,
                                  unit_pieces, unsplit_names)
from plait.parallel.tensor import parallelize as tensor_parallelize
from plait.parallel.tensor import vocab_parallel_cross_entropy
from plait.parallel.tensor.comm import gather_from
from plait.parallel.tensor.layers import is_split
from plait.parallel.tensor.plan import STYLES, check_plan
from plait.parallel.zero import Zero


GRAD_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
"""``parallel.grad_dtype``: what data-parallel gradients are reduced in (None: their own dtype)."""


@dataclass(frozen=True)
class Layout:
    """How a run is laid out over its processes: the mesh's degrees and how a step is cut up."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    zero: int = 0
    """ZeRO stage on the dp axis (0: plain data parallel)."""
    microbatches: int = 1
    """Pipeline micro-batches per data-parallel rank and step (pp > 1)."""
    schedule: str = "1f1b"
    virtual: int = 1
    """Chunks (virtual stages) per pipeline stage: the model is cut into pp x virtual pieces."""
    accum_steps: int = 1
    """Batches a step accumulates over, gradients synced on the last one."""
    balance: str = "params"
    cuts: tuple[int, ...] = ()
    bucket_mb: float = 25.0
    prefetch: bool = True
    """ZeRO-3: the next unit's all-gather launched before this unit's pass (``parallel.prefetch``)."""
    reshard_after_forward: bool = True
    """ZeRO-3: units freed after their forward, or kept whole into their backward
    (``parallel.reshard_after_forward``)."""
    allow_unused: bool = False
    tp_plan: tuple[tuple[str, str], ...] = ()
    """(pattern, style) pairs splitting the model over tp; empty: the model's ``tp_plan()``."""
    blocks: str = ""
    """The model's chain of blocks to cut (``pipeline.blocks``); empty: an ``nn.Sequential``'s
    children, or the model's ``pipeline_blocks()``."""
    recompute: bool = False
    """Recompute each block's activations in backward instead of keeping them (``train.recompute``)."""
    grad_dtype: str = "fp32"
    """The dtype data-parallel gradients are reduced in: fp32 or bf16 (``parallel.grad_dtype``)."""
    compress: Compression = Compression()
    """Gradient compression with error feedback on dp (``parallel.compress``), or none."""

    @classmethod
    def from_config(cls, cfg, world_size: int) -> Layout:
        """The layout a config asks for on ``world_size`` processes; one line naming the key and
        the numbers if the degrees do not multiply to the world or the batch does not split."""
        p = cfg.parallel
        sizes = resolve_degrees(world_size, p.dp, p.pp, p.tp)
        layout = cls(dp=sizes["dp"], pp=sizes["pp"], tp=sizes["tp"], zero=p.zero,
                     microbatches=cfg.pipeline.microbatches if sizes["pp"] > 1 else 1,
                     schedule=cfg.pipeline.schedule, virtual=cfg.pipeline.virtual if sizes["pp"] > 1 else 1,
                     accum_steps=cfg.train.accum_steps,
                     balance=cfg.pipeline.balance, cuts=tuple(cfg.pipeline.cuts),
                     bucket_mb=p.bucket_mb, prefetch=p.prefetch,
                     reshard_after_forward=p.reshard_after_forward, allow_unused=p.allow_unused,
                     tp_plan=tuple(p.tp_plan.items()),
                     blocks=cfg.pipeline.blocks, recompute=cfg.train.recompute, grad_dtype=p.grad_dtype,
                     compress=Compression(p.compress, p.compress_rank, p.compress_ratio, p.compress_start))
        if layout.blocks and layout.balance == "time" and layout.pp > 1 and not layout.cuts:
            raise ConfigError("pipeline.balance: 'time' times blocks on their own, which a model's chain "
                              "(pipeline.blocks) does not allow; use 'params' or pipeline.cuts")
        layout.check_chunks()
        if layout.virtual > 1 and layout.schedule == "1f1b" and layout.microbatches % layout.pp:
            raise ConfigError(f"pipeline.microbatches: interleaved 1F1B (pipeline.virtual = {layout.virtual}) needs "
                              f"micro-batches divisible by pp ({layout.pp}), got {layout.microbatches}")
        layout.check_batch(cfg.train.batch_size)
        return layout

    def check_batch(self, batch_size: int) -> None:
        """The global batch splits into dp ranks x accumulation steps, and each of those shares
        into pipeline micro-batches."""
        if batch_size % (self.dp * self.accum_steps):
            raise ConfigError(f"train.batch_size: {batch_size} is not divisible by dp ({self.dp}) x "
                              f"train.accum_steps ({self.accum_steps})")
        share = batch_size // (self.dp * self.accum_steps)
        if share % self.microbatches:
            raise ConfigError(f"pipeline.microbatches: {self.microbatches} does not divide each data-parallel "
                              f"rank's {share} samples per accumulation step (train.batch_size {batch_size} / "
                              f"dp {self.dp} / train.accum_steps {self.accum_steps})")

    def check_chunks(self) -> None:
        """Several chunks per stage need Plait's own chain of blocks to cut into pieces."""
        if self.virtual > 1 and self.blocks:
            raise ConfigError("pipeline.virtual: a model that runs its own forward around its blocks "
                              f"(pipeline.blocks = {self.blocks!r}) holds one chunk per stage; "
                              "use pipeline.virtual = 1")

    def plan(self, model: nn.Module) -> dict[str, str] | None:
        """How tensor parallelism splits ``model``: the config's plan, else the model's own."""
        if self.tp_plan:
            return dict(self.tp_plan)
        return model.tp_plan() if hasattr(model, "tp_plan") else None

    def chain(self, model: nn.Module, order: dict[str, int] | None = None) -> Chain:
        """What pipelines cut and ZeRO-3 gathers: the blocks ``blocks`` names, else Plait's.
        ``order``: the order the model's forward calls its modules (``call_order``)."""
        return model_chain(model, self.blocks, order) if self.blocks else Chain(blocks_of(model))

    def check_model(self, model: nn.Module) -> None:
        """What the unsplit model (on the meta device is enough) must allow: a tensor-parallel
        plan whose sizes divide by tp, at least pp blocks to cut."""
        what = type(model).__name__
        if self.tp > 1:
            plan = self.plan(model)
            if plan is None:
                raise ConfigError(f"parallel.tp: the model ({what}) has no tensor-parallel plan; say how to split it in "
                                  "the config: parallel.tp_plan = {\"PATTERN\" = \"STYLE\", ...} over its module names "
                                  f"(styles: {', '.join(STYLES)})")
            check_plan(model, plan, self.tp)
        self.check_chunks()
        chain = self.chain(model)
        blocks = chain.blocks
        pieces = self.pp * self.virtual
        if pieces > len(blocks) and self.virtual > 1:
            raise ConfigError(f"pipeline.virtual: {self.pp} stages x {self.virtual} chunks make {pieces} pieces, but "
                              f"the model ({what}) has only {len(blocks)} blocks to cut")
        if self.pp > len(blocks):
            if len(blocks) == 1 and not self.blocks:
                raise ConfigError(f"parallel.pp: the model ({what}) is not a chain of blocks Plait can cut; name its "
                                  "ModuleList of layers in the config: pipeline.blocks = \"...\" (e.g. \"model.layers\")")
            raise ConfigError(f"parallel.pp: {self.pp} stages, but the model ({what}) has only "
                              f"{len(blocks)} block{'s' if len(blocks) > 1 else ''} to cut")
        if self.zero == 3:  # each block is a unit, gathered on its own
            units = chain.units()
            shared = _shared_across(model, [[m] for _, m in units])
            if shared:
                name, a, b = shared
                raise ConfigError(f"ZeRO-3: parameter {name} is used by blocks {units[a][0]!r} and {units[b][0]!r} "
                                  "(tied weights), which it gathers one at a time; untie them (for the GPT: "
                                  "model.args.tied = false) or use parallel.zero = 1 or 2")
        if self.pp > 1 and (self.cuts or self.balance == "params"):  # a measured balance cuts at run time
            starts = cut_points(blocks, pieces, self.balance, list(self.cuts) or None, weights=chain.weights())
            _check_stages(model, chain, starts + [len(blocks)], self.virtual)

    def describe(self) -> str:
        text = f"dp={self.dp} x pp={self.pp}" + (f" ({self.virtual} chunks each)" if self.virtual > 1 else "")
        text += f" x tp={self.tp}"
        if self.zero:
            text += f", ZeRO-{self.zero}" + (", units kept whole into backward" if self.zero == 3
                                             and not self.reshard_after_forward else "")
        return text + (", recompute" if self.recompute else "")


def parallelize(model: nn.Module, mesh: Mesh, layout: Layout, loss_fn, device: torch.device | None = None,
                sample: torch.Tensor | None = None, seed: int = 0) -> Parallelized:
    """Apply ``layout`` to ``model`` on ``mesh``: tensor parallel, then this rank's pipeline
    stage, then data parallel or ZeRO. ``model`` is built the same on every rank: whole, or on
    the meta device (``plait.parallel.materialize.build_deferred``), in which case only this
    rank's part gets memory, initialised from ``seed`` exactly as in one process.
    ``loss_fn(output, target)`` is the mean loss of a micro-batch; under tensor parallelism the
    output is split by vocabulary and the loss is vocab-parallel cross-entropy. ``sample``: a
    batch, for ``balance='time'``."""
    return Parallelized(model, mesh, layout, loss_fn, device or torch.device("cpu"), sample, seed)


class Parallelized:
    """A model laid out on a mesh: what the trainer steps, and asks what it runs."""

    def __init__(self, model: nn.Module, mesh: Mesh, layout: Layout, loss_fn, device: torch.device, sample,
                 seed: int):
        self.mesh, self.layout, self.device = mesh, layout, device
        layout.check_model(model)
        self.model_names = unsplit_names(model)
        self.tp_group, self.tp_rank = mesh.group("tp"), mesh.coord("tp")
        # 0. which modules a named chain of blocks has before and after it, by running the model
        order = call_order(model, sample) if layout.blocks and layout.pp > 1 else None
        # 1. tensor parallel, on the whole model (its names are the plan's)
        if layout.tp > 1:
            tensor_parallelize(model, layout.plan(model), self.tp_group)
        self.loss_fn = loss_fn
        materialize = Materializer(model, seed, device) if is_meta(model) else None
        modules = list(model.named_modules())  # the unsplit model's names, taken before the cut
        # 2. this rank's pipeline stage
        chain = layout.chain(model, order)
        blocks = chain.blocks
        weights = chain.weights()
        if layout.balance == "time" and layout.pp > 1 and not layout.cuts:
            if materialize:
                materialize(model)  # timing runs every block
            times = torch.tensor(block_times([b for _, b in blocks], (sample,)), dtype=torch.float64)
            weights = all_reduce(times, "pipeline block timing").tolist()  # every rank cuts alike
        pp, v = layout.pp, layout.virtual
        starts = cut_points(blocks, pp * v, layout.balance, list(layout.cuts) or None, weights=weights)
        starts.append(len(blocks))
        _check_stages(model, chain, starts, v)
        s = mesh.coord("pp")
        if chain.path:  # the model runs its own forward around this stage's blocks
            chunks = [ModelStage(model, chain, starts[s], starts[s + 1], s, pp)]
            pieces = [chunks[0].units]
        else:  # chunk c is piece c * pp + s
            pieces = [blocks[starts[c * pp + s] : starts[c * pp + s + 1]] for c in range(v)]
            chunks = [StageModule(piece) for piece in pieces]
        self.blocks = [b for piece in pieces for b in piece]
        self.stage_module = chunks[0] if v == 1 else nn.ModuleList(chunks)  # all this rank holds
        if layout.recompute:  # each block of the stage keeps only its input for backward
            recompute_blocks(self.blocks)
        # 3. data parallel or ZeRO on dp, one per chunk (each syncs at its chunk's last backward);
        # the stage gets memory here (ZeRO-3: unit by unit)
        dp_group = mesh.group("dp")
        if materialize is None:
            self.stage_module.to(device)
        self.wrappers: list[DataParallel | Zero] = []
        for chunk, piece in zip(chunks, pieces):
            if layout.zero:
                units = [b for _, b in piece] if layout.zero == 3 else None
                wrapper = Zero(chunk, dp_group, stage=layout.zero, units=units, materialize=materialize,
                               grad_dtype=GRAD_DTYPES[layout.grad_dtype], compress=layout.compress,
                               bucket_mb=layout.bucket_mb, prefetch=layout.prefetch,
                               reshard_after_forward=layout.reshard_after_forward)
            else:
                if materialize:
                    materialize(chunk)
                wrapper = DataParallel(chunk, dp_group, bucket_mb=layout.bucket_mb, allow_unused=layout.allow_unused,
                                       grad_dtype=GRAD_DTYPES[layout.grad_dtype], compress=layout.compress)
            self.wrappers.append(wrapper)
        self.pipe = PipelineStage(self.wrappers, s, pp, mesh.group("pp"), loss_fn=self._loss, device=device,
                                  feed_input=bool(chain.path))
        self.has_loss = self.pipe.last  # ranks that hold a loss
        self.loss_copies = layout.tp  # each tp rank of a last stage holds the same loss
        names, buffer_names = tensor_names(modules)  # now that the stage's parameters are real
        self.held = self._holdings(names)
        self._names = names  # parameter id -> unsplit name
        self._compression_loading: list = []
        self.buffers = {buffer_names[id(b)]: b for b in self.stage_module.buffers() if id(b) in buffer_names}
        self.norm_axes = [a for a, on in (("tp", layout.tp > 1), ("pp", layout.pp > 1), ("dp", bool(layout.zero))) if on]

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``loss_fn``, or cross-entropy when it is None; on an output split over tp (its last
        layer is colwise and not gathered), vocab-parallel cross-entropy."""
        if is_split(output):
            if self.loss_fn is not None:
                raise PlaitError("tensor parallel: the model's output is split over tp ranks (its last layer is "
                                 "'colwise'), which only cross-entropy takes as it is; make that layer "
                                 "'colwise_gather' in the plan, or use cross-entropy")
            if target.dim() == output.dim() - 1:
                output, target = output.flatten(0, -2), target.flatten()
            return vocab_parallel_cross_entropy(output, target, self.tp_group)  # [N, V/t]
        if self.loss_fn is None:
            if output.dim() > 2 and target.dim() == output.dim() - 1:
                output, target = output.flatten(0, -2), target.flatten()
            return F.cross_entropy(output.float(), target)
        return self.loss_fn(output, target)

    def _holdings(self, names: dict[int, str]) -> Held:
        """What the optimizer trains on this rank: (tensor, its pieces of unsplit tensors, the
        names whose optimizer step count it carries)."""
        if self.layout.zero:
            held = []
            for u in (u for w in self.wrappers for u in w.units):
                unit_names = [names[id(p)] for p in u.params]
                start = u.rank * u.size
                held.append((u.shard, unit_pieces(unit_names, u.params, u.offsets, start, start + u.size), unit_names))
            return held
        return [(p, tensor_pieces(names[id(p)], p), [names[id(p)]])
                for p in self.stage_module.parameters() if p.requires_grad]

    # -- what the trainer runs ------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: this rank's stage (its tp slices), or its ZeRO slices."""
        return [t for t, _, _ in self.held]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        for wrapper in self.wrappers:
            wrapper.attach(optimizer)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of this rank's share of a global batch; gradients synced over dp.
        Returns this rank's mean loss (zero on stages without one)."""
        k, m = self.layout.accum_steps, self.layout.microbatches
        total = torch.zeros((), device=x.device)
        for i, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k))):
            loss = self.pipe.step(xs, ys, m, self.layout.schedule, sync=i == k - 1, scale=1.0 / k)
            if loss is not None:
                total += loss.detach()
        return total

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole model's output on the last stages (the full vocabulary), None elsewhere."""
        out = self.pipe.infer(x)
        return gather_from(out, self.tp_group) if out is not None and is_split(out) else out

    def check(self, sample: torch.Tensor) -> None:
        """Push a micro-batch through every stage: stages that do not fit together fail here."""
        if self.layout.pp > 1:
            self.pipe.check(sample[: max(1, len(sample) // (self.layout.microbatches * self.layout.accum_steps))])

    def train(self, mode: bool = True) -> None:
        self.stage_module.train(mode)

    @property
    def training(self) -> bool:
        return self.stage_module.training

    # -- gradients ------------------------------------------------------------------------
    def grads(self) -> list[torch.Tensor]:
        return [t.grad for t, _, _ in self.held if t.grad is not None]

    def grad_norm(self) -> float:
        """The global gradient norm: each unsplit element counted once, whatever the layout."""
        square = torch.zeros((), dtype=torch.float64, device=self.device)
        for t, pieces, _ in self.held:
            if t.grad is None:
                continue
            flat = t.grad.detach().reshape(-1)
            for piece in pieces:
                if not (piece.tp_replica and self.tp_rank):  # a tp replica counts on tp rank 0 only
                    square += piece.view(flat).double().square().sum()
        for axis in self.norm_axes:
            all_reduce(square, f"gradient-norm all-reduce over {axis}", self.mesh.group(axis))
        return square.sqrt().item()

    def all_finite(self) -> bool:
        """Every rank's gradients are finite: all ranks decide alike."""
        grads = self.grads()
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all().float() if grads \
            else torch.ones((), device=self.device)
        all_reduce(finite, "finite-gradient check", op=dist.ReduceOp.MIN)
        return bool(finite.item())

    # -- state ----------------------------------------------------------------------------
    def checkpoint_state(self, optimizer: torch.optim.Optimizer, available: dict | None = None) -> dict:
        """This rank's share of the model and optimizer state, keyed by the unsplit model's names;
        ``available``: loading, what the checkpoint holds (its DCP metadata)."""
        tensors = checkpoint_tensors(self.held, self.buffers, optimizer)
        tensors.update(self._compression_state(available))
        return tensors

    def loaded(self) -> None:
        """After a checkpoint was loaded into the trained tensors (ZeRO 1-2 gather their slices;
        compression takes its residuals and factors)."""
        for wrapper in self.wrappers:
            wrapper.loaded()
        dp, d = self.mesh.size("dp"), self.mesh.coord("dp")
        for codec, rows, own, factors, steps in self._compression_loading:
            if rows:  # the dp rank's own residual, or (another dp degree) the sum's share
                codec.error = rows[d] if own else sum(rows.values()) / dp
            codec.set_factors(factors)
            codec.steps = int(steps)
        self._compression_loading = []

    def _compression_state(self, available: dict | None) -> dict:
        """Gradient compression's state by unsplit name: each dp rank's residual
        (``compress.error.dp<d>.<name>``, in the boxes of the parameter this rank holds, so it
        loads under another pp or tp; under another dp degree each rank takes 1/dp of the saved
        ranks' sum, which keeps what is owed to the mean gradient), PowerSGD's Q
        (``compress.q.<name>``; a tp-split parameter's per tp rank, loaded only where the tp
        degree and its shape agree, else Q starts afresh) and the step count."""
        codecs = self.codecs
        if not codecs:
            return {}
        d = self.mesh.coord("dp")
        tp = f"tp{self.tp_rank}of{self.layout.tp}." if self.layout.tp > 1 else ""
        saved = None if available is None else sorted(
            {int(k.split(".")[2][2:]) for k in available if k.startswith("compress.error.dp")})
        own = saved == list(range(self.mesh.size("dp")))  # saved under this dp degree
        steps = torch.tensor(codecs[0][0].steps)  # the same for every buffer
        out: dict = {"compress.steps": steps} if available is None or "compress.steps" in available else {}
        for codec, params, offsets in codecs:
            names = [self._names[id(p)] for p in params]
            pieces = unit_pieces(names, params, offsets, 0, codec.numel)
            split = {names[i] for i, p in enumerate(params) if getattr(p, "plait_tp", None) is not None}
            q_key = {i: f"compress.q.{tp if names[i] in split else ''}{names[i]}" for i in codec.factors()}
            if available is None:
                error = codec.error if codec.error is not None else params[0].new_zeros(codec.numel)
                for name, part in as_checkpointable(pieces, error).items():
                    out[f"compress.error.dp{d}.{name}"] = part
                out.update({q_key[i]: q for i, q in codec.factors().items()})
                continue
            rows = {}
            for k in [d] if own else saved:
                rows[k] = params[0].new_zeros(codec.numel)
                for name, part in as_checkpointable(pieces, rows[k]).items():
                    out[f"compress.error.dp{k}.{name}"] = part
            factors = {i: q.clone() for i, q in codec.factors().items()
                       if q_key[i] in available and tuple(available[q_key[i]].size) == tuple(q.shape)}
            out.update({q_key[i]: q for i, q in factors.items()})
            self._compression_loading.append((codec, rows, own, factors, steps))
        return out

    @property
    def codecs(self) -> list:
        """Each compressed buffer of every chunk: (its codec, its parameters, their offsets)."""
        return [c for w in self.wrappers for c in w.codecs]

    def unsplit_parameters(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters, assembled on every rank (sends everything: small models only)."""
        return gather_unsplit([(t, pieces) for t, pieces, _ in self.held])

    def check_consistency(self) -> None:
        """Raise if the dp replicas of this stage differ anywhere."""
        for wrapper in self.wrappers:
            wrapper.check_consistency()

    @contextmanager
    def whole_model(self):
        """The stage with its parameters whole (ZeRO-3 gathers them for the while)."""
        with ExitStack() as stack:
            for wrapper in self.wrappers:
                stack.enter_context(wrapper.gathered())
            yield self.stage_module

    def report(self, optimizer: torch.optim.Optimizer) -> dict:
        if not self.layout.zero:
            return {}
        held = [w.memory(optimizer if i == 0 else None) for i, w in enumerate(self.wrappers)]  # the state once
        return {"zero_memory_bytes": {k: sum(h[k] for h in held) for k in held[0]}}


def _shared_across(model: nn.Module, parts: list[list[nn.Module]]) -> tuple[str, int, int] | None:
    """The first parameter used by two of ``parts``: (its name in ``model``, the part that uses it
    first, the other part), or None."""
    owner: dict[int, int] = {}
    for part, modules in enumerate(parts):
        for module in modules:
            for p in module.parameters():
                if owner.setdefault(id(p), part) != part:
                    name = next(n for n, q in model.named_parameters(remove_duplicate=False) if q is p)
                    return name, owner[id(p)], part
    return None


def _check_stages(model: nn.Module, chain: Chain, starts: list[int], virtual: int = 1) -> None:
    """Every piece (of the pp x virtual the model is cut into) has parameters to train (a stage
    or chunk without them has no gradients to reduce or step), and no parameter is used by two
    (it would get two different gradients)."""
    parts = chain.parts(starts)
    for q, modules in enumerate(parts):
        if not any(p.requires_grad for m in modules for p in m.parameters()):
            names = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in chain.blocks[starts[q] : starts[q + 1]])
            piece, degrees = ((f"piece {q} of {len(parts)}", f"parallel.pp x pipeline.virtual = {len(parts)}")
                              if virtual > 1 else (f"stage {q}", f"parallel.pp = {len(parts)}"))
            raise ConfigError(f"pipeline: {piece} would hold only blocks without parameters to train ({names}); "
                              f"cut into fewer pieces ({degrees}) or choose pipeline.cuts")
    shared = _shared_across(model, parts)
    if shared:
        name, a, b = shared
        raise ConfigError(f"pipeline: parameter {name} is used by stages {a} and {b} (tied weights), which would give "
                          "it two gradients; untie them (for the GPT: model.args.tied = false) or do not cut between them")
