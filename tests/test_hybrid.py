"""Hybrid layouts: every product of dp (or ZeRO), pp and tp trains like one process, and a
checkpoint saved under one layout resumes under any other.

Tolerance: a layout regroups float32 sums (tp all-reduces partial dot products, dp averages
means, micro-batches accumulate), which moves a result by a few ulp (~1e-7 relative). Plain SGD
with momentum carries such differences through 10 steps without amplifying them (momentum 0.9
adds at most ten), so the parameters agree within 1e-5 of each tensor's largest magnitude and
the losses within 1e-5 relative. AdamW divides by the root of a near-zero second moment, which
turns rounding noise on a gradient that is zero in theory (the key bias) into an lr-sized step
on that element: with AdamW, 1e-5 is measured on each tensor as a whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLES, assert_close, make_trainer, train_example

STEPS = 10
GPT = ["data.args.max_chars=6000", "data.args.block_size=16", "model.args.dim=32", "model.args.layers=2",
       "train.batch_size=8", "train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9", "pipeline.microbatches=2",
       "pipeline.trace=false"]
CLIP = "train.grad_clip=0.1"  # below the GPT's gradient norm at every one of these steps: it always clips
ACCUM = "train.accum_steps=2"

# (world, layout options, options the one-process reference shares)
CASES = {
    "dp2xpp2-1f1b": ("world4", ["parallel.pp=2"], [CLIP]),
    "dp2xpp2-gpipe": ("world4", ["parallel.pp=2", "pipeline.schedule=gpipe"], [ACCUM]),
    "dp2xtp2": ("world4", ["parallel.tp=2"], [CLIP]),
    "pp2xtp2-1f1b": ("world4", ["parallel.pp=2", "parallel.tp=2"], [CLIP, ACCUM]),
    "pp2xtp2-gpipe": ("world4", ["parallel.pp=2", "parallel.tp=2", "pipeline.schedule=gpipe"], [CLIP]),
    "zero1xtp2": ("world4", ["parallel.zero=1", "parallel.tp=2"], [CLIP]),
    "zero2xtp2": ("world4", ["parallel.zero=2", "parallel.tp=2"], [ACCUM]),
    "zero3xtp2": ("world4", ["parallel.zero=3", "parallel.tp=2"], [CLIP, ACCUM]),
    "zero1xpp2-1f1b": ("world4", ["parallel.zero=1", "parallel.pp=2"], [ACCUM]),
    "zero1xpp2-gpipe": ("world4", ["parallel.zero=1", "parallel.pp=2", "pipeline.schedule=gpipe"], [CLIP]),
    "zero2xpp2-1f1b": ("world4", ["parallel.zero=2", "parallel.pp=2"], [CLIP, ACCUM]),
    "zero2xpp2-gpipe": ("world4", ["parallel.zero=2", "parallel.pp=2", "pipeline.schedule=gpipe"], [CLIP]),
    "zero3xpp2-1f1b": ("world4", ["parallel.zero=3", "parallel.pp=2"], [CLIP]),
    "zero3xpp2-gpipe": ("world4", ["parallel.zero=3", "parallel.pp=2", "pipeline.schedule=gpipe"], [ACCUM]),
    "dp2xpp2-zbh1": ("world4", ["parallel.pp=2", "pipeline.schedule=zbh1"], [ACCUM]),
    "pp2xtp2-zbh1": ("world4", ["parallel.pp=2", "parallel.tp=2", "pipeline.schedule=zbh1"], [CLIP]),
    "zero2xpp2-zbh1": ("world4", ["parallel.zero=2", "parallel.pp=2", "pipeline.schedule=zbh1"], [ACCUM]),
    "zero3xpp2-zbh1": ("world4", ["parallel.zero=3", "parallel.pp=2", "pipeline.schedule=zbh1"], [CLIP, ACCUM]),
    "pp2-zbh1-recompute": ("world4", ["parallel.pp=2", "pipeline.schedule=zbh1", "train.recompute=true"], [CLIP]),
    "dp2xpp2-interleaved": ("world4", ["parallel.pp=2", "pipeline.virtual=2"], [ACCUM]),
    "pp2xtp2-interleaved": ("world4", ["parallel.pp=2", "parallel.tp=2", "pipeline.virtual=2"], [CLIP]),
    "zero2xpp2-looped-gpipe": ("world4", ["parallel.zero=2", "parallel.pp=2", "pipeline.virtual=2",
                                          "pipeline.schedule=gpipe"], [CLIP]),
    "zero3xpp2-interleaved": ("world4", ["parallel.zero=3", "parallel.pp=2", "pipeline.virtual=2"], [CLIP, ACCUM]),
    # ZeRO-3 keeping units whole into backward (dp2 x pp2 under each schedule: test_zero3_keeping_units...)
    "zero3xtp2-kept": ("world4", ["parallel.zero=3", "parallel.tp=2", "parallel.reshard_after_forward=false"],
                       [CLIP, ACCUM]),
    "zero3xpp2-interleaved-kept": ("world4", ["parallel.zero=3", "parallel.pp=2", "pipeline.virtual=2",
                                              "parallel.reshard_after_forward=false"], [CLIP]),
    "dp2xpp2xtp2-1f1b": ("world8", ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2"], [CLIP]),
    "dp2xpp2xtp2-gpipe": ("world8", ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "pipeline.schedule=gpipe"],
                          [ACCUM]),
}

_references: dict[tuple, tuple] = {}


def reference(example: str, options: list[str], out_dir: str):
    """The one-process run of these options (in the test process), computed once: its
    parameters, its losses and its summary."""
    key = (example, *options)
    if key not in _references:
        params, losses = train_example(example, options, out_dir, STEPS)
        summary = json.loads((Path(out_dir) / example / "summary.json").read_text())
        _references[key] = params, losses, summary
    return _references[key]


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_layout_equals_one_process(case, request, solo, tmp_path):
    world_name, layout, shared = CASES[case]
    expected, expected_losses, _ = reference("gpt_tp", [*GPT, *shared], str(tmp_path / "one"))
    results = request.getfixturevalue(world_name).run(train_example, "gpt_tp", [*GPT, *shared, *layout],
                                                      str(tmp_path), STEPS)
    for rank, (params, _) in enumerate(results):
        assert_close(params, expected, what=f"{case}, rank {rank}: ", scaled=True)
    assert len(results[0][1]) == STEPS
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(expected_losses), rtol=1e-5, atol=0)


def kept_units_run(overrides: list[str], out_dir: str):
    """Train the GPT: (parameters, losses, each chunk's all-gathers in its training steps, its
    units per chunk, its stage, each chunk's all-gathers in the steps after the first)."""
    trainer = make_trainer("gpt_tp", overrides, out_dir, STEPS)

    def gathered() -> list[int]:
        return [sum(u.gathers for u in w.units) for w in trainer.parallel.wrappers]
    before = gathered()  # the trainer's set-up gathers each unit once
    first: list[int] = []
    trainer.optimizer.register_step_post_hook(lambda *_: first or first.extend(gathered()))
    trainer.fit()  # its steps, and the final evaluation's gathers, counted again here and taken off
    after_fit = gathered()
    trainer._evaluate()
    gathers = [2 * a - e - b for a, e, b in zip(after_fit, gathered(), before)]
    units = [len(w.units) for w in trainer.parallel.wrappers]
    params = trainer.parallel.unsplit_parameters()
    later = [g - (f - b) for g, f, b in zip(gathers, first, before)]
    return params, [r["loss"] for r in trainer.log.records] if trainer.log else None, gathers, units, \
        trainer.parallel.pipe.stage, later


@pytest.mark.parametrize("schedule, virtual", [("gpipe", 1), ("1f1b", 1), ("zbh1", 1), ("gpipe", 2), ("1f1b", 2)])
def test_zero3_keeping_units_whole_under_a_pipeline(schedule, virtual, world4, solo, tmp_path):
    """``parallel.reshard_after_forward = false`` on dp=2 x pp=2 (with two chunks per stage too):
    trains like one process, and each chunk gathers its units as often as the planner counts (a
    forward after a pass of its chunk that reduced gradients, or a backward or weight pass after
    one: tests/test_zero.py counts one process's)."""
    from plait.plan.cost import _gathers_keeping_units

    shared = [CLIP, ACCUM] if schedule == "zbh1" else [CLIP]
    layout = ["parallel.zero=3", "parallel.pp=2", f"pipeline.schedule={schedule}", f"pipeline.virtual={virtual}",
              "parallel.reshard_after_forward=false", "parallel.check_consistency=false"]
    expected, expected_losses, _ = reference("gpt_tp", [*GPT, *shared], str(tmp_path / "one"))
    results = world4.run(kept_units_run, [*GPT, *shared, *layout], str(tmp_path))
    k = 2 if ACCUM in shared else 1
    for rank, (params, _, gathers, units, stage, _) in enumerate(results):
        assert_close(params, expected, what=f"{schedule}, rank {rank}: ", scaled=True)
        counts = _gathers_keeping_units(schedule, 2, 2, stage, virtual)  # per chunk: (forwards, backwards)
        assert gathers == [STEPS * k * sum(count) * n for count, n in zip(counts, units, strict=True)], \
            (rank, stage, gathers, units, counts)
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(expected_losses), rtol=1e-5, atol=0)


