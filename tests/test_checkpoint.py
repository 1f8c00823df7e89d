"""Checkpoints and recovery: exact resume, resharding, crashes mid-save, stalls, bad checkpoints."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import plait
from plait.testing import World, WorkerError
from plait.train.checkpoint import Checkpointer

from conftest import EXAMPLES, assert_close, train_example

EVERY = ["checkpoint.every=4"]


def ckpt_dir(tmp_path: Path, name: str) -> str:
    return f"checkpoint.dir={tmp_path / name}"


@pytest.fixture(scope="module")
def uninterrupted(world2, tmp_path_factory):
    """The seed CNN (SGD with momentum: optimizer state matters), 12 steps on 2 ranks, no stop."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return world2.run(train_example, "digits_cnn", [*EVERY, f"checkpoint.dir={out}/ck"], str(out), 12)[0]


@pytest.fixture(scope="module")
def stopped_at_8(world2, tmp_path_factory):
    """The same run stopped after 8 steps: its checkpoints, at steps 4 and 8."""
    out = tmp_path_factory.mktemp("stopped")
    world2.run(train_example, "digits_cnn", [*EVERY, f"checkpoint.dir={out}/ck"], str(out), 8)
    return out


def test_resume_is_bitwise_exact(world2, uninterrupted, stopped_at_8, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_at_8, out)  # checkpoints and the metrics of steps 1-8
    params, losses = world2.run(train_example, "digits_cnn", [*EVERY, f"checkpoint.dir={out}/ck",
                                                              "checkpoint.resume=latest"], str(out), 12)[0]
    expected_params, expected_losses = uninterrupted
    for name in expected_params:
        assert torch.equal(params[name], expected_params[name]), name
    assert losses == expected_losses  # steps 1-8 kept from the first run, 9-12 from the resumed one


@pytest.mark.parametrize("world_name", ["solo", "world4"])
def test_checkpoint_of_two_ranks_resumes_on_one_and_four(world_name, request, uninterrupted, stopped_at_8, tmp_path):
    world = request.getfixturevalue(world_name)
    shutil.copytree(stopped_at_8 / "ck", tmp_path / "ck")
    overrides = [*EVERY, f"checkpoint.dir={tmp_path}/ck", "checkpoint.resume=latest"]
    if world_name == "solo":
        params, losses = train_example("digits_cnn", overrides, str(tmp_path), 12)
    else:
        params, losses = world.run(train_example, "digits_cnn", overrides, str(tmp_path), 12)[0]
    expected_params, expected_losses = uninterrupted
    assert_close(params, expected_params)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses[8:]), rtol=1e-5, atol=1e-7)


def save_then_die_before_commit(out_dir: str):
    from conftest import EXAMPLES
    from plait.train.config import load_config
    from plait.train.checkpoint import _hyperparameters
    from plait.train.trainer import Trainer

    cfg = load_config(EXAMPLES / "linreg.toml", ["train.steps=4", "checkpoint.every=4", "run.progress=false",
                                                 f"run.out_dir={out_dir}"])
    trainer = Trainer(cfg, plait.init())
    trainer.fit()  # commits step 4
    partial = trainer.ckpt.write(8, trainer.parallel, trainer.optimizer)
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # between write and commit
    trainer.ckpt.commit(partial, 8, _hyperparameters(trainer.optimizer), {})


def test_crash_between_write_and_commit_keeps_last_checkpoint(solo, tmp_path):
    with World(2, timeout_s=10) as world, pytest.raises(WorkerError):
        world.run(save_then_die_before_commit, str(tmp_path))
    root = tmp_path / "linreg" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000008.partial"]
    assert Checkpointer(root).latest().name == "step_00000004"
    params, losses = train_example("linreg", [f"checkpoint.dir={root}", "checkpoint.resume=latest"], str(tmp_path), 6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "linreg" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 6], "continues after step 4, the last committed checkpoint"
    expected, _ = train_example("linreg", [], str(tmp_path / "uninterrupted"), 6)
    assert_close(params, expected)  # saved on 2 ranks at step 4, resumed on 1: as if never stopped


