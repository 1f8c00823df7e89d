"""Tensor parallelism: every layer, and the whole GPT, equal to the unsplit model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import plait
from plait.models import GPT
from plait.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, parallelize,
                                   vocab_parallel_cross_entropy)
from plait.parallel.tensor.comm import gather_from

from conftest import assert_close, train_example


def _slice_of(full: torch.Tensor, shard: torch.Tensor, rank: int, world: int, name: str = "") -> torch.Tensor:
    """The part of ``full`` that ``shard`` holds: split along the one dimension where they differ
    (a fused q/k/v projection: this rank's slice of each of its three parts)."""
    if full.shape == shard.shape:
        return full
    dim = next(d for d in range(full.dim()) if full.shape[d] != shard.shape[d])
    parts = full.chunk(3, dim=dim) if ".qkv." in name else (full,)
    return torch.cat([part.chunk(world, dim=dim)[rank] for part in parts], dim=dim)


def layer_grads():
    """Each layer and the loss against its unsplit twin: outputs, input grads, weight grads."""
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    linear, row, emb = nn.Linear(8, 12), nn.Linear(8, 3), nn.Embedding(16, 8)
    x = torch.randn(5, 8, requires_grad=True)
    ids = torch.randint(0, 16, (5,))
    target = torch.randint(0, 16, (5,))
    results = {}
    for name, parallel, full, inp in [
        ("colwise", ColumnParallelLinear.from_module(linear, group, gather_output=True), linear, x),
        ("rowwise", RowParallelLinear.from_module(row, group, input_is_parallel=False), row, x),
        ("vocab", VocabParallelEmbedding.from_module(emb, group), emb, ids),
    ]:  # from_module copies its slice: the unsplit layer stays as it was
        for module in (parallel, full):
            module.zero_grad()
        xs = [inp.detach().clone().requires_grad_(inp.is_floating_point()) for _ in range(2)]
        out_p, out_f = parallel(xs[0]), full(xs[1])
        (out_p * torch.arange(out_p.numel()).view_as(out_p)).sum().backward()
        (out_f * torch.arange(out_f.numel()).view_as(out_f)).sum().backward()
        results[name] = {"out": (out_p.detach(), out_f.detach()),
                         "weight.grad": (parallel.weight.grad, _slice_of(full.weight.grad, parallel.weight.grad, rank, world))}
        if inp.is_floating_point():
            results[name]["input.grad"] = (xs[0].grad, xs[1].grad)
    logits = torch.randn(5, 16, requires_grad=True)
    shard = logits.detach().chunk(world, dim=-1)[rank].clone().requires_grad_()
    vocab_parallel_cross_entropy(shard, target, group).backward()
    F.cross_entropy(logits, target).backward()
    loss_p, loss_f = vocab_parallel_cross_entropy(shard.detach(), target, group), F.cross_entropy(logits.detach(), target)
    results["cross_entropy"] = {"loss": (loss_p, loss_f), "logits.grad": (shard.grad, logits.grad.chunk(world, -1)[rank])}
    return results


@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_each_layer_equals_its_unsplit_twin(world_name, request):
    for rank, results in enumerate(request.getfixturevalue(world_name).run(layer_grads)):
        for layer, pairs in results.items():
            got = {k: v[0] for k, v in pairs.items()}
            assert_close(got, {k: v[1] for k, v in pairs.items()}, what=f"rank {rank} {layer} ", scaled=True)


def gpt_grads(tied: bool):
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    full = GPT(vocab_size=32, block_size=8, layers=2, heads=4, dim=32, tied=tied)
    torch.manual_seed(0)
    split = parallelize(GPT(vocab_size=32, block_size=8, layers=2, heads=4, dim=32, tied=tied), GPT.tp_plan(), group)
    gen = torch.Generator().manual_seed(1)
    ids, target = torch.randint(0, 32, (3, 8), generator=gen), torch.randint(0, 32, (3, 8), generator=gen)
    logits_f = full(ids)
    loss_f = F.cross_entropy(logits_f.flatten(0, 1), target.flatten())
    loss_f.backward()
    logits_p = split(ids)
    loss_p = vocab_parallel_cross_entropy(logits_p.flatten(0, 1), target.flatten(), group)
    loss_p.backward()
    full_grads = dict(full.named_parameters())
    grads = {n: (p.grad, _slice_of(full_grads[n].grad, p.grad, rank, world, n)) for n, p in split.named_parameters()}
    assert len(grads) == len(list(full.parameters())), "every parameter, shared ones once"
    return gather_from(logits_p.detach(), group), logits_f.detach(), loss_p.detach(), loss_f.detach(), grads


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_gpt_logits_loss_and_gradients_equal_the_unsplit_model(world_name, tied, request):
    for rank, (logits_p, logits_f, loss_p, loss_f, grads) in enumerate(request.getfixturevalue(world_name).run(gpt_grads, tied)):
        assert_close({"logits": logits_p, "loss": loss_p}, {"logits": logits_f, "loss": loss_f}, scaled=True)
        assert_close({n: g[0] for n, g in grads.items()}, {n: g[1] for n, g in grads.items()}, what=f"rank {rank} ",
                     scaled=True)


# SGD, not the shipped AdamW: the key bias's gradient is zero in theory (softmax ignores a shift
# shared by all keys), so it is rounding noise, which Adam normalises into lr-sized steps.
GPT_RUN = ["data.args.max_chars=6000", "data.args.block_size=16", "model.args.dim=32", "train.batch_size=8",
           "train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9"]


@pytest.mark.parametrize("world_name, tp", [("world2", 2), ("world4", 4), ("world4", 2)],
                         ids=["tp2", "tp4", "dp2xtp2"])
def test_gpt_training_equals_one_process(world_name, tp, request, solo, tmp_path):
    expected, expected_losses = train_example("gpt_tp", GPT_RUN, str(tmp_path / "ref"), 4)
    results = request.getfixturevalue(world_name).run(train_example, "gpt_tp", [*GPT_RUN, f"parallel.tp={tp}"],
                                                      str(tmp_path), 4)
    for rank, (params, _) in enumerate(results):
        assert_close(params, expected, what=f"rank {rank}: ", scaled=True)
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(expected_losses), rtol=1e-5, atol=1e-6)


