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
    "zero3-kept": ("world2", "gpt_tp", [*GPT, "parallel.tp=1", "parallel.zero=3",
                                       "parallel.reshard_after_forward=false"]),
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
    activations (several times its input); with it, none inside the block (recomputation keeps its
    input itself, beside autograd)."""
    kept = world2.run(saved_bytes, [])[0]
    again = world2.run(saved_bytes, ["train.recompute=true"])[0]
    assert again < 0.25 * kept, (again, kept)


def _blocks_and_grads(recompute: bool, split: bool, bf16: bool):
    """Two blocks (two linears each, dropout between) forward and backward on one batch, as one
    backward or a zero-bubble stage's input and weight passes, the forward under bf16 autocast
    or not: (each block's forward calls, the input's and every parameter's gradient)."""
    from torch import nn

    from plait.parallel.pipeline.split import backward_input
    from plait.parallel.recompute import recompute_blocks

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 8)) for _ in range(2)]
    calls = [0, 0]
    for k, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
        inner = block.forward
        block.forward = lambda *a, k=k, inner=inner: (calls.__setitem__(k, calls[k] + 1), inner(*a))[1]
    if recompute:
        recompute_blocks([(str(k), b) for k, b in enumerate(blocks)])
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = blocks[1](blocks[0](x)).float()
    params = [p for b in blocks for p in b.parameters()]
    if split:
        (gx,), weights = backward_input((y,), (torch.ones_like(y),), (x,), params)
        weights.backward()
    else:
        y.sum().backward()
        gx = x.grad
    return calls, [gx, *(p.grad for p in params)]


@pytest.mark.parametrize("bf16", [False, True])
def test_a_zero_bubble_pass_recomputes_each_block_once(bf16):
    """The weight pass makes one autograd call per group of parameters (here four, one per
    linear) but recomputes each block once for all of them; the input pass once more; what
    recomputation replays (dropout's random numbers, autocast) gives the gradients of the
    forward that ran, bit for bit."""
    plain_calls, plain = _blocks_and_grads(recompute=False, split=False, bf16=bf16)
    assert [c // 2 for c in plain_calls] == [1, 1]  # the pre-hook and the forward: 2 per run
    for split, runs in ((False, 2), (True, 3)):  # the forward, then once per backward pass
        calls, grads = _blocks_and_grads(recompute=True, split=split, bf16=bf16)
        assert calls == [1 + runs, 1 + runs], (split, calls)  # the hook runs once: it is outside
        for got, want in zip(grads, plain):
            assert torch.equal(got, want)


def test_a_forward_that_changes_when_recomputed_is_one_clear_error():
    """A block whose forward saves other tensors the second time (another shape, dtype or
    number: what can be checked without the values) cannot be recomputed: the backward stops
    with what differs, instead of using the wrong tensors."""
    from torch import nn

    from plait.errors import PlaitError
    from plait.parallel.recompute import recompute_blocks

    class Fickle(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.runs = nn.Linear(4, 4), 0

        def forward(self, x):
            self.runs += 1
            return self.linear(x if self.runs == 1 else x * x).tanh()

    block = Fickle()
    recompute_blocks([("fickle", block)])
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(PlaitError, match="recomputed forward saved a tensor its forward did not"):
        block(x).sum().backward()
