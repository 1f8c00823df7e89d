"""The planner: its memory model against what the engines hold, its profile against counted
FLOPs, the CLI (table, JSON, --plan auto, --measure, calibrate), and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from plait.cli import main as cli
from plait.errors import ConfigError
from plait.plan.cluster import parse_cluster

from conftest import EXAMPLES, make_trainer

SMALL = {"name": "test", "devices_per_node": 4, "memory_bytes": 8e9, "flops": {"fp32": 1e11},
         "intra": {"latency_s": 1e-4, "bandwidth": 1e9}, "inter": {"latency_s": 1e-4, "bandwidth": 1e9}}


def _cluster_file(tmp_path, **changes):
    data = {**SMALL, **changes}
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    path = tmp_path / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def held_while_training(example: str, overrides: list[str], out_dir: str) -> dict:
    """On this rank, one training step of a shipped config: the most bytes autograd held for
    backward at once (every saved tensor's storage counted once while any holds it), the
    optimizer's state and the parameters this rank trains, in bytes."""
    trainer = make_trainer(example, [*overrides, "train.eval_every=0", "run.tensorboard=false"], out_dir, steps=1)
    live: dict[int, list] = {}
    state = {"now": 0, "peak": 0}

    class Held:
        def __init__(self, t):
            # a detached alias: holding a saved output itself would tie it to its own node in a
            # cycle that only that node's release breaks (ZB-H1's input pass keeps nodes that no
            # later pass runs; they are freed with the graph, which the cycle would keep alive)
            self.t, self.key = t.detach(), t.untyped_storage()._cdata
            entry = live.setdefault(self.key, [0, t.untyped_storage().nbytes()])
            if entry[0] == 0:
                state["now"] += entry[1]
                state["peak"] = max(state["peak"], state["now"])
            entry[0] += 1

        def __del__(self):
            entry = live[self.key]
            entry[0] -= 1
            if entry[0] == 0:  # forgotten: a later storage may be given this one's address
                state["now"] -= entry[1]
                del live[self.key]

    params = {p.untyped_storage()._cdata for p in trainer.parallel.stage_module.parameters()}
    params |= {p.untyped_storage()._cdata for p in trainer.parallel.parameters()}

    def pack(t):
        return t if t.untyped_storage()._cdata in params else Held(t)

    def unpack(h):
        return h.t if isinstance(h, Held) else h
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        trainer.fit()
    optimizer = sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.numel() > 1)
    trained = sum(p.numel() * p.element_size() for p in trainer.parallel.parameters())
    return {"activations": state["peak"], "optimizer": optimizer, "trained": trained, "stage": trainer.parallel.pipe.stage}


def _predicted(example: str, overrides: list[str], world: int):
    from plait.plan import plan_config
    from plait.plan.cluster import Cluster, Link
    from plait.train.config import load_config

    cfg = load_config(EXAMPLES / f"{example}.toml", overrides)
    cluster = Cluster("test", world, 1e12, {"fp32": 1e11}, Link(1e-4, 1e9), Link(1e-4, 1e9))
    ranked, _ = plan_config(cfg, world, cluster)
    p = cfg.parallel
    want = (p.dp or world // (p.pp * p.tp), p.pp, p.tp, p.zero, cfg.pipeline.microbatches if p.pp > 1 else 1,
            cfg.pipeline.schedule if p.pp > 1 else "1f1b", cfg.train.recompute, p.reshard_after_forward or p.zero < 3,
            cfg.pipeline.virtual if p.pp > 1 else 1)
    return next(e for e in ranked if (e.candidate.dp, e.candidate.pp, e.candidate.tp, e.candidate.zero,
                                      e.candidate.microbatches, e.candidate.schedule, e.candidate.recompute,
                                      e.candidate.reshard, e.candidate.virtual) == want)