def lm_learns(out_dir: str):
    from conftest import EXAMPLES
    from plait.train.config import load_config
    from plait.train.trainer import Trainer

    cfg = load_config(EXAMPLES / "gpt_tp.toml", ["parallel.tp=2", "data.args.max_chars=20000", "train.steps=60",
                                                 "run.log_every=1", "run.progress=false", f"run.out_dir={out_dir}"])
    trainer = Trainer(cfg, plait.init())
    summary = trainer.fit()
    return summary["final_loss"], summary["unigram_entropy"]


def test_language_model_learns_below_unigram_entropy(world2, tmp_path):
    loss, entropy = world2.run(lm_learns, str(tmp_path))[0]
    assert loss < entropy - 0.5, (loss, entropy)


def bad_split(kind: str):
    group = dist.group.WORLD
    torch.manual_seed(0)
    try:
        if kind == "hidden":
            parallelize(nn.Sequential(nn.Linear(4, 7)), {"0": "colwise"}, group)
        elif kind == "heads":
            parallelize(GPT(vocab_size=16, block_size=4, heads=3, dim=24), GPT.tp_plan(), group)
        elif kind == "vocab":
            parallelize(GPT(vocab_size=15, block_size=4, heads=2, dim=8), GPT.tp_plan(), group)
        else:
            parallelize(GPT(vocab_size=16, block_size=4, heads=2, dim=8), {"blocks.*.ffn": "colwise"}, group)
    except plait.PlaitError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("kind, message", [
    ("hidden", "tensor parallel: 0: output features 7 is not divisible by tp=2"),
    ("heads", "tensor parallel: blocks.0.attn: 3 attention heads are not divisible by tp=2"),
    ("vocab", "tensor parallel: tok_emb: vocabulary 15 is not divisible by tp=2"),
    ("pattern", "tensor parallel plan: pattern 'blocks.*.ffn' matches no module of GPT"),
])
def test_bad_splits_name_the_module(world2, kind, message):
    assert world2.run(bad_split, kind) == [message, message]