@pytest.mark.parametrize("schedule, virtual", [("gpipe", 1), ("1f1b", 1), ("zbh1", 1), ("gpipe", 2), ("1f1b", 2)])
def test_zero3_gathers_under_a_pipeline_as_planned(schedule, virtual, world4, tmp_path):
    """ZeRO-3 freeing units after their forward, on dp=2 x pp=2 (two chunks per stage too): each
    chunk gathers every unit in each forward and backward, but for its last unit in a backward
    whose chunk last ran a forward, as the planner counts, in every step after the first (which
    learns the forward order, and keeps nothing until it knows it). Its training is compared
    with one process in CASES."""
    from plait.plan.cost import _kept

    layout = ["parallel.zero=3", "parallel.pp=2", f"pipeline.schedule={schedule}", f"pipeline.virtual={virtual}",
              "parallel.check_consistency=false"]
    m = 2  # GPT's micro-batches
    for rank, (*_, units, stage, later) in enumerate(world4.run(kept_units_run, [*GPT, *layout], str(tmp_path))):
        kept = _kept(schedule, m, 2, stage, virtual)
        assert later == [(STEPS - 1) * (2 * m * n - k) for k, n in zip(kept, units, strict=True)], \
            (rank, stage, later, units, kept)


def test_cnn_zero2_x_pipeline_equals_one_process(world4, solo, tmp_path):
    options = ["train.optimizer=sgd", "train.momentum=0.9", CLIP]
    expected, expected_losses, _ = reference("digits_cnn", options, str(tmp_path / "one"))
    results = world4.run(train_example, "digits_cnn", [*options, "parallel.zero=2", "parallel.pp=2",
                                                       "pipeline.microbatches=4"], str(tmp_path), STEPS)
    for rank, (params, _) in enumerate(results):
        assert_close(params, expected, what=f"rank {rank}: ", scaled=True)
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(expected_losses), rtol=1e-5, atol=0)