def test_checkpoints_beyond_keep_go_out_of_sight_at_once_and_are_deleted_in_the_background(solo, tmp_path):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Left by a run that ended while deleting it: it still holds a manifest, yet is no checkpoint.
    stale = tmp_path / ".deleting-step_00000001"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    ckpt = Checkpointer(tmp_path, keep=1)
    assert ckpt.complete() == []
    ckpt.save(2, model, opt, {})
    ckpt.save(3, model, opt, {})
    assert [p.name for p in ckpt.complete()] == ["step_00000003"]  # step 2 is renamed before save() returns
    ckpt.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


def crc_settings_seen(monkeypatch) -> list[bool]:
    """Filled, as DCP writes a checkpoint's files, with torch.save's record-CRC setting at each write."""
    from plait.train import dcp_io

    seen, write = [], dcp_io._HashingStream.write

    def recording(self, data):
        seen.append(torch.serialization.get_crc32_options())
        return write(self, data)

    monkeypatch.setattr(dcp_io._HashingStream, "write", recording)
    return seen


def test_files_are_hashed_once_and_torch_save_is_left_as_it_was(solo, tmp_path, monkeypatch):
    """DCP's per-tensor ``torch.save`` skips its own record CRC while Plait hashes the file whole;
    the caller's setting is as it was, and the checkpoint loads (its manifest CRCs checked)."""
    seen = crc_settings_seen(monkeypatch)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = Checkpointer(tmp_path).save(1, model, opt, {})
    assert seen and not any(seen)
    assert torch.serialization.get_crc32_options()
    fresh = nn.Linear(4, 2)
    Checkpointer(tmp_path).load(path, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert torch.equal(fresh.weight, model.weight)


def test_where_torchs_setting_is_the_processs_records_keep_their_crc(solo, tmp_path, monkeypatch):
    """Where a torch config patch is seen by every thread (older torch), four writer threads
    patching and restoring it could leave it off: the records keep their CRC there."""
    from plait.train import dcp_io

    class SameThread:  # what another thread sees of a process-wide patch: what this one sees
        def __init__(self, target):
            self.target = target

        def start(self):
            self.target()

        def join(self):
            pass

    dcp_io._record_crc_off.cache_clear()
    try:
        with monkeypatch.context() as patched:
            patched.setattr(dcp_io.threading, "Thread", SameThread)
            assert dcp_io._record_crc_off() is None
        seen = crc_settings_seen(monkeypatch)
        model = nn.Linear(4, 2)
        Checkpointer(tmp_path).save(1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
        assert seen and all(seen)
    finally:
        dcp_io._record_crc_off.cache_clear()  # found out again by the next save


def stall_and_wait(sleep_rank: int, seconds: float):
    model = plait.DataParallel(nn.Linear(4, 2))
    if dist.get_rank() == sleep_rank:
        time.sleep(seconds)
    start = time.monotonic()
    try:
        model(torch.ones(2, 4)).sum().backward()
    except plait.CommError as exc:
        return str(exc), time.monotonic() - start
    return "no error", time.monotonic() - start


def test_stalled_peer_gives_timeout_error_naming_it():
    timeout = 3.0
    with World(2, timeout_s=timeout) as world:
        (message, elapsed), _ = world.run(stall_and_wait, 1, 3 * timeout)
    assert message.startswith("rank 0: gradient all-reduce (bucket 1 of 1) failed: no answer from rank 1"), message
    assert timeout <= elapsed < timeout + 3.0


# -- refusing bad checkpoints ---------------------------------------------------------------
@pytest.fixture()
def linreg_checkpoint(solo, tmp_path):
    train_example("linreg", ["checkpoint.every=3", f"checkpoint.dir={tmp_path}/ck"], str(tmp_path), 3)
    path = tmp_path / "ck" / "step_00000003"
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    yield path
    # Each test restores what it damaged; the refused run itself must have written nothing.
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no new checkpoint may appear"


def resume(path, tmp_path, *more):
    return train_example("linreg", [f"checkpoint.resume={path}", f"checkpoint.dir={path.parent}", *more],
                         str(tmp_path / "again"), 6)


def test_checkpoint_of_another_model_is_refused(linreg_checkpoint, tmp_path):
    with pytest.raises(plait.PlaitError, match=r"does not match this model: 'model.linear.weight' has shape \(1, 8\) there, \(1, 4\) here"):
        resume(linreg_checkpoint, tmp_path, "data.args.features=4")


def test_truncated_checkpoint_is_refused(linreg_checkpoint, tmp_path):
    shard = linreg_checkpoint / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(plait.PlaitError, match=r"is corrupt: __0_0.distcp has \d+ bytes, expected \d+ \(truncated\?\)"):
        resume(linreg_checkpoint, tmp_path)
    shard.write_bytes(data)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def _global(module: str, name: str) -> bytes:
    """Pickle opcodes that push ``module.name`` (protocol 4's STACK_GLOBAL resolves dotted names)."""
    text = lambda s: pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()  # noqa: E731
    return text(module) + text(name) + pickle.STACK_GLOBAL


def dotted_name_payload(command: str, metadata: bytes) -> bytes:
    """Calls ``os.system(command)`` through a dotted name under DCP's own metadata module (which
    imports os), throws the result away, then unpickles ``metadata``: valid DCP metadata after
    the side effect, so nothing looks wrong to a loader that only checks the result's type."""
    call = (_global("torch.distributed.checkpoint.metadata", "os.system") + pickle.SHORT_BINUNICODE
            + bytes([len(command)]) + command.encode() + pickle.TUPLE1 + pickle.REDUCE + pickle.POP)
    assert metadata[:2] == pickle.PROTO + b"\x04"
    return pickle.PROTO + b"\x04" + call + metadata[2:]


def plant(checkpoint: Path, payload: bytes) -> None:
    """Replace the metadata as an attacker would, who also rewrites the manifest's checksums."""
    from plait.train.checkpoint import MANIFEST, _file_record, _manifest_crc

    (checkpoint / ".metadata").write_bytes(payload)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][".metadata"] = _file_record(checkpoint / ".metadata")
    manifest["crc32"] = _manifest_crc(manifest)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("attack", ["plain-global", "dotted-name"])
def test_loading_never_runs_code_from_the_checkpoint(attack, linreg_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    meta, manifest_file = linreg_checkpoint / ".metadata", linreg_checkpoint / "manifest.json"
    original, original_manifest = meta.read_bytes(), manifest_file.read_text()
    if attack == "plain-global":
        _Exploit.marker = marker
        payload, refused = pickle.dumps(_Exploit()), r"refusing to load (posix|os)\.system"
    else:
        payload = dotted_name_payload(f"touch {marker}", original)
        refused = r"refusing to load torch\.distributed\.checkpoint\.metadata\.os\.system"
        # The payload is real: plain pickle runs the command and returns valid metadata.
        from torch.distributed.checkpoint.metadata import Metadata

        assert isinstance(pickle.loads(payload), Metadata) and marker.exists()
        marker.unlink()
    plant(linreg_checkpoint, payload)
    with pytest.raises(plait.PlaitError, match=f"unsafe metadata: {refused}"):
        resume(linreg_checkpoint, tmp_path)
    assert not marker.exists()
    meta.write_bytes(original)
    manifest_file.write_text(original_manifest)


def test_metadata_admits_exactly_the_classes_dcp_writes(linreg_checkpoint):
    """The allowlist is neither short (every class DCP writes loads) nor wide (a neighbour of an
    allowed name, a dotted name, or a module's other names are refused)."""
    from plait.train.dcp_io import SafeReader, _MetadataUnpickler

    assert SafeReader(linreg_checkpoint).read_metadata().state_dict_metadata
    for module, name in [("torch.distributed.checkpoint.metadata", "os"), ("torch", "load"),
                         ("torch.distributed.checkpoint.filesystem", "pickle"), ("pathlib", "Path.unlink"),
                         ("torch.serialization", "load"), ("builtins", "eval"), ("torch", "float32.__class__")]:
        with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
            _MetadataUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_missing_checkpoint_is_refused(solo, tmp_path):
    with pytest.raises(plait.PlaitError, match="no complete checkpoint in"):
        train_example("linreg", [f"checkpoint.dir={tmp_path}/none", "checkpoint.resume=latest"], str(tmp_path))


# -- the loss guard -------------------------------------------------------------------------
@pytest.fixture()
def poisoned(tmp_path):
    """The regression data with one NaN sample, as a user's .npz."""
    from plait.data.datasets import _split, regression
    from plait.data.partition import PartitionSampler

    train, test, _ = regression()
    x = torch.cat([train.tensors[0], test.tensors[0]]).numpy()
    y = torch.cat([train.tensors[1], test.tensors[1]]).flatten().numpy()
    train_indices, _ = _split(len(x), 0.25, 0)  # the split linreg.toml's data gets (test_fraction 0.25)
    step3 = PartitionSampler(len(train_indices), global_batch=64, seed=0).indices(epoch=0)[2 * 64]
    x[train_indices[step3], 0] = np.nan  # in the batch of step 3 (batch 64, seed 0), epoch 0
    path = tmp_path / "poisoned.npz"
    np.savez(path, x=x, y=y)
    return path


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(solo, poisoned, tmp_path):
    options = [f"data.path={poisoned}", "train.batch_size=64", "checkpoint.every=1", "checkpoint.keep=1",
               f"checkpoint.dir={tmp_path}/ck"]
    with pytest.raises(plait.PlaitError, match=r"loss is nan at step (\d+); stopping") as err:
        train_example("linreg", options, str(tmp_path), 40)
    bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    assert bad_step == 3
    latest = Checkpointer(tmp_path / "ck").latest()
    assert latest.name == f"step_{bad_step - 1:08d}"
    params, _ = train_example("linreg", [*options, "checkpoint.resume=latest"], str(tmp_path), bad_step - 1)
    before_nan, _ = train_example("linreg", [f"data.path={poisoned}", "train.batch_size=64"], str(tmp_path / "b"),
                                  bad_step - 1)
    for name, value in before_nan.items():  # the kept checkpoint is the last good step, exactly
        assert torch.equal(params[name], value), name


def test_nonfinite_steps_can_be_skipped(solo, poisoned, tmp_path):
    options = [f"data.path={poisoned}", "train.batch_size=64", "train.skip_nonfinite=true"]
    before, _ = train_example("linreg", options, str(tmp_path / "two"), 2)
    skipped, losses = train_example("linreg", options, str(tmp_path / "three"), 3)
    assert np.isnan(losses[2]) and not np.isnan(losses[:2]).any()
    for name, value in before.items():  # step 3's batch holds the NaN: the step leaves the model as it was
        assert torch.equal(skipped[name], value), name
    params, losses = train_example("linreg", options, str(tmp_path), 40)
    assert all(torch.isfinite(v).all() for v in params.values())
    summary = json.loads((tmp_path / "linreg" / "summary.json").read_text())
    assert summary["skipped_steps"] == sum(np.isnan(losses)) >= 1


# -- pipeline and tensor-parallel runs --------------------------------------------------------
SPLIT_LAYOUTS = {
    "pp2": ("digits_cnn", ["parallel.pp=2", "pipeline.microbatches=2"]),
    "tp2": ("gpt_tp", ["parallel.tp=2", "data.args.max_chars=6000", "data.args.block_size=16", "model.args.dim=32",
                       "train.batch_size=8"]),
}


@pytest.mark.parametrize("layout", list(SPLIT_LAYOUTS))
def test_split_layouts_resume_exactly(world2, layout, tmp_path):
    example, options = SPLIT_LAYOUTS[layout]
    ck = ["checkpoint.every=3", f"checkpoint.dir={tmp_path}/ck"]
    whole = world2.run(train_example, example, options, str(tmp_path / "whole"), 6)
    world2.run(train_example, example, [*options, *ck], str(tmp_path / "parts"), 3)
    resumed = world2.run(train_example, example, [*options, *ck, "checkpoint.resume=latest"], str(tmp_path / "parts"), 6)
    for rank in range(2):
        for name, value in whole[rank][0].items():
            assert torch.equal(resumed[rank][0][name], value), f"rank {rank}: {name}"
    assert resumed[0][1] == whole[0][1]


# -- the resume rule: state from the checkpoint, hyperparameters from the config ---------------
def test_resume_takes_the_configs_learning_rate(solo, tmp_path, capsys):
    """Plain SGD: the first step after resume moves the parameters by -lr * gradient, with the
    lr of the resumed run's config; the same step at the saved lr moves them exactly twice as far."""
    ck = ["checkpoint.every=2", f"checkpoint.dir={tmp_path}/ck", "checkpoint.keep=5"]
    at_2, _ = train_example("linreg", ck, str(tmp_path / "first"), 2)
    same, _ = train_example("linreg", [*ck, "checkpoint.resume=latest"], str(tmp_path / "same"), 3)
    assert "train.lr" not in capsys.readouterr().out
    half, losses = train_example("linreg", [*ck, f"checkpoint.resume={tmp_path}/ck/step_00000002", "train.lr=0.05"],
                                 str(tmp_path / "half"), 3)
    assert "(step 2); train.lr 0.1 -> 0.05" in capsys.readouterr().out
    for name in at_2:
        torch.testing.assert_close(half[name] - at_2[name], 0.5 * (same[name] - at_2[name]), rtol=1e-5, atol=1e-7)
    logged = [json.loads(line) for line in (tmp_path / "half" / "linreg" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 3 and logged[-1]["lr"] == 0.05  # the lr the optimizer used


@pytest.mark.parametrize("change, message", [
    ("train.optimizer=adam", "was made with train.optimizer='sgd', this run has 'adam': its optimizer state"),
    ("train.momentum=0.9", "was made with train.momentum=0 and holds no momentum buffers"),
    ("train.batch_size=32", "was made with batch_size=768, this run has 32: its position in the data"),
])
def test_resume_refuses_what_cannot_carry_over_before_any_worker(linreg_checkpoint, tmp_path, change, message):
    from plait.cli import _check

    with pytest.raises(plait.PlaitError, match=re.escape(message)):
        _check(str(EXAMPLES / "linreg.toml"), [f"checkpoint.resume={linreg_checkpoint}",
                                               f"run.out_dir={tmp_path}", change], 1)


# -- asynchronous saves (checkpoint.async) ------------------------------------------------------
def _small(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def test_async_save_writes_the_state_of_its_step_while_training_changes_it(solo, tmp_path):
    """The state is copied when save() returns: parameters and momentum changed in place right
    after (as the next step would) do not reach the checkpoint, which holds the step's values."""
    model, opt = _small()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    ckpt = Checkpointer(tmp_path, asynchronous=True)
    path = ckpt.save(1, model, opt, {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            opt.state[p]["momentum_buffer"].mul_(-1)
    ckpt.wait()
    assert ckpt.latest() == path
    fresh, fresh_opt = _small(seed=1)
    Checkpointer(tmp_path).load(path, fresh, fresh_opt)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for p, m in zip(fresh.parameters(), momentum):
        assert torch.equal(fresh_opt.state[p]["momentum_buffer"], m)


def test_failed_async_save_is_an_error_naming_the_rank_and_keeps_the_last_checkpoint(solo, tmp_path, monkeypatch):
    import plait.train.checkpoint as module
    from plait.train import dcp_io

    model, opt = _small()
    ckpt = Checkpointer(tmp_path, asynchronous=True)
    ckpt.save(4, model, opt, {})
    ckpt.wait()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp_io.dcp, "save", full_disk)
    ckpt.save(8, model, opt, {})
    with pytest.raises(module.CheckpointError, match=r"rank 0: the asynchronous checkpoint save of step 8 failed: "
                                                     r".*No space left on device"):
        while True:  # the training thread's per-step check
            ckpt.poll()
            time.sleep(0.01)
    assert ckpt.latest().name == "step_00000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000008.partial"]


def async_save_then_die_while_writing(out_dir: str):
    from plait.train import dcp_io

    model, opt = _small()
    plait.init()
    ckpt = Checkpointer(out_dir, asynchronous=True)
    ckpt.save(4, model, opt, {})
    ckpt.wait()
    real = dcp_io.dcp.save

    def dies_on_rank_1(*args, **kwargs):
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-write, in the writing thread
        return real(*args, **kwargs)

    dcp_io.dcp.save = dies_on_rank_1
    ckpt.save(8, model, opt, {})
    ckpt.wait()


def test_crash_during_an_async_save_keeps_the_last_checkpoint(tmp_path):
    with World(2, timeout_s=10) as world, pytest.raises(WorkerError):
        world.run(async_save_then_die_while_writing, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000008.partial"]
    from plait.train.checkpoint import complete_checkpoints

    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004"]


def test_async_checkpoints_resume_bitwise_exact(world2, uninterrupted, tmp_path):
    """checkpoint.async through the trainer: saved at steps 4 and 8 while training went on,
    resumed at 8, the run ends where the uninterrupted one does, bit for bit."""
    out = tmp_path / "run"
    sets = [*EVERY, f"checkpoint.dir={out}/ck", "checkpoint.async=true"]
    world2.run(train_example, "digits_cnn", sets, str(out), 8)
    assert sorted(p.name for p in (out / "ck").iterdir()) == ["step_00000004", "step_00000008"]
    params, losses = world2.run(train_example, "digits_cnn", [*sets, "checkpoint.resume=latest"], str(out), 12)[0]
    expected_params, expected_losses = uninterrupted
    for name in expected_params:
        assert torch.equal(params[name], expected_params[name]), name
    assert losses == expected_losses


def gather_between_ranks(payload_kind: str):
    import torch.distributed as dist

    from plait.distributed.comm import all_gather_data

    rank = dist.get_rank()
    if payload_kind == "data":  # ranks of different lengths, non-ASCII text, nested containers
        return all_gather_data({"rank": rank, "name": "é" * (3 * rank + 1), "span": (1, 2.5), "none": None}, "test")
    try:  # what only a pickle could carry is refused on the sending rank, before anything is sent
        all_gather_data(torch.zeros(1), "test")
    except TypeError as exc:
        return str(exc)
    return "sent"


def test_what_ranks_gather_is_data_never_a_pickle(world2):
    """The manifest's file records, the cut check's errors and the traces travel between ranks
    as JSON (``all_gather_data``), not as pickles: what a peer sends cannot run code here."""
    got = world2.run(gather_between_ranks, "data")
    expected = [{"rank": r, "name": "é" * (3 * r + 1), "span": [1, 2.5], "none": None} for r in range(2)]
    assert got == [expected, expected]
    refused = world2.run(gather_between_ranks, "tensor")
    assert all("not JSON serializable" in r for r in refused)


def gather_unsplit_without_pickles():
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from plait.parallel.shards import gather_unsplit, tensor_pieces

    def no_pickles(*args, **kwargs):
        raise AssertionError("an object collective (a pickle) was used")

    rank = dist.get_rank()
    weight = torch.arange(12, dtype=torch.float32).view(4, 3) + 0.5
    half = torch.arange(5, dtype=torch.bfloat16) * 0.25
    count = torch.arange(3, dtype=torch.int64) + 7
    lo, hi = (0, 5) if rank == 0 else (5, 12)  # a ZeRO-like shard of the weight's elements
    held = [(weight.reshape(-1)[lo:hi], tensor_pieces("w", weight, lo, hi))]
    held += [(half, tensor_pieces("h", half))] if rank == 0 else [(count, tensor_pieces("n", count))]
    saved = c10d._object_to_tensor, c10d._tensor_to_object
    c10d._object_to_tensor = c10d._tensor_to_object = no_pickles
    try:  # this world's processes serve later tests: put the object collectives back
        got = gather_unsplit(held)
    finally:
        c10d._object_to_tensor, c10d._tensor_to_object = saved
    return {name: (str(t.dtype), t.tolist()) for name, t in sorted(got.items())}


def test_unsplit_parameters_travel_as_tensors(world2):
    """``unsplit_parameters`` assembles tensors of several dtypes, split unevenly across ranks,
    with no object collective (they are made to fail): layout as JSON, values as tensors."""
    expected = {"h": ("torch.bfloat16", [0.0, 0.25, 0.5, 0.75, 1.0]),
                "n": ("torch.int64", [7, 8, 9]),
                "w": ("torch.float32", (torch.arange(12.0).view(4, 3) + 0.5).tolist())}
    assert world2.run(gather_unsplit_without_pickles) == [expected, expected]
