"""Replicated data parallel on torch.distributed collectives.

Gradients are averaged over the ``dp`` group by all-reduce in size-capped buckets. Each
parameter's gradient lives in a slice of its bucket's flat buffer (``param.grad`` is a view of
it), so a bucket needs no gather before it is sent. A hook on gradient accumulation counts the
bucket down; when it is full its all-reduce is launched asynchronously, in bucket order, while
autograd goes on computing earlier layers. A callback at the end of backward waits for the
buckets, so ``loss.backward()`` returns with averaged gradients, as with DDP.

``grad_dtype=torch.bfloat16`` sends gradients in bf16 (half the bytes): a bucket is cast into a
bf16 copy that goes on the wire; small buckets come back as every rank's bf16 row and are summed
in float32 in rank order (so only the transport rounds), large ones are all-reduced in bf16 (as
DDP's ``bf16_compress_hook`` does) and cast back. The parameters and the optimizer stay float32.

    model = DataParallel(model, group=mesh.group("dp"))
    with model.no_sync():            # accumulate locally, no communication
        loss_fn(model(x0), y0).backward()
    loss_fn(model(x1), y1).backward()  # all-reduces the accumulated gradients
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.comm import all_gather_flat, broadcast_tensors, wait
from plait.errors import PlaitError
from plait.parallel.backward import EndOfBackward
from plait.parallel.compress import Codec, Compression, make_codec
from plait.parallel.consistency import check_consistency


class _Bucket:
    """Parameters, in backward order, whose gradients share one flat buffer.

    A small bucket is summed by gathering every rank's buffer (``gathered``, [world * n]) and
    adding the rows in rank order: one round trip where the ring all-reduce needs several.
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        first = self.params[0]
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        self.views, self.offsets, offset = [], [], 0
        for p in self.params:
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            self.offsets.append(offset)
            offset += p.numel()
        self.ready = [False] * len(self.params)
        self.pending = len(self.params)
        self.work: dist.Work | None = None
        self.gathered: torch.Tensor | None = None
        self.wire: torch.Tensor | None = None  # what is sent, when it is not the buffer itself (bf16)
        self.codec: Codec | None = None  # compressed reduction (parallel.compress), if asked for
        self.compressed = False  # this step's reduction went through the codec

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def reset(self) -> None:
        self.ready = [False] * len(self.params)
        self.pending = len(self.params)
        self.work = None
        self.compressed = False


def cut_buckets(named: list[tuple[str, nn.Parameter]], cap_bytes: int, first_cap_bytes: int) -> list[list]:
    """Cut parameters (already in backward order) into buckets of one dtype and device, each at
    most ``cap_bytes`` (the first ``first_cap_bytes``) unless one parameter alone is larger."""
    buckets, current, size = [], [], 0
    for name, p in named:
        cap = first_cap_bytes if not buckets else cap_bytes
        kind_changes = current and (p.dtype, p.device) != (current[0][1].dtype, current[0][1].device)
        if current and (kind_changes or size + p.numel() * p.element_size() > cap):
            buckets.append(current)
            current, size = [], 0
        current.append((name, p))
        size += p.numel() * p.element_size()
    if current:
        buckets.append(current)
    return buckets


def _make_buckets(named: list[tuple[str, nn.Parameter]], cap_bytes: int, first_cap_bytes: int) -> list[_Bucket]:
    return [_Bucket(bucket) for bucket in cut_buckets(named, cap_bytes, first_cap_bytes)]