def _without_key_bias(params: dict) -> dict:
    out = dict(params)
    for name, value in params.items():
        if name.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[name] = torch.cat([q, v])
    return out


@pytest.mark.parametrize("layout", [["parallel.pp=2", "parallel.tp=2"], ["parallel.zero=3", "parallel.tp=2"]],
                         ids=["pp2xtp2", "zero3xtp2"])
def test_skip_nonfinite_skips_alike_on_every_rank(layout, world4, solo, tmp_path):
    """A learning rate of 1e30 makes the first step's update overflow the next forward: every
    later step has a non-finite loss and gradients. Every rank of these layouts skips them, as
    one process does, and ends with its parameters (the ranks agree through one all-reduce of
    their finite flags; here every rank sees the overflow, so this checks the skipping, and the
    rest of the step staying in step, under each layout)."""
    options = [*GPT, "train.lr=1e30", "train.skip_nonfinite=true"]
    expected, _, one = reference("gpt_tp", options, str(tmp_path / "one"))
    results = world4.run(train_example, "gpt_tp", [*options, *layout], str(tmp_path), STEPS)
    for rank, (params, _) in enumerate(results):
        assert_close(params, expected, what=f"rank {rank}: ", scaled=True)
    assert one["skipped_steps"] == STEPS - 1
    assert json.loads((tmp_path / "gpt_tp" / "summary.json").read_text())["skipped_steps"] == STEPS - 1


