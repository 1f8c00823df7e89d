"""ZeRO stages 1-3: training equal to one process, and memory as the paper counts it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import plait
from plait.parallel.zero import Zero

from conftest import assert_close, make_trainer, train_example

OPTIMIZERS = {"sgd-momentum": ["train.optimizer=sgd", "train.momentum=0.9"],
              "adamw": ["train.optimizer=adamw", "train.lr=0.002", "train.weight_decay=0.01"]}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_zero_training_equals_one_process(world_name, stage, optimizer, request, solo, tmp_path):
    expected, expected_losses = train_example("digits_cnn", OPTIMIZERS[optimizer], str(tmp_path / "ref"))
    results = request.getfixturevalue(world_name).run(
        train_example, "digits_cnn", [*OPTIMIZERS[optimizer], f"parallel.zero={stage}"], str(tmp_path))
    adam = optimizer == "adamw"
    for rank, (params, _) in enumerate(results):
        # Adam turns the rounding noise of a near-zero gradient into a visible step on that one
        # element (plain data parallelism shows the same element off by the same amount), so for
        # AdamW "1e-5 relative" is measured on each tensor as a whole.
        assert_close(params, expected, what=f"rank {rank}: ", by_norm=adam)
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(expected_losses), rtol=1e-5, atol=1e-7)
    if adam:  # and element by element ZeRO follows plain data parallelism (the reductions' sum
        # orders differ beyond two ranks: the tolerance is 1e-5 of each tensor's largest magnitude)
        plain = request.getfixturevalue(world_name).run(train_example, "digits_cnn", OPTIMIZERS[optimizer],
                                                        str(tmp_path / "plain"))[0][0]
        assert_close(results[0][0], plain, what="zero vs plain dp: ", scaled=True)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_with_accumulation_and_clipping(world2, stage, solo, tmp_path):
    """And in 4 buckets (0.02 MiB: the CNN's fc1 weight alone, the layers after it, the convolutions
    but the first weight, that weight): the norm is summed over every bucket's slice."""
    options = ["train.grad_clip=0.05"]
    expected, _ = train_example("digits_cnn", options, str(tmp_path / "ref"))
    results = world2.run(train_example, "digits_cnn", [*options, f"parallel.zero={stage}", "train.accum_steps=2",
                                                       "parallel.bucket_mb=0.02"], str(tmp_path))
    for rank, (params, _) in enumerate(results):
        assert_close(params, expected, what=f"rank {rank}: ")


@pytest.mark.parametrize("prefetch", [True, False])
def test_zero3_with_accumulation(world2, solo, tmp_path, prefetch):
    """Stage 3 keeps no full gradients: it reduces after each accumulated batch and adds up its
    slices; with the next block's gather prefetched or not (``parallel.prefetch``)."""
    options = ["train.grad_clip=0.05"]
    expected, _ = train_example("digits_cnn", options, str(tmp_path / "ref"))
    overrides = [*options, "parallel.zero=3", "train.accum_steps=2", f"parallel.prefetch={str(prefetch).lower()}"]
    assert world2.run(zero_prefetching, overrides, str(tmp_path / "flag")) == [prefetch] * 2
    results = world2.run(train_example, "digits_cnn", overrides, str(tmp_path))
    for rank, (params, _) in enumerate(results):
        assert_close(params, expected, what=f"rank {rank}: ")


def zero_prefetching(overrides: list[str], out_dir: str) -> bool:
    """Whether the trainer's ZeRO wrapper prefetches, as the config says."""
    trainer = make_trainer("digits_cnn", overrides, out_dir)
    (wrapper,) = trainer.parallel.wrappers
    return wrapper.prefetch


