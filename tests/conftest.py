"""Shared multi-process worlds: each starts once per session (torch processes are slow to start)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.testing import World

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def world2():
    with World(2) as world:
        yield world


@pytest.fixture(scope="session")
def world4():
    with World(4) as world:
        yield world


@pytest.fixture(scope="session")
def solo():
    """The pytest process itself as a world of one: the single-process reference."""
    import plait

    return plait.init(backend="gloo", device="cpu")


def assert_close(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-6, what: str = "") -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{what}{name}: {m}")