# -- checkpoints move between layouts ------------------------------------------------------------
CHAIN = [  # (world, layout): each runs two steps from the previous one's checkpoint
    ("world4", ["parallel.tp=2"]),                      # dp2 x tp2
    ("solo", []),                                       # one process
    ("world4", ["parallel.pp=2", "parallel.tp=2", "pipeline.virtual=2"]),  # pp2 (2 chunks each) x tp2
    ("world4", ["parallel.zero=3"]),                    # dp4, ZeRO-3
    ("world4", ["parallel.tp=2"]),                      # and back to dp2 x tp2
]


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adamw"])
def test_checkpoint_resumes_on_every_other_layout(optimizer, world4, solo, tmp_path, capsys):
    base = [*GPT, *(["train.optimizer=adamw", "train.lr=0.003"] if optimizer == "adamw" else [])]
    ck = ["checkpoint.every=2", f"checkpoint.dir={tmp_path}/ck"]
    expected, expected_losses, _ = reference("gpt_tp", base, str(tmp_path / "one"))
    losses = []
    for i, (world_name, layout) in enumerate(CHAIN):
        run, steps = [*base, *ck, *layout, *(["checkpoint.resume=latest"] if i else [])], 2 * (i + 1)
        if world_name == "solo":
            params, logged = train_example("gpt_tp", run, str(tmp_path / f"part{i}"), steps)
        else:
            results = world4.run(train_example, "gpt_tp", run, str(tmp_path / f"part{i}"), steps)
            params, logged = results[0]
        losses += logged
    assert steps == STEPS
    if optimizer == "adamw":  # the key bias (middle third of qkv.bias) has no gradient in theory; Adam
        # steps on its rounding noise, differently in each layout: compare the query and value biases
        assert_close(_without_key_bias(params), _without_key_bias(expected), what="after every layout: ", by_norm=True)
    else:
        assert_close(params, expected, what="after every layout: ", scaled=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=0)
    manifest = json.loads((tmp_path / "ck" / f"step_{2 * len(CHAIN):08d}" / "manifest.json").read_text())
    assert manifest["layout"] == "dp=2 x pp=1 x tp=2"

    # and the last checkpoint, exported, is the unsplit model's state_dict
    from plait.cli import main
    from plait.models import build_model
    from plait.train.config import load_config
    from plait.train.tasks import build_task

    out = tmp_path / "model.pt"
    assert main(["export", str(tmp_path / "ck" / f"step_{2 * len(CHAIN):08d}"), "--config",
                 str(EXAMPLES / "gpt_tp.toml"), *[a for o in GPT for a in ("--set", o)], "-o", str(out)]) == 0
    assert "-> " in capsys.readouterr().out
    cfg = load_config(EXAMPLES / "gpt_tp.toml", GPT)
    model = build_model("gpt", cfg.model.args, build_task(cfg.data.name, "", cfg.data.args).info)
    model.load_state_dict(torch.load(out, weights_only=True))  # strict: every key, no other
    assert_close(dict(model.named_parameters()), params, rtol=0, atol=0)


