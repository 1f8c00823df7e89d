"""Activation recomputation (``train.recompute``): the same training, bit for bit, in every layout,
with fewer activations kept for backward."""

from __future__ import annotations

import pytest
import torch

from conftest import make_trainer, train_example

GPT = ["model.args.tied=false"]  # ZeRO-3 gathers blocks one at a time: no weight tied across them

CASES = {
    # name: (world fixture, example, overrides)
    "dp2": ("world2", "gpt_tp", [*GPT, "parallel.tp=1"]),
    "zero3": ("world2", "gpt_tp", [*GPT, "parallel.tp=1", "parallel.zero=3"]),
    "tp2": ("world2", "gpt_tp", [*GPT, "parallel.tp=2"]),
    "pp2-gpipe-cnn": ("world2", "digits_cnn", ["parallel.pp=2", "pipeline.microbatches=2", "pipeline.schedule=gpipe"]),
    "pp2xtp2-1f1b": ("world4", "gpt_tp", [*GPT, "parallel.pp=2", "parallel.tp=2", "pipeline.microbatches=2"]),
    "zero3xpp2": ("world4", "gpt_tp", [*GPT, "parallel.tp=1", "parallel.pp=2", "parallel.zero=3",
                                      "pipeline.microbatches=2"]),
}


@pytest.mark.parametrize("case", CASES)
def test_recompute_trains_bit_for_bit_alike(case, request, tmp_path):
    """Recomputation runs the same operations on the same inputs again, so on CPU every saved
    tensor, gradient and update is the same bits: equality, not a tolerance."""
    world_name, example, overrides = CASES[case]
    world = request.getfixturevalue(world_name)
    kept, kept_losses = world.run(train_example, example, overrides, str(tmp_path / "kept"), 4)[0]
    again, again_losses = world.run(train_example, example, [*overrides, "train.recompute=true"],
                                    str(tmp_path / "again"), 4)[0]
    assert again_losses == kept_losses
    for name, value in kept.items():
        assert torch.equal(again[name], value), name


def saved_bytes(overrides: list[str]) -> int:
    """Bytes of the tensors autograd keeps for backward during one step's forward, on this rank."""
    trainer = make_trainer("gpt_tp", ["run.tensorboard=false", "parallel.tp=2", *GPT, *overrides],
                           "/tmp/plait-recompute-bytes", steps=1)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x, y = next(iter(trainer.loader))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.parallel.step(x, y)
    return total


def test_recompute_keeps_only_each_blocks_input(world2):
    """The GPT at tp=2: without recomputation a block keeps its attention scores and MLP
    activations (several times its input); with it, only its input (and autograd sees that once)."""
    kept = world2.run(saved_bytes, [])[0]
    again = world2.run(saved_bytes, ["train.recompute=true"])[0]
    assert again < 0.25 * kept, (again, kept)
