"""Gradients reduced in bf16 (``parallel.grad_dtype = "bf16"``): what arrives is what the
arithmetic says, replicas agree bit for bit, and the seed CNN still learns the digits."""

from __future__ import annotations

import pytest
import torch

from conftest import EXAMPLES, train_summary

U = 2.0**-8  # bf16's unit roundoff: 8 significant bits, round to nearest


def local_and_reduced(model_name: str, stage: int, reduce_scatter: bool | None = None):
    """(every rank's own fp32 gradients, this rank's reduced ones) after one backward on rank-own
    data, with Plait's DataParallel (stage 0) or ZeRO ``stage``, reducing in bf16. ZeRO's are
    this rank's slice of the flat mean, as {unit index: tensor}."""
    import torch.distributed as dist
    import torch.nn.functional as F

    import plait
    from plait.distributed.comm import all_gather_flat
    from plait.models import DigitsCNN, mlp
    from plait.parallel.zero import Zero

    plait.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DigitsCNN() if model_name == "cnn" else mlp(784, 10, hidden=512, depth=2)
    gen = torch.Generator().manual_seed(rank)
    shape = (1, 28, 28) if model_name == "cnn" else (784,)
    x, y = torch.randn(16, *shape, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    F.cross_entropy(model(x), y).backward()
    mine = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    everyone = mine.new_empty(world * mine.numel())
    all_gather_flat(everyone, mine)
    for p in model.parameters():
        p.grad = None
    wrapped = plait.DataParallel(model, grad_dtype=torch.bfloat16) if stage == 0 \
        else Zero(model, stage=stage, grad_dtype=torch.bfloat16, reduce_scatter=reduce_scatter)
    F.cross_entropy(wrapped(x), y).backward()
    if stage == 0:
        return everyone.view(world, -1), torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # Each unit's flat buffer holds its parameters in its own order (stages 1-2: backward order):
    # every rank's gradients of them, in that order, beside this rank's reduced slice.
    everyone = everyone.view(world, -1)
    columns, offset = {}, 0
    for p in model.parameters():
        columns[p] = everyone[:, offset : offset + p.numel()]
        offset += p.numel()
    return everyone, [(u.rank * u.size, u.size, torch.cat([columns[p] for p in u.params], 1), u.shard.grad.clone())
                      for u in wrapped.units]


def test_small_buckets_are_summed_in_float32_after_a_bf16_transport(world2):
    """The CNN's gradients fill one bucket under gloo's gather limit: every rank's bf16 row comes
    back and rows are added in float32 in rank order, so the result is exactly
    sum_r fp32(bf16(g_r / W)), on every rank."""
    results = world2.run(local_and_reduced, "cnn", 0)
    local, _ = results[0]
    expected = torch.zeros_like(local[0])
    for row in local:
        expected += torch.mul(row, 1.0 / len(local)).to(torch.bfloat16).float()
    for _, reduced in results:
        assert torch.equal(reduced, expected)


def _assert_within_bf16_bound(reduced: torch.Tensor, local: torch.Tensor) -> None:
    """Each rank's g_r / W is rounded to bf16 (|error| <= U |g_r / W|) and gloo adds the two in
    bf16, rounding once more (<= U |sum|): |reduced - mean| <= 2 U (|g_0| + |g_1|) / W, with a hair
    for the second-order term."""
    mean = local.mean(0)
    bound = 2 * U * local.abs().sum(0) / len(local) * 1.01 + 1e-30
    error = (reduced - mean).abs()
    assert (error <= bound).all(), f"worst element: error {error.max():.3e}"
    assert (reduced != mean).any(), "nothing was rounded: the bf16 transport did not happen"


def test_large_buckets_are_all_reduced_in_bf16_within_its_rounding(world2):
    results = world2.run(local_and_reduced, "mlp", 0)
    local, reduced = results[0]
    _assert_within_bf16_bound(reduced, local)
    assert torch.equal(results[1][1], reduced)  # replicas stay bit for bit alike


@pytest.mark.parametrize("stage, reduce_scatter", [(1, None), (2, None), (3, None), (2, True), (3, True)],
                         ids=["1", "2", "3", "2-reduce-scatter", "3-reduce-scatter"])
def test_zero_reduces_in_bf16_within_its_rounding(world2, stage, reduce_scatter):
    """ZeRO's paths (on gloo by default, stage 1 and 2: the flat gradient all-reduced; stage 3:
    each gradient in place, per unit; and the reduce-scatter NCCL takes, forced here): this
    rank's slice of the mean within bf16's rounding."""
    for rank, (_, slices) in enumerate(world2.run(local_and_reduced, "mlp", stage, reduce_scatter)):
        for start, size, unit, grad in slices:  # unit: its flat gradients, every rank
            unit = torch.nn.functional.pad(unit, (0, size * 2 - unit.shape[1]))
            _assert_within_bf16_bound(grad, unit[:, start : start + size])


def test_the_digits_still_train_with_bf16_gradients(world2, tmp_path):
    summary = world2.run(train_summary, "digits_cnn", ["parallel.grad_dtype=bf16"], str(tmp_path), 400, 100)[0][0]
    assert summary["test_accuracy"] >= 0.95, summary["test_accuracy"]


def test_refused_with_the_parameter_server_and_unknown_dtypes():
    from plait.errors import ConfigError
    from plait.train.config import load_config

    with pytest.raises(ConfigError, match="parallel.grad_dtype: 'fp16' is not one of fp32, bf16"):
        load_config(EXAMPLES / "digits_cnn.toml", ["parallel.grad_dtype=fp16"])
    with pytest.raises(ConfigError, match="parallel.grad_dtype: not available with parallel.strategy = 'ps'"):
        load_config(EXAMPLES / "linreg.toml", ["parallel.strategy=ps", "parallel.grad_dtype=bf16"])