# -- bad layouts: one line before any worker starts ------------------------------------------------
@pytest.mark.parametrize("example, world, overrides, message", [
    ("gpt_tp", 4, ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2"],
     "mesh: dp=2 x pp=2 x tp=2 = 8 processes, but the world size is 4"),
    ("gpt_tp", 4, ["parallel.tp=4", "model.args.dim=32", "model.args.heads=2", "data.args.max_chars=6000"],
     "tensor parallel: blocks.0.attn: 2 attention heads are not divisible by tp=4"),
    ("gpt_tp", 3, ["parallel.tp=3", "model.args.dim=48", "model.args.heads=3", "data.args.max_chars=6000"],
     "tensor parallel: tok_emb: vocabulary 88 is not divisible by tp=3"),
    ("gpt_tp", 4, ["parallel.pp=4", "model.args.layers=1", "data.args.max_chars=6000"],
     "parallel.pp: 4 stages, but the model (GPT) has only 3 blocks to cut"),
    ("digits_cnn", 2, ["parallel.tp=2"], "parallel.tp: the model (DigitsCNN) has no tensor-parallel plan"),
    ("digits_cnn", 4, ["parallel.pp=2", "pipeline.microbatches=3"],
     "pipeline.microbatches: 3 does not divide each data-parallel rank's 32 samples"),
    ("gpt_tp", 2, ["parallel.pp=2", "model.args.tied=true", "data.args.max_chars=6000"],
     "pipeline: parameter tok_emb.weight is used by stages 0 and 1 (tied weights)"),
    ("gpt_tp", 2, ["parallel.zero=3", "model.args.tied=true", "data.args.max_chars=6000"],
     "ZeRO-3: parameter tok_emb.weight is used by blocks 'embed' and 'head' (tied weights)"),
    ("gpt_tp", 2, ["parallel.pp=2", "pipeline.virtual=2", "pipeline.microbatches=3", "train.batch_size=6",
                   "data.args.max_chars=6000"],
     "pipeline.microbatches: interleaved 1F1B (pipeline.virtual = 2) needs micro-batches divisible by pp (2), got 3"),
    ("gpt_tp", 2, ["parallel.pp=2", "pipeline.virtual=3", "pipeline.microbatches=2", "model.args.layers=1",
                   "data.args.max_chars=6000"],
     "pipeline.virtual: 2 stages x 3 chunks make 6 pieces, but the model (GPT) has only 3 blocks to cut"),
    ("mlp_10m", 4, ["parallel.pp=2", "pipeline.virtual=4", "pipeline.microbatches=4"],
     "pipeline: piece 0 of 8 would hold only blocks without parameters to train ('0' (Flatten)); cut into fewer "
     "pieces (parallel.pp x pipeline.virtual = 8)"),
    ("mlp_10m", 4, ["parallel.pp=4", "model.args.depth=1"],
     "pipeline: stage 0 would hold only blocks without parameters to train ('0' (Flatten)); cut into fewer "
     "pieces (parallel.pp = 4)"),
], ids=["product-not-world", "heads", "vocabulary", "pp-over-blocks", "no-plan", "microbatches", "tied-pp", "tied-zero3",
        "interleaved-microbatches", "pieces-over-blocks", "piece-without-parameters", "stage-without-parameters"])
def test_bad_layout_is_refused_before_workers_start(example, world, overrides, message, tmp_path):
    from plait.cli import _check
    from plait.errors import PlaitError

    with pytest.raises(PlaitError) as error:
        _check(str(EXAMPLES / f"{example}.toml"), [*overrides, f"run.out_dir={tmp_path}"], world)
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)
    assert not any((tmp_path / example).glob("*")), "nothing written but the writability probe"


# -- memory: each rank materialises only what it holds --------------------------------------------
def _model_memory(tmp_path, nproc: int, options: list[str]) -> dict:
    import os
    import subprocess
    import sys

    from conftest import ROOT

    sets = ["parallel.pp=1", "model.args.hidden=2048", "model.args.depth=8", "train.optimizer=adam",
            "train.steps=2", "run.progress=false", "pipeline.trace=false", f"run.out_dir={tmp_path}", *options]
    # glibc keeps freed blocks under 32 MiB for reuse, so a process's resident set would also count
    # what it once held; with a fixed threshold it returns them, and RSS measures what a rank holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    done = subprocess.run([sys.executable, "-m", "plait.cli", "train", str(EXAMPLES / "mlp_pipeline.toml"),
                           "--nproc", str(nproc), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, cwd=ROOT, timeout=240, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "mlp_pipeline" / "summary.json").read_text())


