"""ZeRO (Rajbhandari et al., 2020) on the data-parallel group: shard what need not be replicated.

    stage 1  optimizer state sharded: gradients all-reduced, each rank steps its slice, slices all-gathered
    stage 2  and gradients: reduce-scattered (on gloo: all-reduced, which is faster there, and
             sliced), so each rank keeps only its slice between steps
    stage 3  and parameters: a unit's parameters are all-gathered just before its forward and its
             backward (the next unit's gather launched meanwhile: prefetch), and freed right after
             (the forward's last unit stays whole into the backward that starts with it); with
             ``reshard_after_forward=False`` kept whole from the forward to their backward instead
             (one all-gather per unit and step fewer; the whole model's parameters held at the
             forward's end)

Each unit (for stages 1-2 a bucket of parameters, cut by size in backward order; for stage 3 the
modules given, by default each top-level child; ``plait.parallel.compose`` gives the blocks that
forward calls) keeps its parameters
as views into one flat buffer, padded to a multiple of the world size; rank r owns elements
[r*S, (r+1)*S). The optimizer trains those slices (``shard_parameters()``): any elementwise
torch.optim optimizer (SGD, Adam, AdamW) then computes exactly what it would on the whole model.

    model = Zero(model, group=mesh.group("dp"), stage=3)
    optimizer = torch.optim.AdamW(model.shard_parameters(), lr=1e-3)
    model.attach(optimizer)       # stages 1-2: gather the updated slices after every step
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.comm import all_gather_flat, broadcast_tensors, reduce_scatter_flat, wait
from plait.errors import PlaitError
from plait.parallel.backward import EndOfBackward
from plait.parallel.compress import Codec, Compression, make_codec
from plait.parallel.consistency import check_consistency
from plait.parallel.data import cut_buckets


class _Unit:
    """One flat buffer of parameters and this rank's slice of it."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], group: dist.ProcessGroup | None):
        self.module, self.params, self.group = module, params, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        world = self.world
        self.numel = sum(p.numel() for p in params)
        self.size = -(-self.numel // world)  # slice length S
        first = params[0]
        self.full = torch.zeros(self.size * world, dtype=first.dtype, device=first.device)  # [W*S]
        offset = 0
        self.offsets = []
        for p in params:
            self.full[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
            self.offsets.append(offset)
            offset += p.numel()
        self.grad_full: torch.Tensor | None = None
        self.reduced: torch.Tensor | None = None  # this rank's reduce-scattered slice, until added
        self.grad_slice: torch.Tensor | None = None  # stages 2-3: the memory of this rank's gradient slice
        self.param_grads: list = []  # stage 3 by all-reduce: (index, gradient, its reduction) in flight
        self.wire: torch.Tensor | None = None  # the bf16 copy of grad_full being all-reduced, if any
        self.codec: Codec | None = None  # stage 1's compressed reduction (parallel.compress), if asked for
        self.compressed = False  # this step's reduction went through the codec
        self.pending, self.work, self.fresh = len(params), None, True
        self.gathering: dist.Work | None = None  # an all-gather into ``full`` in flight (a prefetch)
        self.order: int | None = None  # stage 3: its place in the forward order, once it ran
        self.gathers = 0  # all-gathers launched into ``full``

    def make_shard(self, own_storage: bool) -> None:
        """This rank's slice as the parameter the optimizer trains [S]: a view of the flat buffer
        (stages 1-2: a step updates the parameters in place), or its own memory (stage 3)."""
        mine = self.full[self.rank * self.size : (self.rank + 1) * self.size]
        self.shard = nn.Parameter(mine.clone() if own_storage else mine)
        self.shard_in_full = not own_storage

    def bind_params(self) -> None:
        """Make every parameter a view of the flat buffer."""
        for p, offset in zip(self.params, self.offsets):
            p.data = self.full[offset : offset + p.numel()].view_as(p)

    def start_gather(self) -> None:
        """Launch the all-gather of every rank's slice into the flat buffer (re-allocating it if
        it was freed); ``finish_gather`` waits for it."""
        self.finish_gather()  # one gather into the buffer at a time
        if self.full.untyped_storage().size() == 0:
            self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
        mine = self.shard.detach()
        if self.shard_in_full:  # stages 1-2: never gather from memory the gather writes into
            mine = mine.clone()
        self.gathering = all_gather_flat(self.full, mine, self.group, async_op=True)
        self.gathers += 1

    def finish_gather(self) -> None:
        work, self.gathering = self.gathering, None
        if work is not None:
            wait(work, "ZeRO parameter all-gather", self.group)

    def gather(self) -> None:
        self.start_gather()
        self.finish_gather()

    def is_free(self) -> bool:
        """Stage 3: its parameters' memory is gone, and no gather is bringing it back."""
        return self.gathering is None and self.full.untyped_storage().size() == 0

    def free_full(self) -> None:
        self.finish_gather()  # never free memory a gather still writes into
        self.full.untyped_storage().resize_(0)  # views stay valid tensors; their memory is gone


class Zero(EndOfBackward, nn.Module):
    """Data parallelism with ZeRO stage 1, 2 or 3 over ``group``."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None, stage: int = 1,
                 units: list[nn.Module] | None = None, reduce_scatter: bool | None = None, materialize=None,
                 grad_dtype: torch.dtype | None = None, compress: Compression | None = None,
                 bucket_mb: float | None = 25.0, prefetch: bool = True, reshard_after_forward: bool = True):
        """``units``: stage 3's modules, each gathered whole for its forward and backward (default:
        each top-level child). Stages 1-2 cut the parameters into buckets of ``bucket_mb`` MiB in
        backward order instead (None: one), so that each bucket's reduction starts while backward
        goes on and, at stage 2, only the buckets in flight hold whole gradients.
        ``prefetch`` (stage 3): launch the all-gather of the unit that runs next (in the forward
        order seen at the first step, reversed in backward) before this unit's pass, so that it
        travels while this one computes: at most two units are whole at a time.
        ``reshard_after_forward`` (stage 3; FSDP's name): False keeps each unit whole from its
        forward until its backward has reduced its gradients, so that a backward finds it whole
        instead of gathering it again: one all-gather per unit and step fewer, for holding every
        unit of the model whole at the end of the forward (stages 1-2 keep them whole anyway).
        ``reduce_scatter``: how stages 2-3 reduce gradients; None chooses by backend (see below).
        ``grad_dtype``: the dtype gradients are reduced in (``torch.bfloat16``: half the bytes; the
        reduced slice is cast back, so the optimizer and its state stay in the parameters' dtype).
        ``materialize(unit)``: for a module built on the meta device, give a unit's parameters
        memory just before it is sharded, so that no more than one unit is ever whole.
        ``compress``: stage 1 reduces its gradient compressed, with error feedback
        (``plait.parallel.compress``); stages 2-3 reduce slices, which it does not serve."""
        super().__init__()
        if stage not in (1, 2, 3):
            raise PlaitError(f"parallel.zero={stage}: ZeRO stages are 1, 2 and 3")
        if compress is not None and compress.on and stage > 1:
            raise PlaitError(f"parallel.compress={compress.method!r} serves ZeRO stage 1 and plain data parallel, "
                             f"not stage {stage} (it reduces slices); parallel.grad_dtype = 'bf16' halves its bytes")
        self.module, self.group, self.stage, self.grad_dtype = module, group, stage, grad_dtype
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.prefetch = prefetch and stage == 3
        self.reshard_after_forward = reshard_after_forward or stage < 3
        seen: set[int] = set()
        self.units: list[_Unit] = []
        self._slot = {}
        for m, params in self._groups(module, stage, units, materialize, bucket_mb):
            params = [p for p in params if id(p) not in seen]
            if not params:
                continue
            if stage == 3 and any(id(p) in seen for p in m.parameters()):
                raise PlaitError("ZeRO stage 3: a parameter shared between units is not supported")
            seen.update(id(p) for p in params)
            if self.world > 1:
                broadcast_tensors(params, 0, group)
            u = _Unit(m, params, group)
            u.make_shard(own_storage=stage == 3)
            u.bind_params()
            u.codec = make_codec(compress, u.params, u.offsets, u.numel, group)
            if stage == 3:
                u.free_full()
            self.units.append(u)
        if materialize is not None:
            materialize(module)  # anything outside the units (frozen parameters)
        missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in seen]
        if missing:
            raise PlaitError(f"ZeRO: parameters outside every unit: {', '.join(missing[:3])}")
        if self.world > 1:
            broadcast_tensors([p for p in module.parameters() if id(p) not in seen] + list(module.buffers()), 0, group)
        for u in self.units:
            for i, p in enumerate(u.params):
                self._slot[p] = (u, i)
                p.register_post_accumulate_grad_hook(self._grad_ready)
            if stage == 3:
                u.module.register_forward_pre_hook(lambda m, args, u=u: self._before_forward(u))
                u.module.register_forward_hook(lambda m, args, out, u=u: self._after_forward(u, out))
        self._sync, self._armed = True, False
        self._forward_order: list[_Unit] = []  # stage 3: the units as their forwards first ran
        self._order_known = False  # stage 3: a whole forward and backward have run
        self._kept: _Unit | None = None  # stage 3: the last unit, left whole after its forward for its backward
        self.prefetched = 0  # stage 3: gathers that a prefetch had launched before the unit needed them
        self._in_flight: list[_Unit] = []  # units whose gradient reduction was launched, oldest first
        self.peak = {"params": 0, "grads": 0}  # the most held at the end of a backward (stage 2: at each launch)
        # Measured on 2 CPU ranks: gloo's reduce-scatter of 10M floats takes ~2.5x its all-reduce
        # (which itself reduce-scatters and all-gathers). On gloo, stages 2-3 all-reduce the
        # transient full gradient and keep their slice: the memory held between steps is the same.
        if reduce_scatter is None:
            reduce_scatter = dist.get_backend(group) != "gloo"
        self._all_reduce_is_faster = not reduce_scatter

    @staticmethod
    def _groups(module: nn.Module, stage: int, units, materialize, bucket_mb: float | None):
        """(module, its trainable parameters) of each unit to be: stage 3's modules, or stages 1-2's
        buckets (the parameters in reverse order, as their gradients come, cut by size)."""
        if stage == 3:
            if units is None:
                units = [m for m in module.children() if any(p.requires_grad for p in m.parameters())]
            for m in units:
                if materialize is not None:
                    materialize(m)
                yield m, [p for p in m.parameters() if p.requires_grad]
            return
        if materialize is not None:
            materialize(module)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad][::-1]
        if not named:
            return
        cap = int(bucket_mb * 2**20) if bucket_mb else sum(p.numel() * p.element_size() for _, p in named)
        for bucket in cut_buckets(named, cap, cap):
            yield module, [p for _, p in bucket]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _before_forward(self, u: _Unit) -> None:
        """Stage 3: the unit whole before its forward; the next unit's gather launched. A new
        forward (the first unit's) frees a last unit kept whole for a backward that did not come
        first, so that no more units are whole than without keeping it."""
        if u.order is None:
            u.order = len(self._forward_order)
            self._forward_order.append(u)
        if u.order == 0:
            self._drop_kept()
        self._ready(u)
        if self.prefetch:
            self._prefetch(u.order + 1)

    def _ready(self, u: _Unit) -> bool:
        """Make ``u`` whole (waiting for its prefetch, or gathering now); False if it already was."""
        if u.gathering is not None:
            self.prefetched += 1
            u.finish_gather()
            return True
        if u.is_free():
            u.gather()
            return True
        return False

    def _prefetch(self, order: int) -> None:
        if 0 <= order < len(self._forward_order) and self._forward_order[order].is_free():
            self._forward_order[order].start_gather()

    def _after_forward(self, u: _Unit, out) -> None:
        """Stage 3: free the unit, and gather it again when the gradient of its output arrives
        (a hook on the output tensors themselves, which stay the tensors the module returned:
        a caller may hold on to them, as a pipeline stage does). The last unit of the forward
        order (known from the first backward on) stays whole when a backward may follow: its
        backward comes first, so it would be gathered again at once (one all-gather a pass saved)."""
        if not torch.is_grad_enabled():
            u.free_full()
            return
        if self.reshard_after_forward:  # (otherwise whole until its backward has reduced its gradients)
            if self._order_known and u.order == len(self._forward_order) - 1:
                self._kept = u
            else:
                u.free_full()
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, u=u: self._regather(u, prefetch=self.prefetch))

    def _regather(self, u: _Unit, prefetch: bool = False) -> None:
        """The first of its outputs' gradients (every rank alike): ``u`` whole again for its
        backward (or still whole: kept since its forward), and the unit before it in the forward
        order launched."""
        kept = self._kept is u
        if kept:
            self._kept = None
        if (self._ready(u) or kept) and prefetch and u.order is not None:
            self._prefetch(u.order - 1)

    def gather_for(self, params: list[nn.Parameter]) -> None:
        """Stage 3: gather the units holding ``params`` again, if freed (a zero-bubble pipeline's
        weight pass, which starts below the unit's output, where the hook is; every rank of the
        group runs the same passes). Each is freed again once its gradients are reduced."""
        if self.stage < 3:
            return
        for u in dict.fromkeys(self._slot[p][0] for p in params if p in self._slot):
            self._regather(u)

    def shard_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: this rank's slice of every unit."""
        return [u.shard for u in self.units]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """After each optimizer step, put the updated slices back into the whole parameters
        (stages 1-2); stage 3 frees, before a step, any unit still whole (a forward whose backward
        never came): it would hold the parameters of before the step."""
        if self.stage < 3:
            optimizer.register_step_post_hook(lambda *_: self.gather_params())
        else:
            optimizer.register_step_pre_hook(lambda *_: self.free_units())

    def free_units(self) -> None:
        """Stage 3: every unit's whole parameters freed (a gather in flight waited for first)."""
        self._kept = None
        for u in self.units:
            u.free_full()

    def gather_params(self) -> None:
        for u in self.units:
            u.gather()

    def loaded(self) -> None:
        """After a checkpoint was loaded into the slices: stages 1-2 gather the whole parameters,
        stage 3 drops any it held (they are gathered anew from the loaded slices when needed)."""
        if self.stage < 3:
            self.gather_params()
        else:
            self.free_units()

    def check_consistency(self) -> None:
        """Raise if the ranks' gathered parameters or buffers differ (stage 3: unit by unit, so
        that the whole model is never gathered at once)."""
        if self.stage < 3:
            check_consistency(self.module, self.group)
            return
        for u in self.units:
            u.gather()
            try:
                check_consistency(u.module, self.group)
            finally:
                u.free_full()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate full gradients locally (stages 1-2). Stage 3 keeps
        no full gradients: it reduces after every backward and adds up its slices instead."""
        if self.stage == 3:
            yield
            return
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # -- gradients ------------------------------------------------------------------------
    def _grad_ready(self, p: nn.Parameter) -> None:
        u, i = self._slot[p]
        if self.stage == 3 and self._all_reduce_is_faster:
            self._reduce_in_place(u, i, p)
            return
        if u.grad_full is None:  # stages 2-3 hold full gradients only while they are reduced
            u.grad_full = torch.zeros(u.full.numel(), dtype=u.full.dtype, device=u.full.device)  # [W*S]
        elif u.fresh:  # stage 1 keeps its buffer: start the new accumulation from zero
            u.grad_full.zero_()
        u.fresh = False
        offset = u.offsets[i]
        u.grad_full[offset : offset + p.numel()].add_(p.grad.reshape(-1))
        p.grad = None  # the flat buffer holds it now
        if not self._sync:
            return
        self._arm()
        u.pending -= 1
        if u.pending == 0:
            self._reduce(u)

    def _wire(self, grad: torch.Tensor) -> torch.Tensor:
        """What is sent of ``grad``: itself, or its copy in ``grad_dtype``."""
        return grad if self.grad_dtype in (None, grad.dtype) else grad.to(self.grad_dtype)

    def _reduce(self, u: _Unit) -> None:
        u.grad_full.div_(self.world)
        if u.codec is not None and u.codec.active:
            u.codec.launch(u.grad_full[: u.numel])  # the padding stays zero on every rank
            u.compressed = True
            self._launched(u)
            return
        sent = self._wire(u.grad_full)
        if self.stage == 1 or self._all_reduce_is_faster:
            u.wire = sent if sent is not u.grad_full else None
            u.work = dist.all_reduce(sent, group=self.group, async_op=True)
        else:
            u.reduced = torch.empty_like(u.shard, dtype=sent.dtype)  # cast back when settled
            u.work = reduce_scatter_flat(u.reduced, sent, self.group, async_op=True)
        if self.stage == 3:
            u.free_full()
        self._launched(u)

    def _reduce_in_place(self, u: _Unit, i: int, p: nn.Parameter) -> None:
        """Stage 3 by all-reduce: each gradient is reduced where autograd put it, with no flat
        copy (one whole unit's gradient less in memory); this rank's slice is taken when settled."""
        self._arm()
        grad, p.grad = p.grad.contiguous(), None
        grad = self._wire(grad.div_(self.world))
        u.param_grads.append((i, grad, dist.all_reduce(grad, group=self.group, async_op=True)))
        u.pending -= 1
        if u.pending == 0:
            u.free_full()
            self._launched(u)

    def _launched(self, u: _Unit) -> None:
        self._in_flight.append(u)
        if self.stage == 2:  # its buckets' whole gradients in flight are the most now, before one settles
            self._note_peak()
        if self.stage > 1:  # one reduction overlaps the next unit's backward; the one before is
            while len(self._in_flight) > 1:  # settled now, so that at most two units' full
                self._settle(self._in_flight.pop(0))  # gradients exist at any time

    def _settle(self, u: _Unit) -> None:
        """Wait for ``u``'s reduction and keep this rank's slice (stages 2-3 drop the rest)."""
        if u.param_grads:  # reduced in place, parameter by parameter
            if u.shard.grad is None:
                if u.grad_slice is None:
                    u.grad_slice = torch.empty_like(u.shard)
                u.shard.grad = u.grad_slice.zero_()
            start = self.rank * u.size
            for i, grad, work in u.param_grads:
                wait(work, "ZeRO gradient reduction", self.group)
                offset = u.offsets[i]
                a, b = max(start, offset), min(start + u.size, offset + grad.numel())
                if a < b:
                    u.shard.grad[a - start : b - start].add_(grad.reshape(-1)[a - offset : b - offset])
            u.param_grads = []
            return
        if u.compressed:
            u.codec.finish(u.grad_full[: u.numel])
            u.compressed = False
        else:
            wait(u.work, "ZeRO gradient reduction", self.group)
        if u.codec is not None:  # a reduction, compressed or not (compression starts after some)
            u.codec.steps += 1
        if u.wire is not None:  # reduced in bf16: back into the gradient's own dtype
            u.grad_full.copy_(u.wire)
            u.wire = None
        mine = u.grad_full[self.rank * u.size : (self.rank + 1) * u.size]
        if self.stage == 1:  # gradients stay replicated; the optimizer sees this rank's slice
            u.shard.grad = mine
        else:
            reduced = mine if self._all_reduce_is_faster else u.reduced
            if u.shard.grad is None:  # into the same memory every step: no allocation to churn
                if u.grad_slice is None:
                    u.grad_slice = torch.empty_like(u.shard)
                u.shard.grad = u.grad_slice.copy_(reduced)
            else:  # stage 3 over several micro-batches: the slices add up
                u.shard.grad.add_(reduced)
            u.grad_full, u.reduced = None, None
        u.work = None

    def _drop_kept(self) -> None:
        if self._kept is not None:
            self._kept.free_full()
            self._kept = None

    def _note_peak(self) -> None:
        now = self.memory()
        self.peak = {k: max(self.peak[k], now[k]) for k in self.peak}

    def _finish(self) -> None:
        self._armed, self._order_known = False, True
        self._note_peak()
        for u in self.units:
            if u.pending:
                raise PlaitError(f"rank {dist.get_rank()}: ZeRO: {u.pending} parameters got no gradient in this backward")
        for u in self._in_flight:  # every compressed unit's second round in flight at once
            if u.compressed:
                u.codec.exchange(u.grad_full[: u.numel])
        while self._in_flight:
            self._settle(self._in_flight.pop(0))
        for u in self.units:
            u.pending, u.fresh = len(u.params), True
            if u.gathering is not None:  # a prefetch whose unit did not run: its parameters would
                u.free_full()  # be stale after the optimizer step, so they are not kept
        self._drop_kept()  # nor a unit kept for a backward that did not reach it

    # -- export and accounting ------------------------------------------------------------
    @contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """The whole model, its parameters gathered for the duration (stage 3 frees them after)."""
        if self.stage == 3:
            self.gather_params()
        try:
            yield self.module
        finally:
            if self.stage == 3:
                self.free_units()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state, gathered (every rank gets it; rank 0 may save it)."""
        with self.gathered() as module:
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

    @property
    def codecs(self) -> list[tuple[Codec, list[nn.Parameter], list[int]]]:
        """Each compressed buffer: (its codec, the parameters whose gradients it holds, their offsets)."""
        return [(u.codec, u.params, u.offsets) for u in self.units if u.codec is not None]

    def memory(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Bytes this rank holds now in parameters, gradients and optimizer state."""
        def held(t):  # a view's own bytes; nothing for freed storage
            return 0 if t is None else min(t.untyped_storage().size(), t.numel() * t.element_size())

        params = sum(held(u.full) + (held(u.shard) if self.stage == 3 else 0) for u in self.units)
        grads = sum(held(u.grad_full) + (held(u.grad_slice) if self.stage > 1 else 0) for u in self.units)
        state = sum(held(v) for s in (optimizer.state.values() if optimizer else []) for v in s.values()
                    if torch.is_tensor(v) and v.numel() > 1)
        return {"params": params, "grads": grads, "optimizer": state}
