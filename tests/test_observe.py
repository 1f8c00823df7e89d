"""Seeing what training does: lr schedules, TensorBoard events, the per-rank time breakdown, FLOPs
and MFU, the run trace, and ``plait report`` as a browser shows it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.train.schedule import lr_at

from conftest import train_example, train_summary


# -- learning-rate schedules -------------------------------------------------------------------
@pytest.mark.parametrize("schedule, s, expected", [
    # lr 0.1, min_lr 0.01, 10 steps, 2 warmup: warmup 0.1 * (s+1)/3, then p = (s-2)/7
    ("cosine", 0, 0.1 / 3), ("cosine", 1, 0.2 / 3), ("cosine", 2, 0.1),
    ("cosine", 4, 0.01 + 0.09 * (1 + math.cos(math.pi * 2 / 7)) / 2), ("cosine", 9, 0.01),
    ("linear", 2, 0.1), ("linear", 5, 0.1 - 0.09 * 3 / 7), ("linear", 9, 0.01),
    ("constant", 0, 0.1 / 3), ("constant", 2, 0.1), ("constant", 9, 0.1),
])
def test_schedule_values_follow_the_formula(schedule, s, expected):
    assert lr_at(s, 0.1, schedule, steps=10, warmup=2, min_lr=0.01) == pytest.approx(expected, rel=1e-12)


def test_trainer_logs_the_lr_each_step_used_and_resumes_the_schedule_bitwise(world2, tmp_path):
    """Adam under a cosine schedule with warmup, 10 steps on 2 ranks, checkpoints every 4; the
    run resumed from step 4 logs the same lr at each step and ends in the same parameters, bit
    for bit. The lr that step k logs is lr_at(k - 1)."""
    schedule = ["train.optimizer=adam", "train.lr=0.003", "train.lr_schedule=cosine", "train.warmup_steps=3",
                "train.min_lr=0.0003", "checkpoint.every=4", "checkpoint.keep=5", "run.log_every=1"]
    whole_dir = tmp_path / "whole"
    whole = world2.run(train_example, "digits_cnn", [*schedule, f"checkpoint.dir={whole_dir}/ck"], str(whole_dir), 10)[0]
    logged = [json.loads(line) for line in (whole_dir / "digits_cnn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged] == [lr_at(k - 1, 0.003, "cosine", 10, 3, 0.0003) for k in range(1, 11)]
    resumed_dir = tmp_path / "resumed"
    resumed = world2.run(train_example, "digits_cnn", [
        *schedule, f"checkpoint.dir={resumed_dir}/ck", f"checkpoint.resume={whole_dir}/ck/step_00000004"],
        str(resumed_dir), 10)[0]
    for name, value in whole[0].items():
        assert torch.equal(resumed[0][name], value), name
    again = [json.loads(line) for line in (resumed_dir / "digits_cnn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in again] == [r["lr"] for r in logged[4:]]


# -- TensorBoard -------------------------------------------------------------------------------
def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a run folder's event files, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_reads_back_what_metrics_jsonl_holds_and_a_resume_replaces_the_tail(world2, tmp_path):
    out = tmp_path / "tb"
    ck = ["checkpoint.every=3", f"checkpoint.dir={out}/ck", "checkpoint.keep=5", "train.eval_every=3"]
    world2.run(train_summary, "digits_cnn", ck, str(out), 6, 1)
    run = out / "digits_cnn"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = _events(run)
    for key, tag in [("loss", "loss"), ("lr", "lr"), ("samples_per_s", "samples_per_s"), ("time_comm_s", "time/comm"),
                     ("time_forward_s", "time/forward"), ("mfu", "mfu"), ("peak_memory_bytes", "peak_memory_bytes")]:
        expected = [(r["step"], r[key]) for r in records]
        assert [s for s, _ in events[tag]] == [s for s, _ in expected], tag
        for (_, got), (_, want) in zip(events[tag], expected):
            assert got == pytest.approx(want, rel=1e-6), tag  # event files hold float32
    summary = json.loads((run / "summary.json").read_text())
    assert events["test_accuracy"] == [(3, pytest.approx(records[2]["test_accuracy"], rel=1e-6)),
                                       (6, pytest.approx(summary["test_accuracy"], rel=1e-6))]  # step 3, and the end
    assert [s for s, _ in events["time_rank1/comm"]] == list(range(1, 7))
    assert events["rank1/peak_memory_bytes"][0][1] == pytest.approx(records[0]["per_rank"]["peak_memory_bytes"][1], rel=1e-6)
    # Resumed from step 3 in the same folder: TensorBoard drops the first run's steps 4-6 for the new ones.
    world2.run(train_summary, "digits_cnn", [*ck[1:], "checkpoint.every=0", f"checkpoint.resume={out}/ck/step_00000003"],
               str(out), 6, 1)
    steps = [s for s, _ in _events(run)["loss"]]
    assert steps == list(range(1, 7)), steps


def test_resume_keeps_the_records_up_to_its_step_and_drops_a_torn_last_line(tmp_path):
    """A worker killed while rank 0 wrote a line leaves it torn: resuming drops it (a torn line
    elsewhere is corruption, and says so)."""
    from plait.train.metrics import RunLog

    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    log = RunLog(str(tmp_path), "run", resume_step=2, tensorboard=False)
    log.log({"step": 3, "loss": 0.5})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.5}]
    path.write_text('{"step": 1, "lo\n' + json.dumps({"step": 2}) + "\n")
    with pytest.raises(json.JSONDecodeError):
        RunLog(str(tmp_path), "run", resume_step=2, tensorboard=False)


# -- the time breakdown ------------------------------------------------------------------------
NAMED = ("data", "forward", "backward", "comm", "bubble", "optimizer")

LAYOUTS = {
    # (example, overrides, steps): each step long enough (>= ~10 ms here) that the fixed
    # bookkeeping outside the parts (~0.3 ms of Python per step, ~1 ms with 4 micro-batches)
    # stays far under 5% of it.
    "dp2": ("digits_cnn", ["train.batch_size=256"], 12),
    "pp2": ("mlp_pipeline", ["model.args.hidden=512", "train.batch_size=128", "pipeline.trace=false"], 12),
    "zero3": ("digits_cnn", ["parallel.zero=3", "train.batch_size=128"], 12),
    "tp2": ("gpt_tp", ["train.batch_size=16"], 8),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_breakdown_parts_add_up_to_the_step_time(world2, layout, tmp_path):
    example, overrides, steps = LAYOUTS[layout]
    results = world2.run(train_summary, example, overrides, str(tmp_path), steps)
    per_rank = results[0][0]["time_breakdown"]["per_rank"]
    for rank in range(2):
        step = per_rank["step_time_s"][rank]
        named = sum(per_rank[f"time_{p}_s"][rank] for p in NAMED)
        assert 0.95 * step <= named <= step * (1 + 1e-9), f"rank {rank}: parts {named:.5f} s of a {step:.5f} s step"
        assert per_rank["time_forward_s"][rank] > 0 and per_rank["time_backward_s"][rank] > 0
        assert per_rank["peak_memory_bytes"][rank] > 0
    if layout == "pp2":
        assert per_rank["time_bubble_s"][0] > 0 and per_rank["time_comm_s"][0] > 0  # stage 0 waits for gradients
    else:
        assert per_rank["time_bubble_s"] == [0.0, 0.0] and all(c > 0 for c in per_rank["time_comm_s"])


def test_a_slowed_worker_makes_the_others_wait_on_communication(world2, tmp_path):
    """Rank 1 sleeps 40 ms in every forward: rank 0 then waits for it in the gradient all-reduce,
    so rank 0's communication time per step grows by about that much, and rank 1's does not."""
    base = world2.run(train_summary, "digits_cnn", [], str(tmp_path / "base"), 10)[0][0]["time_breakdown"]["per_rank"]
    slow = world2.run(train_summary, "digits_cnn", ["train.straggler=1", "train.straggler_delay=0.04"],
                      str(tmp_path / "slow"), 10)[0][0]["time_breakdown"]["per_rank"]
    assert slow["time_comm_s"][0] - base["time_comm_s"][0] > 0.03, (base["time_comm_s"], slow["time_comm_s"])
    assert slow["time_forward_s"][1] - base["time_forward_s"][1] > 0.035
    assert slow["time_comm_s"][1] < base["time_comm_s"][1] + 0.01


# -- FLOPs and MFU -------------------------------------------------------------------------------
def test_flops_are_counted_exactly_for_the_shipped_models():
    """Forward 2 FLOPs per multiply-add, backward twice that except the first layer's input
    gradient (the input needs none): for layers of m multiply-adds per sample, 6 * sum(m) - 2 * m_first."""
    from plait.models import build_model
    from plait.observe.flops import count_flops
    from plait.train.tasks import build_task

    digits = build_task("digits", "", {}, "auto")
    with torch.device("meta"):
        mlp = build_model("mlp", {"hidden": 64, "depth": 3}, digits.info)
        cnn = build_model("digits_cnn", {}, digits.info)
    linears = [m.in_features * m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert count_flops(mlp, digits.sample(4)) == 6 * sum(linears) - 2 * linears[0]
    # The seed CNN: conv 1->10 k5 on 28x28 (24x24 out), conv 10->20 k5 on 12x12 (8x8 out), fc 320->50, fc 50->10.
    conv1, conv2 = 10 * 1 * 25 * 24 * 24, 20 * 10 * 25 * 8 * 8
    assert count_flops(cnn, digits.sample(4)) == 6 * (conv1 + conv2 + 320 * 50 + 50 * 10) - 2 * conv1
    text = build_task("text", "", {"block_size": 32}, "auto")
    with torch.device("meta"):
        gpt = build_model("gpt", {"layers": 2, "dim": 64, "heads": 4}, text.info)
    # Per token: 6 x the parameters that multiply (all but the embeddings), plus attention's
    # QK^T and AV: 2 matmuls x 2 FLOPs x 3 (forward, backward) x T x dim per layer.
    weights = sum(m.weight.numel() for m in gpt.modules() if isinstance(m, torch.nn.Linear))
    per_token = 6 * weights + 12 * 2 * 32 * 64
    assert count_flops(gpt, text.sample(2)) / 32 == pytest.approx(per_token, rel=0.05)


def test_mfu_is_achieved_flops_over_the_peak(solo, tmp_path):
    summary, records = train_summary("digits_cnn", ["run.peak_flops=1e11"], str(tmp_path), 6, 3)
    tb = summary["time_breakdown"]
    per_device = summary["flops_per_sample"] * 64 / tb["step_time_s"]  # one process: the whole batch
    assert tb["flops_per_s"] == pytest.approx(per_device, rel=1e-12)
    assert summary["mfu"] == pytest.approx(per_device / 1e11, rel=1e-12)
    assert summary["peak_flops_source"] == "run.peak_flops"
    assert all(0 < r["mfu"] < 1 for r in records)
    measured, _ = train_summary("digits_cnn", [], str(tmp_path / "measured"), 2)
    assert measured["peak_flops_source"].startswith("measured (1024x1024 float32 matmul")
    assert 1e8 < measured["peak_flops_per_s"] < 1e13


# -- the run trace -------------------------------------------------------------------------------
def test_trace_has_every_rank_with_compute_and_communication_spans(world2, tmp_path):
    world2.run(train_summary, "mlp_pipeline", ["run.trace=true", "run.trace_steps=2", "pipeline.microbatches=2",
                                               "pipeline.trace=false"], str(tmp_path), 6)
    trace = json.loads((tmp_path / "mlp_pipeline" / "trace.json").read_text())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "rank 0 (dp=0, pp=0, tp=0)", 1: "rank 1 (dp=0, pp=1, tp=0)"}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for rank in (0, 1):
        mine = [e for e in spans if e["pid"] == rank]
        steps = [e for e in mine if e["cat"] == "step"]
        assert [e["name"] for e in steps] == ["step 2", "step 3"]
        assert {e["name"] for e in mine if e["cat"] == "forward"} == {"F0", "F1"}
        assert {e["name"] for e in mine if e["cat"] == "backward"} == {"B0", "B1"}
        assert any(e["cat"] == "bubble" and "pipeline receive" in e["name"] for e in mine)
        for e in mine:  # every span lies inside one of the traced steps
            assert any(s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 1e-3 for s in steps), e


def test_trace_of_data_parallel_names_the_gradient_all_reduce(world2, tmp_path):
    world2.run(train_summary, "digits_cnn", ["run.trace=true"], str(tmp_path), 5)
    spans = [e for e in json.loads((tmp_path / "digits_cnn" / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    for rank in (0, 1):
        assert [e["name"] for e in spans if e["pid"] == rank and e["cat"] == "step"] == ["step 2", "step 3", "step 4"]
        assert any(e["name"].startswith("gradient all-reduce (bucket 1 of") for e in spans if e["pid"] == rank)


# -- plait report, as a browser shows it -----------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ["Runs", "Loss and test metrics", "Throughput and MFU", "Where the time goes, per rank",
            "Peak memory per rank", "Pipeline timeline", "Configuration differences"]
PLOTS = ["plot-loss", "plot-throughput", "plot-breakdown", "plot-memory", "plot-pipeline-1"]

# Appended to a copy of the page by the test only: where each plot lies, in the DOM.
MEASURE = """<script>
const out = document.createElement('pre'); out.id = 'measured';
const rects = {};
for (const img of document.querySelectorAll('img.plot')) {
  const r = img.getBoundingClientRect();
  rects[img.id] = [r.left, r.top, r.width, r.height, img.naturalWidth];
}
out.textContent = JSON.stringify({rects, height: document.documentElement.scrollHeight});
document.body.appendChild(out);
</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--force-device-scale-factor=1", "--window-size=1400,2000", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def two_runs(world2, tmp_path_factory):
    """A data-parallel and a pipeline run (with its traced step), on 2 ranks each."""
    out = tmp_path_factory.mktemp("report_runs")
    world2.run(train_summary, "digits_cnn", ["train.eval_every=10"], str(out), 30, 5)
    world2.run(train_summary, "mlp_pipeline", [], str(out), 30, 5)
    return out


