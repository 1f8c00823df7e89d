"""Gradient compression with error feedback (``parallel.compress``): what is sent plus what is
held back is what the ranks had, replicas agree bit for bit, its state resumes and reshards by
name, the digits still train, and bad settings are refused in one line."""

from __future__ import annotations


import math

import pytest
import torch

from conftest import EXAMPLES, make_trainer, train_summary

EPS = 2.0**-24  # float32's unit roundoff
SHAPES = [(48, 40), (40,), (16, 4, 3, 3), (7, 5), (3,)]  # a linear, its bias, a conv, a small matrix, a norm
SIZES = [math.prod(s) for s in SHAPES]
OFFSETS = [sum(SIZES[:i]) for i in range(len(SHAPES))]  # where each lies in the flat buffer


def one_reduction(method: str, rank_r: int, low_rank: bool) -> dict:
    """One compressed reduction of a flat buffer of SHAPES on this rank, with a residual from
    before: what the rank had (gradient + residual), its new residual, and what came back."""
    import torch.distributed as dist

    import plait
    from plait.parallel.compress import Compression, make_codec

    plait.init()
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1 + rank)
    parts = []
    for shape, n in zip(SHAPES, SIZES):
        if low_rank and len(shape) >= 2:  # a batch-of-one linear gradient: an outer product, rank 1
            parts.append((torch.randn(shape[0], 1, generator=gen) @ torch.randn(1, math.prod(shape[1:]), generator=gen)).reshape(-1))
        else:
            parts.append(torch.randn(n, generator=gen))
    flat = torch.cat(parts)
    params = [torch.empty(s) for s in SHAPES]
    codec = make_codec(Compression(method, rank=rank_r, ratio=0.1, start=0), params, OFFSETS, flat.numel(), None)
    if not low_rank:
        codec.error = torch.randn(flat.numel(), generator=gen) * 0.1  # held back by an earlier step
    had = flat + (codec.error if codec.error is not None else 0)
    codec.launch(flat)
    codec.finish(flat)
    return {"had": had, "residual": codec.error.clone(), "sum": flat.clone(),
            "compressed": [i for i, *_ in getattr(codec, "matrices", [])]}


def test_top_k_sends_plus_holds_back_exactly_what_each_rank_had(world2):
    """Each rank's residual is what it had except at the k elements it sent (there: zero), and
    the sum is the two ranks' sent elements added: exactly, in float32 (two addends per element,
    each an exact copy)."""
    results = world2.run(one_reduction, "topk", 1, False)
    n = results[0]["had"].numel()
    sent = []
    for r in results:
        kept = r["residual"] != 0
        assert int((~kept).sum()) == -(-n // 10)  # ratio 0.1: k elements sent
        assert torch.equal(r["residual"][kept], r["had"][kept])
        sent.append(torch.where(kept, torch.zeros_like(r["had"]), r["had"]))
        # the largest magnitudes went: none held back is larger than any sent
        assert r["residual"].abs().max() <= r["had"][~kept].abs().min()
    assert torch.equal(results[0]["sum"], sent[0] + sent[1])
    assert torch.equal(results[1]["sum"], results[0]["sum"])


@pytest.mark.parametrize("rank_r", [2, 5], ids=["r2-outer-products", "r5-matmul"])
def test_power_sgd_approximation_plus_residuals_is_the_sum(rank_r, world2):
    """PowerSGD: the residuals plus the approximation add up to what the ranks had. Each residual
    is M_r - A/2, one subtraction rounding (<= EPS |residual|) after a halving (exact); adding
    the two residuals and A rounds twice more: |sum of residuals + A - sum of M| <= 4 EPS
    (|M_0| + |M_1| + |A|) elementwise. Tensors that do not shrink go whole (residual zero, the
    sum exact), and the result is the same on both ranks. r = 2 forms the approximation as outer
    products, r = 5 as a matrix product."""
    results = world2.run(one_reduction, "powersgd", rank_r, False)
    a, b = results
    assert a["compressed"] == [0, 2]  # the linear and the conv; the biases and the 7x5 matrix go whole
    assert torch.equal(a["sum"], b["sum"])
    total = a["had"] + b["had"]
    bound = 4 * EPS * (a["had"].abs() + b["had"].abs() + a["sum"].abs())
    assert ((a["residual"] + b["residual"] + a["sum"] - total).abs() <= bound).all()
    whole = torch.zeros_like(total, dtype=torch.bool)
    for i in (1, 3, 4):
        whole[OFFSETS[i] : OFFSETS[i] + SIZES[i]] = True
    assert torch.equal(a["sum"][whole], total[whole]) and not a["residual"][whole].any()
    assert (a["residual"][~whole].abs() > 0).any()  # full-rank matrices: something is held back


def test_power_sgd_is_exact_on_gradients_of_rank_at_most_r(world2):
    """Each rank's matrices are rank 1, so their sum is rank 2: with r = 2 the projection onto
    span(P) reproduces it, within the rounding of two matrix products of inner size <= 80
    (each <= 80 EPS times the sum of the products' magnitudes); a wrong orthonormalisation or
    factor order leaves an O(1) error."""
    a, b = world2.run(one_reduction, "powersgd", 2, True)
    total = a["had"] + b["had"]
    scale = total.abs().max()
    assert (a["sum"] - total).abs().max() <= 200 * EPS * 80 * scale


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.parallel.unsplit_parameters().items()}


