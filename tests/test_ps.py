"""Parameter server on real gloo worlds: sync equals all-reduce and one process; async and ssp
converge within their staleness bound; a lost worker is dropped (async) or named (sync)."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from conftest import EXAMPLES, ROOT, STEPS, assert_close, kill_worker_when, train_example


def train_ps(example: str, overrides: list[str], out_dir: str, steps: int = STEPS):
    """One parameter-server run on every rank of a World: (parameters or None, summary or None,
    rank 0's logged losses). Rank 0 holds the whole model at the end, workers their last pull."""
    import plait
    from plait.train.config import load_config
    from plait.train.ps import PSTrainer

    info = plait.init()
    cfg = load_config(EXAMPLES / f"{example}.toml", [
        "parallel.strategy=ps", f"train.steps={steps}", "run.log_every=1", "run.progress=false",
        f"run.out_dir={out_dir}", *overrides])
    trainer = PSTrainer(cfg, info)
    summary = trainer.fit()
    holds_model = info.rank == 0 or info.rank in trainer.layout.workers
    params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()} if holds_model else None
    return params, summary, [r["loss"] for r in trainer.log.records] if trainer.log else None


@functools.cache
def reference(example: str, options: tuple[str, ...] = ()):
    return train_example(example, list(options), tempfile.mkdtemp())


SYNC_CASES = {
    "1server-cnn-sgd": ("world3", "digits_cnn", (), ()),
    "2servers-range-linreg-momentum-cosine": ("world4", "linreg", (
        "train.momentum=0.9", "train.lr_schedule=cosine", "train.warmup_steps=2", "train.min_lr=0.01"), ("ps.servers=2",)),
    "2servers-hash-cnn-adam": ("world4", "digits_cnn", ("train.optimizer=adam", "train.lr=0.001"),
                               ("ps.servers=2", "ps.partition=hash")),
}


@pytest.mark.parametrize("case", SYNC_CASES)
def test_sync_equals_allreduce_and_one_process(case, request, world2, solo, tmp_path):
    world_name, example, options, ps_options = SYNC_CASES[case]
    expected, expected_losses = reference(example, options)
    allreduce, _ = world2.run(train_example, example, list(options), str(tmp_path / "allreduce"))[0]
    results = request.getfixturevalue(world_name).run(
        train_ps, example, ["ps.mode=sync", *options, *ps_options], str(tmp_path / "ps"))
    server_params, summary, losses = results[0]
    # Against all-reduce: the same two local gradients, averaged alike, then the same optimizer
    # arithmetic on a flat shard instead of per tensor: float32 rounding only, elementwise.
    assert_close(server_params, allreduce, what="server vs all-reduce: ")
    # Against one process: its gradient sums 64 samples at once, the workers' 32 and 32, so each
    # element differs by rounding. SGD passes that on unchanged. Adam divides by sqrt(v): an element
    # whose gradient cancels to rounding level can move by up to lr per step either way, so for
    # Adam the check is each tensor's relative error (<= 1e-5), which a real fault exceeds by three
    # orders: dropping one worker's gradient gave 1e-2 to 6e-2 on every tensor here.
    assert_close(server_params, expected, what="server vs one process: ", by_norm="adam" in case)
    workers = [r for r in results if r[1] is None and r[0] is not None]
    assert len(workers) == 2
    for params, _, _ in workers:  # every worker pulled exactly the server's parameters
        assert all(torch.equal(params[k], server_params[k]) for k in params)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=1e-7)
    assert summary["ps_updates"] == [STEPS] * len(summary["ps_updates"]) and summary["ps_max_clock_gap"] == 0


def test_ssp_with_zero_staleness_trains_like_sync(world3, solo, tmp_path):
    """s = 0: no worker starts step t+1 before every step-t gradient is applied; with plain SGD
    the applied updates add up to sync's mean, even with one worker slowed down."""
    expected, _ = reference("linreg")
    options = ["ps.mode=ssp", "ps.staleness=0", "ps.straggler=2", "ps.straggler_delay=0.003"]
    params, summary, _ = world3.run(train_ps, "linreg", options, str(tmp_path))[0]
    assert_close(params, expected, scaled=True)
    assert summary["ps_max_clock_gap"] == 0 and summary["ps_updates"] == [2 * STEPS]