def test_report_renders_its_plots_in_headless_chromium(two_runs, tmp_path):
    assert CHROMIUM, "chromium is needed to check the report as a browser shows it (make test installs it)"
    from PIL import Image

    page = tmp_path / "report.html"
    done = subprocess.run([str(Path(__file__).parents[1] / ".venv" / "bin" / "plait"), "report",
                           str(two_runs / "digits_cnn"), str(two_runs / "mlp_pipeline"), "-o", str(page)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "plait: report of 2 runs ->" in done.stdout, done.stderr
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch: it opens from disk
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", MEASURE + "</body>"))
    dom = _chromium("--dump-dom", probe.as_uri()).stdout
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in dom, heading
    measured = json.loads(dom.split('<pre id="measured">')[1].split("</pre>")[0].replace("&quot;", '"'))
    rects = measured["rects"]
    assert set(PLOTS) <= set(rects), rects.keys()
    height = int(measured["height"]) + 10
    shot = tmp_path / "shot.png"
    _chromium(f"--window-size=1400,{height}", f"--screenshot={shot}", page.as_uri())
    image = Image.open(shot).convert("L")
    for plot in PLOTS:
        left, top, width, height, natural = rects[plot]
        assert width > 200 and height > 150 and natural > 0, (plot, rects[plot])  # the image decoded and shows
        region = np.asarray(image.crop((int(left), int(top), int(left + width), int(top + height))))
        inked = (region < 200).mean()  # axes, lines, bars, labels
        assert 0.02 < inked < 0.9, f"{plot}: {inked:.3f} of its pixels are drawn"
    blank = image.crop((0, int(rects["plot-loss"][1]) - 40, 8, int(rects["plot-loss"][1]) - 10))
    assert (np.asarray(blank) > 240).all()  # and the page around them is the white background


def test_report_compares_the_runs_configs(two_runs):
    from plait.observe.report import Run, config_differences

    differences = dict(config_differences([Run(two_runs / "digits_cnn"), Run(two_runs / "mlp_pipeline")]))
    assert differences["model.name"] == ['"digits_cnn"', '"mlp"']
    assert differences["parallel.pp"] == ["1", "2"]
    assert "train.batch_size" not in differences  # the same in both


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    from plait.cli import main

    with pytest.raises(SystemExit):  # no run folder at all: argparse's own line
        main(["report"])
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 1
    assert not (tmp_path / "r.html").exists()
