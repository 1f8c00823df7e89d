"""Data parallel on real gloo worlds: every layout must train exactly like one process."""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import plait

from conftest import STEPS, assert_close, train_example, train_until_error


@functools.cache
def reference(example: str, options: tuple[str, ...] = ()):
    return train_example(example, list(options), tempfile.mkdtemp())


@pytest.mark.parametrize("accum", [1, 2], ids=["plain", "no_sync-accum2"])
@pytest.mark.parametrize("example", ["linreg", "digits_cnn"])
@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_training_equals_one_process(world_name, example, accum, request, solo, tmp_path):
    world = request.getfixturevalue(world_name)
    check_against_reference(world, example, [f"train.accum_steps={accum}"], (), tmp_path)


@pytest.mark.parametrize("options, rtol", [
    (("train.grad_clip=0.05",), 1e-5),
    # bf16 autocast rounds activations to 8 bits of mantissa: the two runs agree to bf16 precision.
    (("train.bf16=true",), 2e-2),
], ids=["grad-clip", "bf16-autocast"])
def test_training_options_equal_one_process(world2, options, rtol, solo, tmp_path):
    check_against_reference(world2, "digits_cnn", list(options), options, tmp_path, rtol=rtol)
    fp32_params, _ = reference("digits_cnn")
    changed, _ = reference("digits_cnn", options)
    assert any(not torch.allclose(changed[k], fp32_params[k], rtol=1e-6, atol=0) for k in changed), \
        f"{options} had no effect on training"


def check_against_reference(world, example, overrides, ref_options, tmp_path, rtol=1e-5):
    expected_params, expected_losses = reference(example, tuple(ref_options))
    results = world.run(train_example, example, overrides, str(tmp_path))
    for rank, (params, _) in enumerate(results):
        assert_close(params, expected_params, rtol=rtol, atol=rtol / 10, what=f"rank {rank}: ")
        for name in params:  # replicas agree bitwise, not just closely
            assert torch.equal(params[name], results[0][0][name]), f"rank {rank} differs from rank 0 in {name}"
    losses = results[0][1]
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=rtol, atol=rtol / 100)


def test_non_finite_loss_stops_with_rank_and_step(world2, tmp_path):
    messages = world2.run(train_until_error, "linreg", ["train.lr=1e30"], str(tmp_path))
    for rank, message in enumerate(messages):
        assert message.startswith(f"rank {rank}: loss is ") and "at step 2; stopping" in message, message


# -- the engine itself, below the trainer ---------------------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(seed: int, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)


def _full_batch_grads(x, y):
    model = _model()
    nn.functional.mse_loss(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch."""
    return t.chunk(dist.get_world_size())[dist.get_rank()]


def dp_grads(bucket_mb: float, set_to_none: bool, gather_max_kb: float):
    """Two steps with small buckets; gradients must equal the full-batch ones each time."""
    model = plait.DataParallel(_model(), bucket_mb=bucket_mb, first_bucket_mb=bucket_mb, gather_max_kb=gather_max_kb)
    out = []
    for seed in (1, 2):
        model.zero_grad(set_to_none=set_to_none)
        x, y = _batch(seed)
        nn.functional.mse_loss(model(_local(x)), _local(y)).backward()
        got = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        out.append((got, _full_batch_grads(x, y)))
    return model.num_buckets, out


@pytest.mark.parametrize("gather_max_kb", [0, 256], ids=["ring-allreduce", "gather-sum"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("bucket_mb", [25.0, 0.0005], ids=["one-bucket", "many-buckets"])
@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_gradients_are_the_full_batch_gradients(world_name, bucket_mb, set_to_none, gather_max_kb, request):
    world = request.getfixturevalue(world_name)
    for rank, (buckets, steps) in enumerate(world.run(dp_grads, bucket_mb, set_to_none, gather_max_kb)):
        assert (buckets > 1) == (bucket_mb < 1)
        for got, expected in steps:
            assert_close(got, expected, what=f"rank {rank}: ")


def dp_no_sync():
    model = plait.DataParallel(_model())
    x, y = _batch(3, n=16)
    xs, ys = _local(x).chunk(2), _local(y).chunk(2)
    with model.no_sync():
        (nn.functional.mse_loss(model(xs[0]), ys[0]) / 2).backward()
    unsynced = model.module[0].weight.grad.clone()
    (nn.functional.mse_loss(model(xs[1]), ys[1]) / 2).backward()
    return unsynced, {n: p.grad.clone() for n, p in model.module.named_parameters()}, _full_batch_grads(x, y)


def test_no_sync_accumulates_then_syncs_once(world4):
    results = world4.run(dp_no_sync)
    unsynced = [r[0] for r in results]
    assert not torch.allclose(unsynced[0], unsynced[1]), "no_sync must not communicate"
    for rank, (_, got, expected) in enumerate(results):
        assert_close(got, expected, what=f"rank {rank}: ")


class WithSpare(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)


def dp_unused(allow: bool):
    torch.manual_seed(0)
    model = plait.DataParallel(WithSpare(), allow_unused=allow)
    try:
        model(torch.ones(2, 4)).sum().backward()
    except plait.PlaitError as exc:
        return str(exc)
    return model.module.spare.weight.grad.abs().sum().item()


def test_unused_parameters_are_named_or_allowed(world2):
    for message in world2.run(dp_unused, False):
        assert "spare.weight" in message and "spare.bias" in message and "allow_unused" in message
    assert world2.run(dp_unused, True) == [0.0, 0.0]


def dp_consistency():
    model = plait.DataParallel(_model())
    model.check_consistency()  # identical after the initial broadcast
    if dist.get_rank() == 1:
        with torch.no_grad():
            model.module[2].bias[0] += 1e-7
    try:
        model.check_consistency()
    except plait.PlaitError as exc:
        return str(exc)
    return "no error"


def test_consistency_check_names_tensor_and_rank(world2):
    for message in world2.run(dp_consistency):
        assert "'2.bias' on rank 1 is not bitwise equal to rank 0" in message


def mesh_layout():
    mesh = plait.Mesh(dp=2, pp=1, tp=2)
    return {a: (mesh.coord(a), dist.get_process_group_ranks(mesh.group(a))) for a in ("dp", "tp")}


def test_mesh_groups_follow_the_grid(world4):
    # grid = arange(4).view(dp=2, pp=1, tp=2): tp groups are rows, dp groups are columns.
    assert world4.run(mesh_layout) == [
        {"dp": (0, [0, 2]), "tp": (0, [0, 1])},
        {"dp": (0, [1, 3]), "tp": (1, [0, 1])},
        {"dp": (1, [0, 2]), "tp": (0, [2, 3])},
        {"dp": (1, [1, 3]), "tp": (1, [2, 3])},
    ]


def test_plait_init_listens_on_loopback_only(world2):
    """A script under plain torchrun with MASTER_ADDR=127.0.0.1: plait.init's store and gloo."""
    from conftest import LOOPBACK, listening_addresses

    addresses = world2.run(listening_addresses)[0]
    assert addresses, "rank 0 hosts the store, so it must listen somewhere"
    assert set(addresses) <= LOOPBACK, f"rank 0 listens beyond 127.0.0.1: {addresses}"