def weights_error(summary: dict) -> float:
    learned, exact = (torch.tensor(summary[k]) for k in ("learned_weights", "closed_form_weights"))
    return (learned - exact).abs().max().item()


@pytest.mark.parametrize("mode, staleness", [("async", 0), ("ssp", 1), ("ssp", 3)])
def test_async_and_ssp_reach_least_squares_within_their_bound(world3, mode, staleness, tmp_path):
    """Rank 2 is three times slower: async lets rank 1 run far ahead; ssp holds it to the bound."""
    options = [f"ps.mode={mode}", f"ps.staleness={staleness}", "ps.straggler=2", "ps.straggler_delay=0.003"]
    _, summary, losses = world3.run(train_ps, "linreg", options, str(tmp_path), steps=200)[0]
    assert weights_error(summary) < 1e-2, summary
    assert summary["ps_updates"] == [400] and not summary["lost_workers"]
    if mode == "ssp":
        assert 0 < summary["ps_max_clock_gap"] <= staleness
    else:
        assert summary["ps_max_clock_gap"] > 3  # nothing held the fast worker back
    assert losses[-1] < losses[0] / 10


def stall_one_worker(timeout_s: float, mode: str = "async"):
    """Library use: rank 2 goes silent longer than the server's timeout, then tries to go on."""
    import torch.distributed as dist
    from torch import nn

    from plait.errors import PlaitError
    from plait.parallel.ps import ParameterServer, PSLayout, PSWorker, WorkerDropped
    from plait.parallel.ps.worker import StopRun

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    layout = PSLayout.build(model, servers=1)
    if dist.get_rank() == 0:
        try:
            stats = ParameterServer(model, lambda p: torch.optim.SGD(p, lr=0.1), layout, mode=mode,
                                    timeout_s=timeout_s).serve()
        except PlaitError as exc:
            return str(exc)
        return stats.lost, stats.clocks
    worker = PSWorker(model, layout)
    for step in range(1, 41):
        if dist.get_rank() == 2 and step == 4:
            time.sleep(2.5 * timeout_s)
        if dist.get_rank() == 1:
            time.sleep(0.05)  # rank 1 keeps pushing all through rank 2's silence
        worker.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        try:
            worker.push()
        except (WorkerDropped, StopRun) as exc:
            return str(exc)
    worker.close()
    return "finished"


def test_a_silent_worker_is_dropped_and_told_so(world3):
    (lost, clocks), first, second = world3.run(stall_one_worker, 0.6)
    assert first == "finished" and clocks[1] == 40
    assert list(lost) == [2] and lost[2] == "no message for 0.6 s (ps.timeout)" and clocks[2] == 3
    assert second.startswith("rank 2: dropped by parameter server rank 0")


def test_a_silent_worker_in_sync_mode_stops_the_run_naming_it(world3):
    """Sync cannot go on without a worker: the server fails naming it and stops the others."""
    server, first, second = world3.run(stall_one_worker, 0.6, "sync")
    assert re.fullmatch(r"rank 0 \(parameter server\): lost worker rank 2 \(at its step 3\): no message for "
                        r"0.6 s \(ps.timeout\); a sync step needs every worker, so the run stops", server), server
    assert first != "finished" and second != "finished", (first, second)


def _train_and_kill(tmp_path, mode: str) -> tuple[subprocess.CompletedProcess, str]:
    name = f"ps-kill-{mode}-{os.getpid()}"
    cmd = [sys.executable, "-m", "plait.cli", "train", str(EXAMPLES / "linreg.toml"), "--nproc", "3",
           "--set", "parallel.strategy=ps", "--set", f"ps.mode={mode}", "--set", "train.steps=3000",
           "--set", "train.batch_size=128", "--set", "run.log_every=50", "--set", "run.progress=false",
           "--set", f"run.name={name}", "--set", f"run.out_dir={tmp_path}"]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / name / "metrics.jsonl"
    stdout, stderr = kill_worker_when(run, lambda: metrics.is_file() and metrics.read_text() != "", name, rank=2,
                                      what="training did not start")
    return subprocess.CompletedProcess(cmd, run.returncode, stdout, stderr), name


