"""Shared multi-process worlds: each starts once per session (torch processes are slow to start)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.testing import World

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STEPS = 6


def make_trainer(example: str, overrides: list[str], out_dir: str, steps: int = STEPS, log_every: int = 1):
    """The trainer of a shipped config on this rank (of a World, or in-process), not yet run."""
    import plait
    from plait.train.config import load_config
    from plait.train.trainer import Trainer

    info = plait.init()
    cfg = load_config(EXAMPLES / f"{example}.toml", [
        f"train.steps={steps}", f"run.log_every={log_every}", "run.progress=false", f"run.out_dir={out_dir}",
        *overrides])
    return Trainer(cfg, info)


def train_example(example: str, overrides: list[str], out_dir: str, steps: int = STEPS):
    """Run a shipped config (on every rank of a World, or in-process); return
    (parameters, logged losses of rank 0). Importable, so World workers can run it."""
    trainer = make_trainer(example, overrides, out_dir, steps)
    trainer.fit()
    params = trainer.parallel.unsplit_parameters()  # the whole model, assembled from every rank's share
    return params, [r["loss"] for r in trainer.log.records] if trainer.log else None


@pytest.fixture(scope="session")
def world2():
    with World(2) as world:
        yield world


@pytest.fixture(scope="session")
def world3():
    with World(3) as world:
        yield world


@pytest.fixture(scope="session")
def world4():
    with World(4) as world:
        yield world


@pytest.fixture(scope="session")
def world8():
    with World(8) as world:
        yield world


@pytest.fixture(scope="session")
def solo():
    """The pytest process itself as a world of one: the single-process reference."""
    import plait

    return plait.init(backend="gloo", device="cpu")


def train_summary(example: str, overrides: list[str], out_dir: str, steps: int, log_every: int | None = None):
    """Train a shipped config on every rank; (summary, rank 0's records or None)."""
    trainer = make_trainer(example, overrides, out_dir, steps, log_every or steps)
    summary = trainer.fit()
    return summary, trainer.log.records if trainer.log else None


def train_until_error(example: str, overrides: list[str], out_dir: str) -> str:
    """``train_example`` that returns the PlaitError it stopped with (or "no error")."""
    from plait.errors import PlaitError

    try:
        train_example(example, overrides, out_dir)
    except PlaitError as exc:
        return str(exc)
    return "no error"


def assert_close(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-6, what: str = "",
                 scaled: bool = False, by_norm: bool = False) -> None:
    """Per-tensor closeness. ``scaled``: the absolute tolerance is ``rtol`` times the tensor's
    largest magnitude (split reductions round elements near zero differently). ``by_norm``: the
    relative error of the whole tensor, ||actual - expected|| <= rtol * ||expected||."""
    assert actual.keys() == expected.keys()
    for name in expected:
        if by_norm:
            error = (actual[name] - expected[name]).norm().item()
            assert error <= rtol * expected[name].norm().item(), f"{what}{name}: relative error {error / expected[name].norm():.2e}"
            continue
        tol = max(atol, rtol * expected[name].abs().max().item()) if scaled else atol
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=tol, msg=lambda m: f"{what}{name}: {m}")


def worker_pid(marker: str, rank: int) -> int | None:
    """The pid of the training process (``python -m plait.train.worker``, not a guard around
    it) of ``rank`` whose command line holds ``marker``."""
    import os

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        module = args[args.index(b"-m") + 1] if b"-m" in args[:-1] else b""  # torchrun adds -u before -m
        if module == b"plait.train.worker" and any(marker.encode() in a for a in args) \
                and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


def wait_until(run, ready, what: str, timeout: float = 120) -> None:
    """Wait until ``ready()`` while ``run`` (a ``subprocess.Popen``) is still going."""
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert run.poll() is None and time.monotonic() < deadline, what
        time.sleep(0.02)


def kill_worker_when(run, ready, name: str, rank: int, what: str) -> tuple[str, str]:
    """Wait until ``ready()``, SIGKILL the training process of ``rank`` in the run ``name``, let
    the run (a ``subprocess.Popen`` of ``plait train``) finish; its (stdout, stderr)."""
    import os
    import signal

    wait_until(run, ready, what)
    pid = worker_pid(name, rank)
    assert pid is not None, f"no training process of rank {rank}"
    os.kill(pid, signal.SIGKILL)
    return run.communicate(timeout=240)


# /proc/net/tcp{,6} spellings of 127.0.0.1, ::1 and ::ffff:127.0.0.1
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def listening_addresses(pid: int | str = "self") -> list[str]:
    """Local addresses of the listening TCP sockets of process ``pid``, from /proc."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found