def resumed_equals_uninterrupted(example: str, overrides: list[str], out_dir: str) -> tuple:
    """6 steps in one go, and 3 + (checkpoint, a fresh trainer resuming) 3: both runs' parameters."""
    whole = make_trainer(example, overrides, f"{out_dir}/whole", steps=6)
    whole.fit()
    ck = [f"checkpoint.dir={out_dir}/ck", "checkpoint.every=3"]
    make_trainer(example, [*overrides, *ck], f"{out_dir}/first", steps=3).fit()
    second = make_trainer(example, [*overrides, *ck, "checkpoint.resume=latest"], f"{out_dir}/second", steps=6)
    second.fit()
    return _params(whole), _params(second)


SMALL_CNN = ["train.batch_size=32", "train.eval_every=0", "run.tensorboard=false", "parallel.compress_start=1"]


@pytest.mark.parametrize("method, zero", [("powersgd", 0), ("topk", 1)], ids=["powersgd", "topk-zero1"])
def test_compressed_training_resumes_where_it_stopped(method, zero, world2, tmp_path):
    """Residuals, Q and the step count come back from the checkpoint: a run stopped and resumed
    at step 3 ends bit for bit where the uninterrupted one does (without them it would not: the
    residual of step 3 goes into step 4's gradient)."""
    overrides = [*SMALL_CNN, f"parallel.compress={method}", f"parallel.zero={zero}"]
    for whole, resumed in world2.run(resumed_equals_uninterrupted, "digits_cnn", overrides, str(tmp_path)):
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), name


def residual_sums(overrides_a: list[str], overrides_b: list[str], out_dir: str) -> tuple:
    """Train 3 steps under layout A with a checkpoint; load it under layout B: the sum over dp
    ranks of the residual, by parameter name, as A had it and as B has it after loading."""
    import torch.distributed as dist

    def summed(trainer) -> dict[str, torch.Tensor]:
        mine: dict[str, torch.Tensor] = {}
        p = trainer.parallel
        for codec, params, offsets in p.codecs:
            for param, offset in zip(params, offsets):
                mine[p._names[id(param)]] = codec.error[offset : offset + param.numel()].clone()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        out: dict[str, torch.Tensor] = {}
        for part in everyone:  # every stage's dp ranks (tp is off here)
            for name, t in part.items():
                out[name] = out[name] + t if name in out else t
        return out

    ck = [f"checkpoint.dir={out_dir}/ck", "checkpoint.every=3"]
    a = make_trainer("digits_cnn", [*overrides_a, *ck], f"{out_dir}/a", steps=3)
    a.fit()
    before = summed(a)
    b = make_trainer("digits_cnn", [*overrides_b, *ck, "checkpoint.resume=latest"], f"{out_dir}/b", steps=3)
    b.fit()  # at step 3 already: loads and stops
    return before, summed(b), b.parallel.codecs[0][0].steps


