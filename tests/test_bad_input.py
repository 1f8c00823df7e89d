"""Fuzzing the launcher's checks: truncated, bit-flipped and wrong-typed configs, manifests and
checkpoint files are each refused with one line (a PlaitError), and nothing is written.

``plait.cli._check`` is what ``plait train`` runs before any worker starts; the end-to-end tests
in test_cli.py show that its PlaitError reaches the user as one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from plait.cli import _check
from plait.errors import PlaitError

from conftest import EXAMPLES, train_example

CONFIGS = ["digits_cnn", "linreg", "mlp_pipeline", "gpt_tp"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused_in_one_line(config: Path, overrides: list[str], world_size: int = 2) -> str | None:
    """None if ``_check`` accepts; the message if it refuses with one line; fails otherwise."""
    try:
        _check(str(config), overrides, world_size)
    except PlaitError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"
        return message
    return None


def flips(data: bytes, count: int, seed: int):
    """``count`` copies of ``data``, each with one bit flipped at a seeded random place."""
    rng = random.Random(seed)
    for _ in range(count):
        at = rng.randrange(len(data))
        yield at, data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]


@pytest.mark.parametrize("example", CONFIGS)
def test_damaged_configs_are_refused_in_one_line(example, tmp_path):
    original = (EXAMPLES / f"{example}.toml").read_bytes()
    out = tmp_path / "out"
    overrides = [f"run.out_dir={out}"]
    mutants = [original[:cut] for cut in range(0, len(original), max(1, len(original) // 60))]
    mutants += [mutant for _, mutant in flips(original, 150, seed=len(original))]
    mutants += [b"\x00\xff" * 20, original.replace(b"=", b"= [", 1), b"[model]\nargs = 3\n"]
    refused = 0
    for i, mutant in enumerate(mutants):
        config = tmp_path / f"m{i}.toml"
        config.write_bytes(mutant)
        if refused_in_one_line(config, overrides) is not None:
            refused += 1
            assert not out.exists(), f"mutant {i} was refused after writing"
        else:
            import shutil

            shutil.rmtree(out, ignore_errors=True)  # an accepted mutant may create the run folder
    assert refused >= len(mutants) // 3, "most damage must be noticed"


def _keys(table: dict, prefix: str = ""):
    for key, value in table.items():
        if isinstance(value, dict) and key not in ("args",):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


WRONG = {bool: ["3", '"yes"'], int: ["1.5", '"two"', "true", "[1]"], float: ['"fast"', "true", "[0.1]"],
         str: ["3", "true", "[1, 2]"], list: ["3", '"x"'], dict: ["3", '"x"']}


def test_every_key_with_a_wrong_type_is_refused_naming_it(tmp_path):
    from plait.train.config import Config

    out = tmp_path / "out"
    for key, default in _keys(Config().to_dict()):
        for bad in WRONG[type(default)]:
            message = refused_in_one_line(EXAMPLES / "linreg.toml", [f"run.out_dir={out}", f"{key}={bad}"], 1)
            assert message is not None and message.startswith(key), (key, bad, message)
    for key in ("model.args.hidden", "data.args.block_size"):  # the args tables, by their defaults' types
        message = refused_in_one_line(EXAMPLES / "mlp_pipeline.toml" if "model" in key else EXAMPLES / "gpt_tp.toml",
                                      [f"{key}=12x", f"run.out_dir={out}"], 2)
        assert message is not None and message.startswith(f"{key}: expected an integer"), message
    assert not out.exists()


@pytest.fixture(scope="module")
def checkpoint(solo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck")
    train_example("linreg", ["checkpoint.every=3", f"checkpoint.dir={out}/ck"], str(out), 3)
    return out / "ck" / "step_00000003"


def damaged_checkpoints(path: Path):
    """(file, damaged bytes) pairs: truncations, bit flips and wrong-typed manifest entries."""
    for name in ("manifest.json", ".metadata", "__0_0.distcp"):
        data = (path / name).read_bytes()
        for cut in (0, 1, len(data) // 2, len(data) - 1):
            yield name, data[:cut]
        for _, mutant in flips(data, 40, seed=len(data)):
            yield name, mutant
    from plait.train.checkpoint import _MANIFEST_KEYS, _manifest_crc

    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in manifest.items():
        for bad in (None, "3", [value], {"x": value}, True):
            yield "manifest.json", json.dumps({**manifest, key: bad}).encode()
            if key in _MANIFEST_KEYS or key == "optimizer":  # wrong types behind a valid checksum
                edited = {**manifest, key: bad}
                yield "manifest.json", json.dumps({**edited, "crc32": _manifest_crc(edited)}).encode()
        yield "manifest.json", json.dumps({k: v for k, v in manifest.items() if k != key}).encode()
    yield "manifest.json", b"[]"
    yield "manifest.json", b'{"format": 1}'
    yield "manifest.json", b"\xff\xfe"


def test_damaged_checkpoints_are_refused_in_one_line_before_any_worker(checkpoint, tmp_path):
    out = tmp_path / "out"
    overrides = [f"checkpoint.resume={checkpoint}", f"run.out_dir={out}"]
    assert refused_in_one_line(EXAMPLES / "linreg.toml", overrides, 1) is None  # undamaged: accepted
    import shutil

    shutil.rmtree(out)
    before = snapshot(checkpoint.parent)
    count = 0
    for name, damaged in damaged_checkpoints(checkpoint):
        original = (checkpoint / name).read_bytes()
        if damaged == original:
            continue
        (checkpoint / name).write_bytes(damaged)
        try:
            message = refused_in_one_line(EXAMPLES / "linreg.toml", overrides, 1)
        finally:
            (checkpoint / name).write_bytes(original)
        assert message is not None, f"{name} damaged ({len(damaged)} bytes) was accepted"
        assert message.startswith(f"checkpoint {checkpoint}"), message
        count += 1
    assert count > 150
    assert snapshot(checkpoint.parent) == before and not out.exists(), "a refused check wrote something"
