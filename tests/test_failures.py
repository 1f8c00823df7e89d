"""A failure on one rank ends the whole run within seconds, through the real launcher: one line
naming the rank, the step and the cause; the logged metrics and the last checkpoint stay whole."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.train.checkpoint import complete_checkpoints, read_manifest

from conftest import EXAMPLES, ROOT

# Imported by every Python process of a run whose PYTHONPATH holds its folder (Python's `site`
# does that): on the rank named by PLAIT_TEST_FAIL_RANK it makes the third training batch fail,
# in data loading or in the model's forward, as a user's code would.
INJECT = '''
import os
if os.environ.get("PLAIT_TEST_FAIL") and os.environ.get("RANK") == os.environ.get("PLAIT_TEST_FAIL_RANK"):
    from plait.data import datasets
    from plait.models import simple

    calls = {"n": 0}

    def third(error):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error

    if os.environ["PLAIT_TEST_FAIL"] == "data":
        get = datasets.ArrayDataset.__getitems__
        def failing_get(self, indices):
            third(OSError("sample file went away"))
            return get(self, indices)
        datasets.ArrayDataset.__getitems__ = failing_get
    else:
        forward = simple.LinearRegression.forward
        def failing_forward(self, x):
            if x.device.type != "meta":  # the trainer's FLOP count runs it on the meta device first
                third(ValueError("the user's forward raised"))
            return forward(self, x)
        simple.LinearRegression.forward = failing_forward
'''

BOUND_S = 30.0  # the bound on a run that fails, with the default dist.timeout of 300 s


@pytest.fixture(scope="module")
def inject_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inject")
    (folder / "sitecustomize.py").write_text(INJECT)
    return folder


@pytest.fixture(scope="module")
def poisoned_on_rank1(tmp_path_factory) -> Path:
    """The regression data with a NaN in a sample that rank 1 of 2 gets at step 3 (batch 64)."""
    from plait.data.datasets import _split, regression
    from plait.data.partition import PartitionSampler

    train, test, _ = regression()
    x = torch.cat([train.tensors[0], test.tensors[0]]).numpy()
    y = torch.cat([train.tensors[1], test.tensors[1]]).flatten().numpy()
    train_indices, _ = _split(len(x), 0.25, 0)  # the split linreg.toml's data gets (test_fraction 0.25)
    order = PartitionSampler(len(train_indices), global_batch=64, seed=0).indices(epoch=0)
    x[train_indices[order[2 * 64 + 32]], 0] = np.nan  # step 3's batch; its second half is rank 1's
    path = tmp_path_factory.mktemp("data") / "poisoned.npz"
    np.savez(path, x=x, y=y)
    return path


def run_until_failure(tmp_path: Path, *options: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "plait.cli", "train", str(EXAMPLES / "linreg.toml"), "--nproc", "2",
           "--set", "train.batch_size=64", "--set", "train.steps=200", "--set", "run.log_every=1",
           "--set", "checkpoint.every=1", "--set", "checkpoint.keep=2", "--set", "run.progress=false",
           "--set", f"run.out_dir={tmp_path}", *options]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    return done, time.monotonic() - start


@pytest.mark.parametrize("failure", ["nonfinite", "data", "model"])
def test_a_failure_on_one_rank_ends_the_run_in_seconds(failure, inject_dir, poisoned_on_rank1, tmp_path):
    if failure == "nonfinite":
        done, elapsed = run_until_failure(tmp_path, "--set", f"data.path={poisoned_on_rank1}")
        cause = r"rank 1: loss is nan at step 3; stopping"
    else:
        env = {"PYTHONPATH": os.pathsep.join([str(inject_dir), os.environ.get("PYTHONPATH", "")]),
               "PLAIT_TEST_FAIL": failure, "PLAIT_TEST_FAIL_RANK": "1"}
        done, elapsed = run_until_failure(tmp_path, env=env)
        cause = {"data": r"rank 1: step 3: OSError: sample file went away",
                 "model": r"rank 1: step 3: ValueError: the user's forward raised"}[failure]
        cause += re.escape(f" (traceback: {tmp_path}/linreg/error_rank1.txt)")
    assert done.returncode == 1
    assert elapsed < BOUND_S, f"the run took {elapsed:.1f} s to end"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr  # the cause, and the launcher's summary of it
    assert re.fullmatch(f"plait: error: {cause}.*", lines[0]), done.stderr
    assert lines[1] == "plait: error: worker rank 1 failed (exit code 1); its message is above"
    # What was done before the failure is kept: two logged steps and the checkpoint of step 2.
    metrics = [json.loads(line) for line in (tmp_path / "linreg" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    latest = complete_checkpoints(tmp_path / "linreg" / "checkpoints")[-1]
    assert latest.name == "step_00000002"
    read_manifest(latest)  # whole: every file's size and CRC-32 as committed
    if failure != "nonfinite":
        assert "Traceback" in (tmp_path / "linreg" / "error_rank1.txt").read_text()


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_worker_starts(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run's folder would go")
    done, elapsed = run_until_failure(tmp_path, "--set", f"run.out_dir={blocker}")
    assert done.returncode == 1
    assert done.stderr.strip() == f"plait: error: run.out_dir: cannot write to {blocker}/linreg: Not a directory"


def test_a_rank_killed_by_a_signal_says_where_its_threads_were():
    """A fatal signal in a worker (here an abort, as a communication thread's can be) prints each
    thread's Python stack before the process dies (fails without ``faulthandler`` in init)."""
    code = "import os, plait\ndef here():\n    os.abort()\nplait.init()\nhere()\n"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Fatal Python error: Aborted" in done.stderr, done.stderr
    assert 'line 3 in here' in done.stderr, done.stderr