def test_killed_worker_in_async_mode_is_dropped_and_the_run_completes(tmp_path):
    done, name = _train_and_kill(tmp_path, "async")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert list(summary["lost_workers"]) == ["2"]
    assert summary["ps_pushes"] < 2 * 3000  # rank 2 stopped early; rank 1 finished alone
    assert weights_error(summary) < 1e-2
    assert "plait: rank 2 (parameter-server worker) was lost (killed by SIGKILL)" in done.stderr
    assert "dropped worker rank 2" in done.stdout and "lost workers: rank 2" in done.stdout


def test_killed_worker_in_sync_mode_ends_the_run_naming_it(tmp_path):
    done, _ = _train_and_kill(tmp_path, "sync")
    assert done.returncode == 1
    assert "worker rank 2 failed (signal SIGKILL)" in done.stderr
    assert "Traceback" not in done.stderr and "SIGABRT" not in done.stderr


def test_a_diverging_loss_in_async_mode_ends_the_run(tmp_path):
    """Divergence is not a lost worker: the guard must not tolerate it, nor the others go on."""
    cmd = [sys.executable, "-m", "plait.cli", "train", str(EXAMPLES / "linreg.toml"), "--nproc", "3",
           "--set", "parallel.strategy=ps", "--set", "ps.mode=async", "--set", "train.lr=10",
           "--set", "run.progress=false", "--set", f"run.out_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert re.search(r"rank 0 \(parameter server\): worker rank [12] reported loss (inf|nan) at its step \d+; "
                     r"the run stops; lower the learning rate, or the momentum", done.stderr), done.stderr
    assert re.search(r"rank [12]: loss is (inf|nan) at step \d+", done.stderr)
    assert "was lost" not in done.stderr  # exit code STOP_RUN went through the guard
    assert "SIGABRT" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "linreg" / "summary.json").exists()


def test_range_and_hash_partitions():
    from plait.parallel.ps.layout import hash_segments, range_segments

    assert range_segments(10, 3) == [((0, 3),), ((3, 6),), ((6, 10),)]
    named = [("a.weight", 6), ("a.bias", 2), ("b.weight", 4), ("b.bias", 1)]
    owned = hash_segments(named, 2)
    assert owned == hash_segments(named, 2)  # crc32: the same in every process, unlike hash()
    covered = sorted(i for segs in owned for lo, hi in segs for i in range(lo, hi))
    assert covered == list(range(13))
    boundaries = {0, 6, 8, 12, 13}  # whole tensors only: segments start and end between parameters
    assert all(lo in boundaries and hi in boundaries for segs in owned for lo, hi in segs)


def test_layout_needs_a_worker(solo):
    from torch import nn

    from plait.errors import ConfigError
    from plait.parallel.ps import PSLayout

    with pytest.raises(ConfigError, match="ps.servers: 1 server\\(s\\) in a world of 1 leaves no worker"):
        PSLayout.build(nn.Linear(2, 1), servers=1)


def _worker_error(model_dtype):
    import torch.distributed as dist
    from torch import nn

    from plait.errors import PlaitError
    from plait.parallel.ps import PSLayout, PSWorker

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1).to(model_dtype))
    layout = PSLayout.build(model, servers=1)  # collective: every rank builds the layout
    if dist.get_rank() == 0:
        return None
    try:
        PSWorker(model, layout)  # refuses before it communicates
    except PlaitError as exc:
        return str(exc)
    return "no error"


def test_worker_refuses_parameters_that_are_not_float32(world2):
    message = world2.run(_worker_error, torch.float64)[1]
    assert message.startswith("the parameter server trains float32 parameters; 1.weight is torch.float64")
