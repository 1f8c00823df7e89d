"""Config: TOML + --set overrides; unknown keys and bad values name the key."""

import pytest

from plait.distributed.mesh import resolve_degrees
from plait.errors import ConfigError, PlaitError
from plait.train.config import load_config

from conftest import EXAMPLES


def test_shipped_configs_load():
    cfg = load_config(EXAMPLES / "digits_cnn.toml")
    assert cfg.model.name == "digits_cnn" and cfg.run.name == "digits_cnn"
    assert load_config(EXAMPLES / "linreg.toml").data.args["features"] == 8


def test_overrides_are_typed():
    cfg = load_config(EXAMPLES / "linreg.toml", ["train.lr=0.5", "train.steps=3", "run.name=x",
                                                  "parallel.allow_unused=true", "data.args.noise=0.2"])
    assert (cfg.train.lr, cfg.train.steps, cfg.run.name, cfg.parallel.allow_unused) == (0.5, 3, "x", True)
    assert cfg.data.args["noise"] == 0.2
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize("override, key", [
    ("train.lrate=0.1", "train.lrate: unknown key"),
    ("bogus.x=1", "bogus: unknown key"),
    ("train.steps=0", "train.steps: must be >= 1"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("train.bf16=1", "train.bf16: expected true or false"),
    ("train.optimizer=rmsprop", "train.optimizer: 'rmsprop' is not one of"),
    ("data.partition=random", "data.partition"),
    ("parallel.strategy=gossip", "parallel.strategy"),
    ("parallel.zero=4", "parallel.zero: ZeRO stages are 0"),
    ("pipeline.schedule=zb", "pipeline.schedule: 'zb' is not one of gpipe, 1f1b, zbh1"),
    ("pipeline.virtual=0", "pipeline.virtual: must be >= 1, got 0"),
    ("pipeline.virtual=2 pipeline.schedule=zbh1",
     "pipeline.virtual: 2 chunks per stage run under pipeline.schedule = 'gpipe' or '1f1b', not 'zbh1'"),
    ("dist.timeout=-1", "dist.timeout"),
    ("train", "expected KEY=VALUE"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(EXAMPLES / "linreg.toml", override.split())


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_mesh_degrees():
    assert resolve_degrees(8, dp=0, pp=2, tp=2) == {"dp": 2, "pp": 2, "tp": 2}
    assert resolve_degrees(4) == {"dp": 4, "pp": 1, "tp": 1}
    with pytest.raises(PlaitError, match="dp=2 x pp=1 x tp=1 = 2 processes, but the world size is 4"):
        resolve_degrees(4, dp=2)
    with pytest.raises(PlaitError, match="world size 6 is not divisible"):
        resolve_degrees(6, dp=0, pp=4)
    with pytest.raises(PlaitError, match="only one of"):
        resolve_degrees(6, dp=0, pp=0)


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=2", "parallel.pp=2"], ["parallel.zero=2", "parallel.pp=2"], ["parallel.zero=3", "parallel.tp=2"],
    ["parallel.zero=1", "checkpoint.every=5"], ["parallel.pp=2", "train.accum_steps=2"],
    ["parallel.tp=2", "train.grad_clip=1.0"], ["parallel.zero=3", "train.accum_steps=2"],
], ids=lambda o: ",".join(o))
def test_every_layout_combination_is_a_valid_config(overrides):
    """Refused in earlier versions; they compose now (tests/test_hybrid.py trains each)."""
    load_config(EXAMPLES / "digits_cnn.toml", overrides)


PS = "parallel.strategy=ps"


@pytest.mark.parametrize("overrides, key", [
    (["ps.mode=async"], "ps: ps.\\* options are set but parallel.strategy is 'allreduce'"),
    ([PS, "ps.mode=gossip"], "ps.mode: 'gossip' is not one of sync, async, ssp"),
    ([PS, "ps.servers=0"], "ps.servers: must be >= 1"),
    ([PS, "ps.partition=random"], "ps.partition"),
    ([PS, "ps.staleness=-1"], "ps.staleness: must be >= 0"),
    ([PS, "parallel.pp=2"], "parallel.pp: not available with parallel.strategy = 'ps'"),
    ([PS, "checkpoint.every=5"], "checkpoint: not available with parallel.strategy = 'ps'"),
    ([PS, "ps.timeout=400"], "ps.timeout: 400 s must be shorter than dist.timeout \\(300 s\\)"),
])
def test_parameter_server_options_are_checked(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(EXAMPLES / "linreg.toml", overrides)


@pytest.mark.parametrize("overrides, world, key", [
    ([], 1, "ps.servers: 1 server\\(s\\) in a world of 1 leaves no worker; start at least 2 processes"),
    (["ps.servers=2"], 3, None),
    (["parallel.dp=3"], 3, "parallel.dp: 3, but 3 processes with 1 server\\(s\\) make 2 data-parallel workers"),
    (["train.batch_size=769"], 3, "train.batch_size: 769 is not divisible by 2 workers"),
    (["ps.straggler=0"], 3, "ps.straggler: rank 0 is not a worker \\(workers are ranks 1..2\\)"),
])
def test_parameter_server_world_is_checked(overrides, world, key):
    from plait.train.ps import check_world

    cfg = load_config(EXAMPLES / "linreg.toml", [PS, *overrides])
    if key is None:
        assert check_world(cfg, world) == world - cfg.ps.servers
    else:
        with pytest.raises(ConfigError, match=key):
            check_world(cfg, world)