def test_zero3_and_pipeline_ranks_hold_a_fraction_of_the_model(tmp_path):
    """A 30.5M-parameter MLP (8 layers of 2048) with Adam: one process holds 16 bytes per
    parameter (0.49 GB) in parameters, gradients and moments. ZeRO-3 on 4 ranks holds a quarter
    of each, plus while it computes one layer whole, its gradient and the previous layer's in
    reduction (4 x 17 MB); pp=4 holds two of the eight layers with their state. Each rank builds
    the model on the meta device and gives memory only to its part, so the largest rank's growth
    from just before the model is built (torch and the data excluded, which every process pays
    alike) is expected near 0.35 of the one-process growth; the bound is the issue's 0.45.
    Built whole on every rank and then split, pp=4 grows by 0.50 of it (measured, by breaking
    the meta build), ZeRO-3 by the whole model's parameters more than here.
    ZeRO-3's prefetch (the default) holds the next layer whole too: one layer more (measured
    +15.5 to +19.7 MB, once +28.8 MB: two runs' RSS differ by more than their tensors), so the
    bound is checked on ZeRO-3 without it (`parallel.prefetch = false`, the setting for the least
    memory), and with it against the bound plus one layer's 16.8 MB (tests/test_zero.py counts
    the units whole exactly: two with prefetch, one without)."""
    one = _model_memory(tmp_path / "one", 1, [])["model_rss_bytes"]
    assert one > 400e6, f"the one-process run grew by {one / 1e6:.0f} MB only"
    grown, layer = {}, (2048 * 2048 + 2048) * 4
    for name, options in {"ZeRO-3": ["parallel.zero=3", "parallel.prefetch=false"],
                          "ZeRO-3 prefetching": ["parallel.zero=3"],
                          "pp=4": ["parallel.pp=4", "pipeline.microbatches=4"]}.items():
        grown[name] = _model_memory(tmp_path / name, 4, options)["model_rss_bytes"]
        bound = 0.45 * one + (layer if name == "ZeRO-3 prefetching" else 0)
        assert grown[name] <= bound, (f"{name}: the largest rank grew by {grown[name] / 1e6:.0f} MB, over "
                                      f"{bound / 1e6:.0f} MB (one process grew by {one / 1e6:.0f} MB)")


def test_shipped_hybrid_config_trains_and_resumes_on_another_layout(tmp_path):
    """examples/gpt_hybrid.toml through the real CLI: pp=2 x tp=2 on 4 processes (dp=2 on 8), a
    checkpoint at the end, resumed on 2 processes as dp=1 x tp=2 with --resume."""
    import subprocess
    import sys

    from conftest import ROOT
    from plait.cli import _check
    from plait.parallel.compose import Layout

    config = str(EXAMPLES / "gpt_hybrid.toml")
    for nproc, dp in ((4, 1), (8, 2)):
        assert Layout.from_config(_check(config, [f"run.out_dir={tmp_path}"], nproc), nproc).dp == dp
    short = ["data.args.max_chars=6000", "model.args.dim=32", "run.progress=false", f"run.out_dir={tmp_path}"]

    def train(nproc: int, *more: str) -> dict:
        sets = [*short, *more]
        done = subprocess.run([sys.executable, "-m", "plait.cli", "train", config, "--nproc", str(nproc),
                               *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, cwd=ROOT,
                              timeout=240)
        assert done.returncode == 0, done.stderr
        return json.loads((tmp_path / "gpt_hybrid" / "summary.json").read_text())

    first = train(4, "train.steps=4")
    assert first["layout"] == "dp=1 x pp=2 x tp=2" and (tmp_path / "gpt_hybrid" / "checkpoints" / "step_00000004").is_dir()
    resumed = train(2, "train.steps=6", "parallel.pp=1", "checkpoint.resume=latest")
    assert resumed["layout"] == "dp=1 x pp=1 x tp=2" and resumed["resumed_from_step"] == 4


def test_export_of_a_model_with_tied_weights(solo, tmp_path, capsys):
    """A tied weight is saved once, under the first module that holds it (the GPT's tok_emb);
    export loads it there, and the head, which shares it, comes out equal in the state_dict."""
    from plait.cli import main
    from plait.models import build_model
    from plait.train.config import load_config
    from plait.train.tasks import build_task

    tied = [*GPT, "model.args.tied=true"]
    params, _ = train_example("gpt_tp", [*tied, "checkpoint.every=2", f"checkpoint.dir={tmp_path}/ck"], str(tmp_path), 2)
    out = tmp_path / "model.pt"
    assert main(["export", str(tmp_path / "ck" / "step_00000002"), "--config", str(EXAMPLES / "gpt_tp.toml"),
                 *[a for o in tied for a in ("--set", o)], "-o", str(out)]) == 0, capsys.readouterr().err
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["head.weight"], state["tok_emb.weight"])
    cfg = load_config(EXAMPLES / "gpt_tp.toml", tied)
    model = build_model("gpt", cfg.model.args, build_task(cfg.data.name, "", cfg.data.args).info)
    model.load_state_dict(state)
    assert_close(dict(model.named_parameters()), params, rtol=0, atol=0)