def memory_per_rank(stage: int) -> tuple[dict, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    zero = Zero(model, stage=stage)
    opt = torch.optim.Adam(zero.shard_parameters(), lr=1e-3)
    zero.attach(opt)
    F.cross_entropy(zero(torch.randn(8, 64)), torch.randint(0, 10, (8,))).backward()
    opt.step()
    padded = sum(u.size * u.world for u in zero.units)
    return zero.memory(opt), padded


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_memory_follows_the_papers_formula(world_name, stage, request):
    """fp32 with Adam, bytes per parameter: params 4, grads 4, optimizer state 8; sharded by N
    from stage 1 (optimizer), 2 (and grads), 3 (and params)."""
    world = request.getfixturevalue(world_name)
    n = int(world_name[-1])
    for memory, padded in world.run(memory_per_rank, stage):
        expected = {"params": 4 / (n if stage == 3 else 1), "grads": 4 / (n if stage >= 2 else 1), "optimizer": 8 / n}
        for kind, per_param in expected.items():
            assert memory[kind] == per_param * padded, (kind, memory)


def sgd_train(module: nn.Module, params, steps: int, attach=lambda optimizer: None) -> None:
    """SGD with momentum on this rank's share of each step's batch of 8 (all of it in a world of
    one, or with no process group: the one-process reference)."""
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    attach(opt)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(module(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        opt.step()


def zero_grads_both_ways(stage: int, reduce_scatter: bool):
    """Two SGD steps on each rank's half of a batch; the whole model's parameters afterwards."""
    torch.manual_seed(0)
    zero = Zero(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), stage=stage, reduce_scatter=reduce_scatter)
    sgd_train(zero, zero.shard_parameters(), 2, zero.attach)
    return zero.full_state_dict()


@pytest.mark.parametrize("stage", [2, 3])
def test_reduce_scatter_and_all_reduce_paths_agree(world2, stage):
    """Gloo all-reduces by default (faster there); NCCL reduce-scatters: both must train alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    sgd_train(model, model.parameters(), 2)
    expected = {k: v.detach() for k, v in model.state_dict().items()}
    for reduce_scatter in (True, False):
        for rank, state in enumerate(world2.run(zero_grads_both_ways, stage, reduce_scatter)):
            assert_close(state, expected, what=f"reduce_scatter={reduce_scatter} rank {rank}: ")


def deeper() -> nn.Sequential:
    """Four layers (ZeRO-3: four units), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def zero_steps(stage: int, bucket_mb: float | None, prefetch: bool, steps: int = 3, reshard_after_forward: bool = True):
    """SGD with momentum on each rank's half of a batch: (whole model after ``steps``, units,
    prefetched gathers, the most units whole at once at any unit's forward or backward, all
    gathers)."""
    model = deeper()
    zero = Zero(model, stage=stage, bucket_mb=bucket_mb, prefetch=prefetch, reshard_after_forward=reshard_after_forward)
    whole = [0]

    def count(*_):
        whole[0] = max(whole[0], sum(u.full.untyped_storage().size() > 0 for u in zero.units))

    for m in model:  # after ZeRO's own hooks: at the start of each unit's forward and backward
        m.register_forward_pre_hook(count)
        m.register_forward_hook(lambda m, args, out: None if out.register_hook(count) else None)
    sgd_train(zero, zero.shard_parameters(), steps, zero.attach)
    gathers = sum(u.gathers for u in zero.units)
    return zero.full_state_dict(), len(zero.units), zero.prefetched, whole[0], gathers


def one_process_steps(steps: int = 3) -> dict:
    model = deeper()
    sgd_train(model, model.parameters(), steps)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2])
def test_buckets_train_like_one_process(world2, stage):
    """Stages 1-2 cut the parameters into buckets, each reduced as soon as its gradients are in,
    and padded on its own; training is unchanged."""
    expected = one_process_steps()
    for rank, (state, units, *_) in enumerate(world2.run(zero_steps, stage, 100 * 4 / 2**20, False)):
        assert units == 3, units  # at most 100 floats, backward order: 3+24+8+64, 8+64+8, 48
        assert_close(state, expected, what=f"stage {stage} rank {rank}: ")