GPT = ["model.args.layers=2", "train.batch_size=16", "pipeline.microbatches=4", "parallel.tp=1"]
LAYOUTS = {
    "dp2": ("gpt_hybrid", [*GPT, "parallel.pp=1"]),
    "dp2-zero1": ("gpt_hybrid", [*GPT, "parallel.pp=1", "parallel.zero=1"]),
    "dp2-zero2": ("gpt_hybrid", [*GPT, "parallel.pp=1", "parallel.zero=2"]),
    "dp2-zero3": ("gpt_hybrid", [*GPT, "parallel.pp=1", "parallel.zero=3"]),
    "tp2": ("gpt_hybrid", [*GPT, "parallel.pp=1", "parallel.tp=2"]),
    "pp2-gpipe": ("gpt_hybrid", [*GPT, "parallel.pp=2", 'pipeline.schedule="gpipe"']),
    "pp2-1f1b": ("gpt_hybrid", [*GPT, "parallel.pp=2", 'pipeline.schedule="1f1b"']),
    "pp2-zbh1": ("gpt_hybrid", [*GPT, "parallel.pp=2", 'pipeline.schedule="zbh1"']),  # holds each graph until W
    "pp2-gpipe-v2": ("gpt_hybrid", [*GPT, "parallel.pp=2", 'pipeline.schedule="gpipe"', "pipeline.virtual=2"]),
    "pp2-1f1b-v2": ("gpt_hybrid", [*GPT, "parallel.pp=2", 'pipeline.schedule="1f1b"', "pipeline.virtual=2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_model_matches_what_the_engines_hold(name, world2, tmp_path):
    """On each rank, against its stage's prediction: the activations autograd keeps for backward
    (under each ZeRO stage and schedule, split by tp or not; on every pipeline stage) within 10%; the optimizer state and
    the parameters it trains within a part in a thousand (ZeRO pads its slices). Recomputation is
    not measured here: torch.utils.checkpoint's own hooks hide what it keeps from this one."""
    example, overrides = LAYOUTS[name]
    measured = world2.run(held_while_training, example, overrides, str(tmp_path))
    e = _predicted(example, overrides, 2)
    for rank, got in enumerate(measured):
        model = e.stages[got["stage"]]
        what = (name, rank, got, model)
        assert got["activations"] == pytest.approx(model["activations"], rel=0.10), what
        assert got["optimizer"] == pytest.approx(model["optimizer"], rel=1e-3), what
        assert got["trained"] == pytest.approx(model["optimizer"] / 2, rel=1e-3), what  # AdamW: 2 per element


def test_zero3_without_prefetch_is_planned_with_one_unit_whole():
    """``parallel.prefetch = false``: the plan holds one whole unit (the largest block) instead of
    two, as the engine does (tests/test_zero.py counts the engine's)."""
    from plait.plan.profile import profile_config
    from plait.train.config import load_config

    overrides = LAYOUTS["dp2-zero3"][1]
    on = _predicted("gpt_hybrid", overrides, 2).stages[0]
    off = _predicted("gpt_hybrid", [*overrides, "parallel.prefetch=false"], 2).stages[0]
    profile, _ = profile_config(load_config(EXAMPLES / "gpt_hybrid.toml", overrides))
    assert on["params"] - off["params"] == pytest.approx(max(b.params for b in profile.blocks) * 4, rel=1e-12)


def test_zero3_keeping_units_whole_is_planned_with_the_model_whole():
    """``parallel.reshard_after_forward = false``: the plan holds every unit whole (the stage's
    parameters beside its slices) and gathers them once a step without a pipeline, in the forward
    (tests/test_hybrid.py counts the engine's gathers under each schedule against the planner's)."""
    from plait.plan.profile import profile_config
    from plait.train.config import load_config

    overrides = LAYOUTS["dp2-zero3"][1]
    on = _predicted("gpt_hybrid", overrides, 2)
    off = _predicted("gpt_hybrid", [*overrides, "parallel.reshard_after_forward=false"], 2)
    profile, _ = profile_config(load_config(EXAMPLES / "gpt_hybrid.toml", overrides))
    params = sum(b.params for b in profile.blocks)
    assert off.stages[0]["params"] == pytest.approx((params / 2 + params) * 4, rel=1e-12)
    assert off.time["zero_gather"] < on.time["zero_gather"]


def test_the_plan_weighs_keeping_zero3_units_whole(tmp_path):
    """Every ZeRO-3 layout is planned both ways (units freed after their forward, or kept whole
    into backward: ``no-reshard``), no other layout is; keeping them is faster and holds more, so
    where memory is short the plan takes the default; and a layout's ``--set`` values give the
    trainer the setting the plan weighed."""
    from plait.plan import plan_config
    from plait.plan.cluster import load_cluster
    from plait.train.config import load_config

    cfg = load_config(EXAMPLES / "gpt_hybrid.toml", [])
    ranked, _ = plan_config(cfg, 4, load_cluster(str(_cluster_file(tmp_path))))
    by = {e.candidate: e for e in ranked}
    kept = [e for e in ranked if not e.candidate.reshard]
    assert kept and all(e.candidate.zero == 3 for e in kept)
    assert len(kept) == sum(e.candidate.zero == 3 for e in ranked) / 2
    for e in kept:
        default = by[replace(e.candidate, reshard=True)]
        assert e.step_s < default.step_s and e.memory_bytes > default.memory_bytes, e.candidate.describe()
        assert e.candidate.describe() == default.candidate.describe().replace("ZeRO-3", "ZeRO-3 no-reshard")
        for c in (e.candidate, default.candidate):
            p = load_config(EXAMPLES / "gpt_hybrid.toml", c.overrides()).parallel
            assert (p.dp, p.pp, p.tp, p.zero, p.reshard_after_forward) == (c.dp, c.pp, c.tp, c.zero, c.reshard)

    pick = min(kept, key=lambda e: e.step_s)  # memory between the two: only the default fits
    default = by[replace(pick.candidate, reshard=True)]
    memory = (pick.memory_bytes + default.memory_bytes) / 2
    tight = load_cluster(str(_cluster_file(tmp_path, memory_bytes=memory)))
    only = {e.candidate: e for e in plan_config(cfg, 4, tight)[0]}
    assert not only[pick.candidate].fits and only[default.candidate].fits


def test_the_plan_weighs_chunks_per_stage(tmp_path):
    """GPipe and 1F1B are weighed with 2, 4 and 8 chunks per stage too, where pp x chunks is at
    most the blocks, there are at least pp micro-batches (1F1B: divisible by pp) and the model
    is Plait's chain to cut; a layout's ``--set`` values train those chunks; on devices of their
    own (no shared cores) v chunks cut the bubble v-fold."""
    from plait.plan import plan_config
    from plait.plan.cluster import load_cluster
    from plait.train.config import load_config

    cluster = load_cluster(str(_cluster_file(tmp_path)))
    cfg = load_config(EXAMPLES / "gpt_hybrid.toml", [])  # 6 blocks: pp=2 takes 2 chunks, pp=4 none
    ranked, _ = plan_config(cfg, 4, cluster)
    chunked = [e.candidate for e in ranked if e.candidate.virtual > 1]
    assert chunked and {c.virtual for c in chunked} == {2} and {c.pp for c in chunked} == {2}
    assert all(c.schedule in ("gpipe", "1f1b") and c.microbatches >= c.pp for c in chunked)
    assert all(c.microbatches % c.pp == 0 for c in chunked if c.schedule == "1f1b")
    by = {e.candidate: e for e in ranked}
    for c in chunked:
        assert load_config(EXAMPLES / "gpt_hybrid.toml", c.overrides()).pipeline.virtual == 2
        one = by[replace(c, virtual=1)]
        assert by[c].time["bubble"] < one.time["bubble"]
    bigger = plan_config(load_config(EXAMPLES / "gpt_hybrid.toml", ["model.args.layers=14"]), 4, cluster)[0]
    assert {e.candidate.virtual for e in bigger if e.candidate.pp == 2} == {1, 2, 4, 8}
    assert {e.candidate.virtual for e in bigger if e.candidate.pp == 4} == {1, 2, 4}
    # a model whose own forward runs its blocks (pipeline.blocks) holds one chunk per stage
    own = plan_config(load_config(EXAMPLES / "my_model.toml", []), 4, cluster)[0]
    assert any(e.candidate.pp > 1 for e in own) and all(e.candidate.virtual == 1 for e in own)


def test_zero3_backwards_that_find_the_last_unit_whole():
    """ZeRO-3 keeps a stage's last unit whole from a forward into a backward that comes right
    after it: 1F1B's steady state (all but stage s's p - s - 1 warm-up micro-batches), GPipe's first
    backward only, every backward without a pipeline."""
    from plait.plan.cost import _kept

    m, p = 8, 4
    assert [_kept("1f1b", m, p, s) for s in range(p)] == [(m - (p - s - 1),) for s in range(p)]
    assert [_kept("zbh1", m, p, s) for s in range(p)] == [(m - (p - s - 1),) for s in range(p)]
    assert [_kept("gpipe", m, p, s) for s in range(p)] == [(1,)] * p
    # with two chunks (one engine each) a backward finds its chunk's last unit whole when that
    # chunk last ran a forward: looped GPipe's first backward of each chunk (the engines' own
    # counts under a pipeline, with chunks too: tests/test_hybrid.py)
    assert [_kept("gpipe", m, p, s, 2) for s in range(p)] == [(1, 1)] * p


def test_zero3_layouts_hold_the_runtime_calibrated_under_zero3(tmp_path):
    """A cluster file's ``zero3_base_memory_bytes`` is ZeRO-3's runtime memory (plait train returns
    freed blocks to the system there); every other layout holds ``base_memory_bytes``; without
    the field ZeRO-3 holds the same as the others."""
    from plait.plan import plan_config
    from plait.plan.cluster import load_cluster
    from plait.train.config import load_config

    cfg = load_config(EXAMPLES / "mlp_10m.toml", [])
    for zero3 in (1.5e8, None):
        extra = {} if zero3 is None else {"zero3_base_memory_bytes": zero3}
        cluster = load_cluster(str(_cluster_file(tmp_path, base_memory_bytes=4e8, **extra)))
        runtime = {e.candidate.zero: e.memory["runtime"] for e in plan_config(cfg, 4, cluster=cluster)[0]}
        assert runtime == {0: 4e8, 1: 4e8, 2: 4e8, 3: zero3 or 4e8}, runtime


def test_the_fits_fixed_part_bounds_what_the_weights_cost(tmp_path):
    """Calibration fits a pass as FLOPs / rate + a fixed part. That part holds the weights' reads
    (at the optimizer's bandwidth) and a cost per operation; where it is smaller than the reads
    alone, the reads are all of it (the blocks read faster than the optimizer streams), and the
    planner charges no more than was measured."""
    from plait.plan.calibrate import split_intercept

    weight_bytes, ops, bandwidth = 120e6, 40, 3e9  # reads: 0.04 s at that bandwidth
    op_cost, reads_at = split_intercept(0.05, weight_bytes, ops, bandwidth)
    assert reads_at == bandwidth and op_cost == pytest.approx(0.01 / ops)
    op_cost, reads_at = split_intercept(0.01, weight_bytes, ops, bandwidth)
    assert op_cost == 0 and weight_bytes / reads_at == pytest.approx(0.01)
    assert split_intercept(-0.5, weight_bytes, ops, bandwidth) == (0.0, pytest.approx(1000 * bandwidth))

    from plait.plan import plan_config
    from plait.plan.cluster import load_cluster
    from plait.train.config import load_config

    cfg = load_config(EXAMPLES / "mlp_10m.toml", [])
    steps = {}
    for faster in (None, 4 * 3e9):  # the same cluster, its passes reading weights 4x the optimizer's rate
        extra = {} if faster is None else {"weights_bandwidth": faster}
        cluster = load_cluster(str(_cluster_file(tmp_path, memory_bandwidth=3e9, **extra)))
        steps[faster] = {e.candidate.describe(): e.step_s for e in plan_config(cfg, 4, cluster=cluster)[0]}
    assert all(steps[12e9][k] < steps[None][k] for k in steps[None])


def test_pass_scale_is_interpolated_between_the_calibrated_sizes(tmp_path):
    """``pass_scale``: the blocks' measured time over the fitted line at each calibrated number
    of samples per micro-batch; linear in log(samples) between them, the nearest beyond them;
    a plan's passes at those sizes are scaled by it, and without it by nothing."""
    from plait.plan import plan_config
    from plait.plan.cluster import load_cluster
    from plait.train.config import load_config

    cluster = load_cluster(str(_cluster_file(tmp_path, pass_scale={"1": 0.8, "4": 1.2, "16": 1.0})))
    assert cluster.scale_at(1) == 0.8 and cluster.scale_at(4) == 1.2 and cluster.scale_at(16) == 1.0
    assert cluster.scale_at(2) == pytest.approx(1.0) and cluster.scale_at(8) == pytest.approx(1.1)  # halfway in log
    assert cluster.scale_at(0.5) == 0.8 and cluster.scale_at(64) == 1.0
    assert load_cluster(str(_cluster_file(tmp_path))).scale_at(3) == 1.0

    cfg = load_config(EXAMPLES / "mlp_10m.toml", [])
    plans = {}
    for scale in ({"1": 2.0}, {}):  # every pass twice as long, or as fitted
        cluster = load_cluster(str(_cluster_file(tmp_path, pass_scale=scale)))
        plans[bool(scale)] = {e.candidate.describe(): e for e in plan_config(cfg, 4, cluster=cluster)[0]}
    for name, e in plans[False].items():
        slow = plans[True][name]
        assert slow.step_s > e.step_s and slow.memory_bytes == e.memory_bytes


def test_profile_counts_what_torch_counts():
    """The GPT's profile: FLOPs equal FlopCounterMode's count of the whole model, parameters
    the model's, and each block all-reduces twice forward and twice backward under tp."""
    from plait.observe.flops import count_flops
    from plait.plan.profile import profile_config
    from plait.train.config import load_config
    from plait.train.tasks import build_task

    cfg = load_config(EXAMPLES / "gpt_hybrid.toml", [])
    profile, model = profile_config(cfg)
    task = build_task(cfg.data.name, cfg.data.path, cfg.data.args, cfg.train.loss)
    assert profile.flops_per_sample == pytest.approx(count_flops(model, task.sample(2)), rel=1e-9)
    assert profile.params == sum(p.numel() for p in model.parameters())
    assert [b.tp_calls for b in profile.blocks[1:-1]] == [4] * 4
    assert profile.blocks[-1].tp_calls == 1 + 3  # the head's input gradient; the vocab-parallel loss


def test_plan_json_lists_every_layout_and_marks_one(tmp_path, capsys):
    path = _cluster_file(tmp_path)
    assert cli(["plan", str(EXAMPLES / "gpt_hybrid.toml"), "--nproc", "4", "--cluster", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    keys = {"dp", "pp", "tp", "zero", "microbatches", "schedule", "recompute", "fits", "memory_bytes", "step_s",
            "tflops_per_device", "chosen"}
    assert all(keys <= set(r) for r in rows)
    assert [r["chosen"] for r in rows].count(True) == 1 and rows[0]["chosen"]
    assert {(r["dp"], r["pp"], r["tp"]) for r in rows} == {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2),
                                                         (1, 1, 4)}
    assert all(r["dp"] * r["pp"] * r["tp"] == 4 for r in rows)
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)  # all fit: fastest first


def test_plan_table_explains_and_crosses_nodes(capsys):
    """A GPT too wide for one node's tp: the shipped A100 file, the reasons under the table."""
    args = ["plan", str(EXAMPLES / "gpt_hybrid.toml"), "--nproc", "8", "--nnodes", "2", "--cluster", "a100-80gb",
            "--set", "model.args.dim=256", "--set", "model.args.heads=16", "--top", "0"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert " wins: " in out and "slower, mostly" in out
    assert "pp=1 tp=16" in out


def test_a_model_that_fits_no_layout_says_what_is_short(tmp_path, capsys):
    path = _cluster_file(tmp_path, memory_bytes=1e5)
    assert cli(["plan", str(EXAMPLES / "gpt_hybrid.toml"), "--nproc", "2", "--cluster", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("plait: error: plan: no layout fits in 0.1 MB of memory per device")
    assert " short, most of it " in err


@pytest.mark.parametrize("change, message", [
    ({"memory_bytes": None}, "missing field 'memory_bytes'"),
    ({"devices_per_node": -8}, "devices_per_node must be positive, got -8"),
    ({"intra": {"latency_s": 1e-5}}, "[intra]: missing field 'bandwidth'"),
    ({"inter": {"latency_s": -1, "bandwidth": 1e9}}, "latency_s must be >= 0, got -1"),
    ({"flops": {"efficiency": 0.5}}, "missing table [flops] with fp32 and/or bf16"),
    ({"overlap": 2}, "overlap must be between 0 and 1, got 2"),
    ({"optimizer_tensor_s": -1e-5}, "optimizer_tensor_s must be >= 0, got -1e-05"),
    ({"zero3_base_memory_bytes": -1}, "zero3_base_memory_bytes must be >= 0, got -1"),
    ({"weights_bandwidth": 0}, "weights_bandwidth must be positive, got 0"),
    ({"pass_scale": {"0": 1.2}}, "pass_scale: keys are samples per micro-batch (whole numbers from 1), got '0'"),
    ({"pass_scale": {"4": -1}}, "pass_scale: 4 must be positive, got -1"),
    ({"microbatch_overhead_s": {"zb": 1e-3}}, "microbatch_overhead_s: expected seconds per schedule (gpipe, 1f1b, zbh1)"),
    ({"bandwith": 1}, "unknown field 'bandwith'"),
])
def test_bad_cluster_file_is_one_line_naming_the_field(change, message, tmp_path, capsys):
    data = {k: v for k, v in {**SMALL, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=None) as err:
        parse_cluster(data, "cluster file X")
    assert message in str(err.value)
    path = _cluster_file(tmp_path, **{k: v for k, v in change.items() if v is not None})
    if change.get("memory_bytes", 0) is None:
        path.write_text(path.read_text().replace("memory_bytes = 8000000000.0\n", ""))
    assert cli(["plan", str(EXAMPLES / "linreg.toml"), "--nproc", "2", "--cluster", str(path)]) == 1
    assert message in capsys.readouterr().err


def test_plan_auto_trains_the_chosen_layout(tmp_path):
    """``plait train --plan auto``: the layout is printed with its reason, then trained."""
    path = _cluster_file(tmp_path)
    done = subprocess.run([sys.executable, "-m", "plait.cli", "train", str(EXAMPLES / "mlp_pipeline.toml"), "--nproc",
                           "2", "--plan", "auto", "--cluster", str(path), "--set", "train.steps=4", "--set",
                           "run.progress=false", "--set", f'run.out_dir="{tmp_path}"', "--set", "pipeline.trace=false"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("plait: plan: ")]
    assert len(lines) >= 2 and " wins: " in lines[1]
    summary = json.loads((tmp_path / "mlp_pipeline" / "summary.json").read_text())
    chosen = lines[0].removeprefix("plait: plan: ").split(" (")[0]
    dp, pp = (int(part.split("=")[1]) for part in chosen.split()[:2])
    assert summary["layout"].startswith(f"dp={dp} x pp={pp}"), (summary["layout"], chosen)


def test_calibrate_then_measure(tmp_path):
    """``plait calibrate`` writes a cluster file the planner reads; ``--measure 1`` trains the best
    and the worst layout and prints each error."""
    out = tmp_path / "cluster.toml"
    linreg = str(EXAMPLES / "linreg.toml")
    # 3 processes: an odd world leaves a rank out of the pairs and groups of 2, which must not hang it
    done = subprocess.run([sys.executable, "-m", "plait.cli", "calibrate", linreg, "--nproc", "3", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from plait.plan.cluster import load_cluster

    cluster = load_cluster(str(out))
    assert cluster.devices_per_node == 3 and cluster.flops["fp32"] > 0 and cluster.base_memory_bytes > 1e8
    assert cluster.zero3_base_memory_bytes > 1e8  # linreg trained with ZeRO-3 too
    assert cluster.optimizer_tensor_s > 0  # the trainer's optimizer span is more than linreg's few elements' bytes
    assert cluster.recompute_factor > 0  # the step with the blocks recomputed was measured slower
    assert set(cluster.schedule_overhead_s) == {"gpipe", "1f1b", "zbh1"}  # each schedule's own cost per micro-batch
    assert cluster.weight_reads() >= cluster.memory_bandwidth  # the optimizer's, or faster where the fit says so
    assert {1, 2, 4}.issubset(cluster.pass_scale) and all(r > 0 for r in cluster.pass_scale.values())
    assert set(cluster.intra.ops) == {"all_reduce", "all_gather", "reduce_scatter", "send_recv"}
    rows = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-m", "plait.cli", "plan", linreg, "--nproc", "2", "--cluster", str(out),
                           "--measure", "1", "--measure-steps", "4", "--measure-json", str(rows)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(rows.read_text())
    assert len(measured) == 2 and all(r["step_s"] > 0 and r["memory_bytes"] > 1e8 for r in measured)
    assert "median |error|" in done.stdout