class DataParallel(EndOfBackward, nn.Module):
    """Replicate ``module`` over ``group`` and average its gradients during backward.

    Args:
        module: the model; its parameters and buffers are broadcast from the group's rank 0.
        group: the data-parallel process group (``mesh.group("dp")``); default the world.
        bucket_mb: size cap of a gradient bucket in MiB.
        first_bucket_mb: cap of the first bucket (the last layers), small so that
            communication starts early in backward.
        gather_max_kb: on gloo, buckets up to this size are summed by one all-gather and a
            local sum in rank order (one round trip; latency decides at these sizes); larger
            ones by the ring all-reduce (bandwidth decides). NCCL always uses all-reduce.
        allow_unused: let parameters get no gradient in a backward (their gradient counts as
            zero); otherwise that is an error naming them.
        compress: reduce each bucket compressed, with error feedback (``plait.parallel.compress``).
    """

    def __init__(
        self,
        module: nn.Module,
        group: dist.ProcessGroup | None = None,
        *,
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        gather_max_kb: float = 256.0,
        allow_unused: bool = False,
        grad_dtype: torch.dtype | None = None,
        compress: Compression | None = None,
    ):
        super().__init__()
        if not dist.is_initialized():
            raise PlaitError("DataParallel needs an initialised process group: call plait.init() first")
        self.module = module
        self.group = group
        self.world = dist.get_world_size(group)
        self.allow_unused = allow_unused
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise PlaitError("DataParallel: the module has no trainable parameters")
        self._buckets: list[_Bucket] = []
        self._slot: dict[nn.Parameter, tuple[_Bucket, int]] = {}
        self._sync = True
        if self.world == 1:
            return  # nothing to average: plain PyTorch training, no hooks
        broadcast_tensors(list(module.parameters()) + list(module.buffers()), 0, group)
        mib = 1024 * 1024
        self._buckets = _make_buckets(named[::-1], int(bucket_mb * mib), int(first_bucket_mb * mib))
        gather_max = gather_max_kb * 1024 if dist.get_backend(group) == "gloo" else -1
        for bucket in self._buckets:
            if grad_dtype is not None and grad_dtype != bucket.buffer.dtype:
                bucket.wire = bucket.buffer.to(grad_dtype)
            sent = bucket.buffer if bucket.wire is None else bucket.wire
            if bucket.nbytes <= gather_max:
                bucket.gathered = sent.new_empty(self.world * sent.numel())
            bucket.codec = make_codec(compress, bucket.params, bucket.offsets, bucket.buffer.numel(), group)
            for i, p in enumerate(bucket.params):
                self._slot[p] = (bucket, i)
                p.grad = bucket.views[i]
        for _, p in named:
            p.register_post_accumulate_grad_hook(self._grad_ready)
        self._armed = False  # the end-of-backward callback is queued for this backward
        self._next = 0  # index of the next bucket to launch; buckets launch in order on every rank

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally; the next one outside syncs them."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def check_consistency(self) -> None:
        """Raise if any replica's parameters or buffers differ from rank 0's (see consistency.py)."""
        check_consistency(self.module, self.group)

    # -- the interface it shares with Zero ----------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do after an optimizer step: every replica updates its whole model in place."""

    def loaded(self) -> None:
        """Nothing to do after a checkpoint was loaded into the parameters."""

    @contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """The whole model (it always is, here)."""
        yield self.module

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    @property
    def codecs(self) -> list[tuple[Codec, list[nn.Parameter], list[int]]]:
        """Each compressed buffer: (its codec, the parameters whose gradients it holds, their offsets)."""
        return [(b.codec, b.params, b.offsets) for b in self._buckets if b.codec is not None]

    # -- the gradient path ------------------------------------------------------------------
    def _grad_ready(self, p: nn.Parameter) -> None:
        if not self._sync:
            return
        self._arm()
        bucket, i = self._slot[p]
        self._adopt(bucket, i)
        if not bucket.ready[i]:
            bucket.ready[i] = True
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_ready()

    def _adopt(self, bucket: _Bucket, i: int) -> None:
        """Scale the gradient by 1/world into the bucket's view and make that its ``.grad``.

        After ``zero_grad(set_to_none=True)`` autograd hands over a fresh tensor: copying it in
        and scaling are one pass. The all-reduce then sums means into the global-batch mean.
        """
        p, view = bucket.params[i], bucket.views[i]
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            torch.mul(p.grad, 1.0 / self.world, out=view)
        else:
            view.mul_(1.0 / self.world)  # accumulated in place (no_sync, or zero_grad(set_to_none=False))
        p.grad = view

    def _launch_ready(self) -> None:
        while self._next < len(self._buckets) and self._buckets[self._next].pending == 0:
            bucket = self._buckets[self._next]
            self._next += 1
            if bucket.codec is not None and bucket.codec.active:
                bucket.codec.launch(bucket.buffer)
                bucket.compressed = True
                continue
            sent = bucket.buffer if bucket.wire is None else bucket.wire.copy_(bucket.buffer)
            if bucket.gathered is not None:
                bucket.work = all_gather_flat(bucket.gathered, sent, self.group, async_op=True)
            else:
                bucket.work = dist.all_reduce(sent, group=self.group, async_op=True)

    def _wait_launched(self) -> None:
        for bucket in self._buckets:  # every compressed bucket's second round in flight at once
            if bucket.compressed:
                bucket.codec.exchange(bucket.buffer)
        for k, bucket in enumerate(self._buckets):
            if bucket.compressed:
                bucket.codec.finish(bucket.buffer)
                bucket.compressed = False
            if bucket.work is not None:
                wait(bucket.work, f"gradient all-reduce (bucket {k + 1} of {len(self._buckets)})", self.group)
                bucket.work = None
                if bucket.gathered is None and bucket.wire is not None:
                    bucket.buffer.copy_(bucket.wire)
                elif bucket.gathered is not None:
                    # Row by row, in rank order: every element is ((g0 + g1) + g2) + ... on every
                    # rank, whatever the CPU's vector width, so replicas stay bitwise identical.
                    rows = bucket.gathered.view(self.world, -1)
                    bucket.buffer.copy_(rows[0])
                    for row in rows[1:]:
                        bucket.buffer.add_(row)

    def _finish(self) -> None:
        """End of backward: account for unused parameters, then wait for every bucket."""
        self._armed = False
        try:
            unused = [(b, i) for b in self._buckets for i, ready in enumerate(b.ready) if not ready]
            if unused and not self.allow_unused:
                self._wait_launched()  # keep ranks in step before failing
                names = ", ".join(b.names[i] for b, i in unused[:5])
                more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
                raise PlaitError(
                    f"rank {dist.get_rank()}: parameters got no gradient in this backward: {names}{more}; "
                    "if that is intended, set parallel.allow_unused = true (DataParallel(allow_unused=True))"
                )
            for b, i in unused:
                self._adopt(b, i)
                b.ready[i] = True
                b.pending -= 1
            self._launch_ready()
            self._wait_launched()
            for bucket in self._buckets:
                if bucket.codec is not None:
                    bucket.codec.steps += 1
        finally:
            for bucket in self._buckets:
                bucket.reset()
            self._next = 0