def test_stage3_prefetches_the_next_unit(world2):
    """Each unit's gather is launched during the pass of the unit before it (forward) or after it
    (backward), from the second forward on (the first one learns the order); the last unit stays
    whole from its forward into its backward from the second step on; no more than two units are
    whole at once, and training is unchanged."""
    expected = one_process_steps()
    for rank, (state, units, prefetched, whole, gathers) in enumerate(world2.run(zero_steps, 3, None, True)):
        assert units == 4
        # forward: units-1 gathers in steps 2 and 3; backward: units-1 in each of the 3 steps
        assert prefetched == (2 + 3) * (units - 1), prefetched
        # every unit in each forward, and in each backward but the last unit's in steps 2 and 3
        assert gathers == 3 * 2 * units - 2, gathers
        assert whole == 2, whole  # this one and the next, never more
        assert_close(state, expected, what=f"rank {rank}: ")
    for state, _, prefetched, whole, gathers in world2.run(zero_steps, 3, None, False):
        assert prefetched == 0 and whole == 1 and gathers == 3 * 2 * 4 - 2, (prefetched, whole, gathers)
        assert_close(state, expected, what="no prefetch: ")


@pytest.mark.parametrize("prefetch", [True, False])
def test_stage3_keeps_units_whole_from_forward_to_backward(world2, prefetch):
    """``reshard_after_forward=False``: each unit is gathered for its forward only (prefetched
    from the second forward on, if asked), stays whole into its backward, which gathers nothing,
    and is freed once its gradients are reduced: all four units whole at the forward's end, none
    after a step; training is unchanged."""
    expected = one_process_steps()
    for rank, (state, units, prefetched, whole, gathers) in enumerate(
            world2.run(zero_steps, 3, None, prefetch, 3, False)):
        assert units == 4 and whole == units, (units, whole)
        assert gathers == 3 * units, gathers  # one per unit and step: its forward's
        assert prefetched == (2 * (units - 1) if prefetch else 0), prefetched
        assert_close(state, expected, what=f"rank {rank}: ")


def whole_units_at_a_step(reshard_after_forward: bool) -> list[int]:
    """Units whole when the optimizer steps after a forward whose backward never came (one
    step of SGD, then a forward whose loss is thrown away, then a step with the same gradients),
    none after it; and whether the next forward computes what one from freshly gathered
    parameters does."""
    model = deeper()
    zero = Zero(model, stage=3, reshard_after_forward=reshard_after_forward)
    opt = torch.optim.SGD(zero.shard_parameters(), lr=0.5)
    zero.attach(opt)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(dist.get_rank()))
    F.cross_entropy(zero(x), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    zero(x)  # a forward with gradients on, and no backward
    before = sum(not u.is_free() for u in zero.units)
    opt.step()  # the same gradients again: the parameters move
    after = sum(not u.is_free() for u in zero.units)
    with torch.no_grad():
        seen = zero(x)
        zero.free_units()
        fresh = zero(x)  # every unit gathered from the slices the step wrote
    return [before, after, int(torch.equal(seen, fresh))]


def test_stage3_frees_units_a_step_would_leave_stale(world2):
    """A unit kept whole after a forward whose backward never came holds the parameters of
    before the next step: the step frees it, so that the next forward gathers the new ones
    (fails when ``attach`` registers no such hook: the last forward sees the old parameters)."""
    for before, after, fresh in world2.run(whole_units_at_a_step, False):
        assert before == 4 and after == 0 and fresh == 1, (before, after, fresh)


def stage2_peak_gradients() -> tuple[int, dict, int]:
    """Four equal buckets (one 64 x 64 weight each), two steps: (buckets, peak bytes, padded elements)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)])
    zero = Zero(model, stage=2, bucket_mb=64 * 64 * 4 / 2**20)
    opt = torch.optim.SGD(zero.shard_parameters(), lr=0.1)
    zero.attach(opt)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(zero(torch.randn(8, 64)), torch.randint(0, 64, (8,))).backward()
        opt.step()
    return len(zero.units), zero.peak, sum(u.size * u.world for u in zero.units)


def test_stage2_holds_at_most_two_buckets_whole(world2):
    """While backward runs, a bucket's whole gradient lives from its first gradient until the next
    bucket launches: at most two at once, beside every bucket's slice (what the planner counts)."""
    for units, peak, padded in world2.run(stage2_peak_gradients):
        assert units == 4
        assert peak["grads"] == (2 * 64 * 64 + padded // 2) * 4, peak