def test_residuals_reshard_to_another_dp_degree(world4, tmp_path):
    """Saved under dp=4, loaded under dp=2 x pp=2: each of the 2 dp ranks of a stage takes half
    the 4 saved residuals' sum, so what is owed to the mean gradient is kept (to the rounding of
    adding 4 and halving: 4 EPS of the sum of magnitudes)."""
    a = [*SMALL_CNN, "parallel.compress=topk"]
    b = [*a, "parallel.pp=2", "pipeline.microbatches=2"]
    before, after, steps = world4.run(residual_sums, a, b, str(tmp_path))[0]
    assert steps == 3
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=4 * EPS * before[name].abs().max().item() + 1e-30)
    assert any(t.abs().sum() > 0 for t in before.values())


def test_the_digits_still_train_with_compression(world2, tmp_path):
    """PowerSGD (rank 2) from step 10, and top-k at 1%, on the seed CNN: 0.95 test accuracy as
    without compression."""
    for method in ("powersgd", "topk"):
        summary = world2.run(train_summary, "digits_cnn", [f"parallel.compress={method}"], str(tmp_path / method),
                             400, 100)[0][0]
        assert summary["test_accuracy"] >= 0.95, (method, summary["test_accuracy"])


@pytest.mark.parametrize("sets, message", [
    (["parallel.compress=gzip"], "parallel.compress: 'gzip' is not one of none, powersgd, topk"),
    (["parallel.compress=topk", "parallel.zero=2"], "parallel.compress: 'topk' serves plain data parallel and ZeRO-1"),
    (["parallel.compress=powersgd", "parallel.grad_dtype=bf16"], "both shrink the reduction; choose one"),
    (["parallel.compress=topk", "parallel.compress_ratio=0"], "parallel.compress_ratio: must be in (0, 1]"),
    (["parallel.compress=powersgd", "parallel.compress_rank=0"], "parallel.compress_rank: must be >= 1"),
])
def test_bad_settings_are_refused_in_one_line(sets, message):
    from plait.errors import ConfigError
    from plait.train.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLES / "digits_cnn.toml", sets)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_refused_with_the_parameter_server():
    from plait.errors import ConfigError
    from plait.train.config import load_config

    with pytest.raises(ConfigError, match="parallel.compress: not available with parallel.strategy = 'ps'"):
        load_config(EXAMPLES / "linreg.toml", ["parallel.strategy=ps", "parallel.compress=topk"])


def test_the_k_largest_are_found_as_topk_finds_them():
    """The sampled threshold is a shortcut, never an approximation: the values selected are
    exactly ``torch.topk``'s, on a typical sample and on one drawn from the largest values only
    (its threshold then clears fewer than k, and the whole tensor is searched)."""
    from plait.parallel.compress import largest, largest_above

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(200_000, generator=gen).abs()
    k = 2_000
    expected = torch.topk(values, k).values
    found = largest(values, k, 8192, torch.Generator().manual_seed(1))
    assert found.unique().numel() == k
    assert torch.equal(values[found].sort(descending=True).values, expected)
    biased = expected[:500]  # a sample of the largest only: its threshold lies above the k-th
    found = largest_above(values, k, biased)
    assert torch.equal(values[found].sort(descending=True).values, expected)
    ties = torch.zeros(200_000)  # all equal: every value clears the threshold
    assert largest(ties, k, 8192, torch.Generator().manual_seed(1)).unique().numel() == k
