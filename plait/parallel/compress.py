"""Gradient compression with error feedback, for data parallel and ZeRO-1.

A ``Codec`` reduces one flat gradient buffer (a data-parallel bucket, or ZeRO-1's whole
gradient) over the dp group in fewer bytes than the all-reduce would. Each rank adds what it did
not send last time (its *residual*, error feedback) to its gradient before compressing, and keeps
what it does not send now, so nothing is lost, only delayed (Seide et al. 2014; Karimireddy et al.
2019). What comes back is the sum over ranks of what was sent, as the all-reduce's sum of
gradients already scaled by 1/dp, so the optimizer sees an estimate of the mean gradient.

``powersgd``  (Vogels et al. 2019; torch's ``powerSGD_hook``) each gradient matrix M (a tensor of
              2 or more dimensions, as [rows, -1]) of the sum is approximated by rank ``r`` factors:
              P = M Q, all-reduced and orthonormalised, Q = Mᵀ P, all-reduced, M ≈ P Qᵀ; Q is kept
              for the next step (warm start). Tensors that would not shrink at least twice (biases,
              norms, small matrices) go uncompressed, in the same all-reduce as the P factors. A
              rank's residual is its M minus its share (1/dp) of the approximation: the residuals
              plus the approximation add up to the sum of what the ranks had.
``topk``      each rank sends the ``ratio`` largest-magnitude elements of its buffer (indices and
              values, all-gathered) and keeps the rest as its residual: what it sent plus its
              residual is exactly what it had; the sum adds the ranks' sparse rows in rank order.

Both start after ``start`` steps of plain all-reduce (as torch's ``start_powerSGD_iter``: the
first steps move parameters the most). Residuals, Q factors and the step count are checkpointed
by parameter name (see ``plait.parallel.compose``), so they survive resume and a change of layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.distributed.comm import all_gather_flat, wait
from plait.errors import PlaitError

METHODS = ("none", "powersgd", "topk")


@dataclass(frozen=True)
class Compression:
    """What ``parallel.compress`` asks for."""

    method: str = "none"
    rank: int = 2
    """PowerSGD's approximation rank r."""
    ratio: float = 0.01
    """Top-k: the share of a buffer's elements each rank sends."""
    start: int = 10
    """Steps reduced uncompressed before compression starts."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise PlaitError(f"parallel.compress={self.method!r}: choose one of {', '.join(METHODS)}")

    @property
    def on(self) -> bool:
        return self.method != "none"


class Codec:
    """Compressed reduction of one flat gradient buffer in which tensors of ``shapes`` lie at
    ``offsets``; ``launch`` starts it, ``finish`` leaves in the buffer the sum over ranks of what
    was sent. ``steps``: reductions so far (compressed or not); ``active``: whether this one is
    compressed."""

    def __init__(self, spec: Compression, shapes: list[torch.Size], offsets: list[int], numel: int,
                 group: dist.ProcessGroup | None):
        self.spec, self.shapes, self.offsets, self.numel, self.group = spec, list(shapes), list(offsets), numel, group
        self.world = dist.get_world_size(group)
        self.steps = 0
        self.error: torch.Tensor | None = None  # this rank's residual, like the buffer; None: zero

    @property
    def active(self) -> bool:
        return self.steps >= self.spec.start

    def factors(self) -> dict[int, torch.Tensor]:
        """What a checkpoint keeps besides the residual, by the index of its tensor in the buffer:
        PowerSGD's Q (the tensors to load into before it has any)."""
        return {}

    def set_factors(self, factors: dict[int, torch.Tensor]) -> None:
        """Take what ``factors`` gave, as loaded from a checkpoint."""

    def _residual(self, flat: torch.Tensor) -> torch.Tensor:
        if self.error is None:
            self.error = torch.zeros_like(flat)
        return self.error

    def launch(self, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def exchange(self, flat: torch.Tensor) -> None:
        """A middle round, for codecs of two (``finish`` runs it if the caller did not): calling it
        on every launched buffer before finishing any overlaps each one's second reduction with
        the next one's work."""

    def finish(self, flat: torch.Tensor) -> None:
        raise NotImplementedError


class TopK(Codec):
    SAMPLE = 8192
    """Elements sampled to find a threshold that the k largest magnitudes clear."""

    def __init__(self, *args):
        super().__init__(*args)
        self.magnitude: torch.Tensor | None = None  # reused: a fresh buffer a step costs page faults
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def launch(self, flat: torch.Tensor) -> None:
        error = self._residual(flat)
        error.add_(flat)  # what this rank has: its gradient and what it held back before
        k = max(1, math.ceil(self.spec.ratio * error.numel()))
        if self.magnitude is None:
            self.magnitude = torch.empty_like(error)
        self.index = largest(torch.abs(error, out=self.magnitude), k, self.SAMPLE, self.gen)
        self.values = error[self.index]
        error[self.index] = 0  # the residual: all it had but what it sends (exactly)
        self.indices = self.index.new_empty(self.world * k)
        self.gathered = self.values.new_empty(self.world * k)
        self.works = [all_gather_flat(self.indices, self.index, self.group, async_op=True),
                      all_gather_flat(self.gathered, self.values, self.group, async_op=True)]

    def finish(self, flat: torch.Tensor) -> None:
        for work in self.works:
            wait(work, "top-k gradient all-gather", self.group)
        flat.zero_()
        for index, values in zip(self.indices.view(self.world, -1), self.gathered.view(self.world, -1)):
            flat.index_add_(0, index, values)  # in rank order: the same sum on every rank
        self.works = self.index = self.values = self.indices = self.gathered = None


def largest(values: torch.Tensor, k: int, sample: int, gen: torch.Generator) -> torch.Tensor:
    """The indices of the ``k`` largest of 1-d ``values``, as ``torch.topk`` finds them but 5-8x
    faster on CPUs for k of a percent of millions (its selection over the whole tensor: 229 ms
    for 13.4M here). A random sample's order statistic gives a threshold that, if the sample is
    typical, a little more than k values clear; the k largest are then taken among those. When
    fewer than k clear it (an untypical sample) the whole tensor is searched: the result is
    exact either way."""
    n = values.numel()
    if n <= 4 * sample or k * 4 > n:
        return torch.topk(values, k, sorted=False).indices
    return largest_above(values, k, values[torch.randint(0, n, (sample,), generator=gen).to(values.device)])


def largest_above(values: torch.Tensor, k: int, drawn: torch.Tensor) -> torch.Tensor:
    """``largest`` with the sample ``drawn`` of ``values`` given."""
    n, sample = values.numel(), drawn.numel()
    above = min(sample, math.ceil(1.5 * sample * k / n) + 8)  # ~1.5 k expected to clear
    threshold = torch.topk(drawn, above).values[-1]
    candidates = torch.nonzero(values >= threshold).squeeze(1)
    if candidates.numel() < k:
        return torch.topk(values, k, sorted=False).indices
    return candidates[torch.topk(values[candidates], k, sorted=False).indices]


class PowerSGD(Codec):
    def __init__(self, *args, seed: int = 0):
        super().__init__(*args)
        r = self.spec.rank
        self.matrices = []  # (index, offset, rows, cols) of the tensors compressed
        self.vectors = []  # (offset, numel) of those sent whole
        for i, (shape, offset) in enumerate(zip(self.shapes, self.offsets)):
            n = math.prod(shape)
            rows = shape[0] if len(shape) >= 2 else n
            cols = n // rows if rows else 0
            if len(shape) >= 2 and 2 * (rows + cols) * r <= n:
                self.matrices.append((i, offset, rows, cols))
            else:
                self.vectors.append((offset, n))
        self.q: dict[int, torch.Tensor] = {}  # Q transposed, [r, cols]: both products then read M row by row
        self.seed = seed
        self.work = None  # P's all-reduce, from launch to exchange

    def factors(self) -> dict[int, torch.Tensor]:
        return {i: self.q.get(i, torch.zeros(self.spec.rank, cols)) for i, _, _, cols in self.matrices}

    def set_factors(self, factors: dict[int, torch.Tensor]) -> None:
        self.q.update(factors)

    def _m(self, buf: torch.Tensor, offset: int, rows: int, cols: int) -> torch.Tensor:
        return buf[offset : offset + rows * cols].view(rows, cols)

    def _init_q(self, flat: torch.Tensor) -> None:
        # The same Q on every rank (a seeded generator), as the all-reduced P requires.
        gen = torch.Generator().manual_seed(self.seed)
        for i, _, _, cols in self.matrices:
            if i not in self.q:
                q = torch.randn(cols, self.spec.rank, generator=gen, dtype=torch.float32)
                self.q[i] = torch.linalg.qr(q).Q.t().contiguous().to(device=flat.device, dtype=flat.dtype)

    def launch(self, flat: torch.Tensor) -> None:
        error = self._residual(flat)
        error.add_(flat)  # M, what this rank has, in one pass; finish takes the approximation's share off
        self._init_q(flat)
        r = self.spec.rank
        sizes = [n for _, n in self.vectors] + [rows * r for _, _, rows, _ in self.matrices]
        self.wire = flat.new_empty(sum(sizes))
        parts = list(self.wire.split(sizes))
        for (offset, n), part in zip(self.vectors, parts):
            part.copy_(error[offset : offset + n])
        self.p = []
        for (i, offset, rows, cols), part in zip(self.matrices, parts[len(self.vectors):]):
            p = part.view(rows, r)
            torch.matmul(self._m(error, offset, rows, cols), self.q[i].t(), out=p)
            self.p.append(p)
        self.work = dist.all_reduce(self.wire, group=self.group, async_op=True)

    def exchange(self, flat: torch.Tensor) -> None:
        if self.work is None:  # exchanged already
            return
        wait(self.work, "PowerSGD all-reduce of P", self.group)
        self.work = None
        if not self.matrices:
            return
        r = self.spec.rank
        self.p = [torch.linalg.qr(p).Q for p in self.p]  # orthonormal columns, the same on every rank
        self.qs = flat.new_empty(sum(cols * r for *_, cols in self.matrices))
        self.q_new = [q.view(r, cols) for q, (*_, cols) in zip(self.qs.split([c * r for *_, c in self.matrices]), self.matrices)]
        for (i, offset, rows, cols), p, q in zip(self.matrices, self.p, self.q_new):
            torch.matmul(p.t(), self._m(self.error, offset, rows, cols), out=q)  # (Mᵀ P)ᵀ
        self.q_work = dist.all_reduce(self.qs, group=self.group, async_op=True)

    def finish(self, flat: torch.Tensor) -> None:
        self.exchange(flat)
        error, offset_v = self.error, 0
        for offset, n in self.vectors:  # sent whole: nothing held back
            flat[offset : offset + n].copy_(self.wire[offset_v : offset_v + n])
            error[offset : offset + n].zero_()
            offset_v += n
        if self.matrices:
            wait(self.q_work, "PowerSGD all-reduce of Q", self.group)
            for (i, offset, rows, cols), p, q in zip(self.matrices, self.p, self.q_new):
                self.q[i] = q.clone()  # its own storage: a checkpoint keeps it alone
                approx = _outer(p, q, self._m(flat, offset, rows, cols))  # the sum's approximation
                self._m(error, offset, rows, cols).sub_(approx, alpha=1.0 / self.world)
        self.wire = self.p = self.qs = self.q_new = self.q_work = None


def _outer(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = p q for p [rows, r] and q [r, cols]: for r up to 4 as r outer products, each
    one pass over ``out``; a matrix product of inner size r that small writes its output 2-3x
    slower on CPUs (2048 x 2048 at r = 2: 1.3 against 3.5 ms here), for larger r it is faster."""
    r = p.shape[1]
    if r > 4:
        return torch.matmul(p, q, out=out)
    torch.mul(p[:, :1], q[:1], out=out)
    for k in range(1, r):
        out.addcmul_(p[:, k : k + 1], q[k : k + 1])
    return out


CODECS = {"powersgd": PowerSGD, "topk": TopK}


def make_codec(spec: Compression | None, params: list[torch.Tensor], offsets: list[int], numel: int,
               group: dist.ProcessGroup | None) -> Codec | None:
    """The codec of a flat buffer holding ``params``' gradients at ``offsets``, or None (no
    compression asked for, or a dp group of one)."""
    if spec is None or not spec.on or dist.get_world_size(group) == 1:
        return None
    return CODECS[spec.method](spec, [p.shape for p in params], offsets, numel, group)
