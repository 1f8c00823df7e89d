"""Pipeline parallelism: schedules, cutting, and training equal to one process."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import plait
from plait.parallel.pipeline import SCHEDULES, PipelineStage, StageModule, blocks_of, bubble_fraction, cut_points
from plait.parallel.pipeline.schedules import VIRTUAL, gpipe, in_flight, one_f_one_b, simulate, zb_h1
from plait.parallel.pipeline.split import backward_input
from plait.parallel.pipeline.trace import ideal_bubble, measured_bubble, replayed_bubble, write_chrome_trace

from conftest import assert_close, train_until_error


# -- schedules and cuts: arithmetic, no processes -------------------------------------------
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("v", [1, 2, 3])
def test_schedules_run_each_microbatch_once_in_order(p, m, v):
    for s in range(p):
        for name, schedule in SCHEDULES.items():
            if v > 1 and (name == "zbh1" or (name == "1f1b" and m % p)):
                with pytest.raises(ValueError):
                    schedule(m, p, s, v)
                continue
            actions = schedule(m, p, s, v)
            backward = ["I", "W"] if name == "zbh1" else ["B"]
            assert sorted(actions) == sorted((k, i, c) for k in ["F", *backward] for i in range(m) for c in range(v)), name
            for i in range(m):  # each micro-batch's passes in order: forward up the chunks, backward down
                for c in range(v):
                    order = [actions.index((k, i, c)) for k in ["F", *backward]]
                    assert order == sorted(order)
                    if c:
                        assert actions.index(("F", i, c - 1)) < actions.index(("F", i, c))
                        assert actions.index((backward[0], i, c)) < actions.index((backward[0], i, c - 1))
                    if i:  # micro-batches in order on each chunk (mb 0 first: it carries the header)
                        assert all(actions.index((k, i - 1, c)) < actions.index((k, i, c)) for k in ["F", *backward])
        if v == 1:
            assert in_flight(gpipe(m, p, s)) == m
            assert in_flight(one_f_one_b(m, p, s)) == min(p - s, m) <= p
            assert in_flight(zb_h1(m, p, s)) <= min(p, m)  # ZB-H1 holds no more than 1F1B's first stage
            assert [a for a in zb_h1(m, p, s) if a[0] != "W"] == [("I", i, c) if k == "B" else (k, i, c)
                                                                 for k, i, c in one_f_one_b(m, p, s)]
        elif m % p == 0:  # interleaving holds more chunks' micro-batches (each a v-th of the stage)
            assert in_flight(one_f_one_b(m, p, s, v)) == min(2 * (p - s - 1) + (v - 1) * p + 1, m * v)


def test_theoretical_bubble():
    assert bubble_fraction(4, 2) == pytest.approx(1 / 5) and bubble_fraction(1, 4) == pytest.approx(3 / 4)
    assert bubble_fraction(4, 2, "zbh1") == pytest.approx(1 / 13)
    assert bubble_fraction(4, 2, "1f1b", v=2) == pytest.approx(1 / 9)


@pytest.mark.parametrize("p, m", [(2, 4), (2, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("v", [1, 2, 3])
def test_schedules_idle_as_theory_says_with_equal_passes(p, m, v):
    """Run on a clock where F, I and W take one unit and B (I and W together) two, each schedule
    idles as its closed form says: (p-1)/(m+p-1), a third of it for ZB-H1, and with v chunks
    per stage (each pass a v-th of the stage's) (p-1)/(vm+p-1)."""
    units = {"F": 1, "B": 2, "I": 1, "W": 1}
    for schedule in SCHEDULES if v == 1 else VIRTUAL:
        idle = simulate(schedule, m, p, lambda s, kind, *_: units[kind], v)
        assert idle == pytest.approx(bubble_fraction(m, p, schedule, v))


def test_a_traced_step_splits_its_bubble_into_engine_spread_and_imbalance():
    """1F1B, p = m = 2, passes of unequal times with gaps between them. Replayed with each
    pass's own time and nothing between (worked by hand): stage 0 F0 [0,1] F1 [1,3] B0 [4,7]
    B1 [9,10], stage 1 F0 [1,3] B0 [3,4] F1 [4,5] B1 [5,9]: busy 7 and 8 of 10, bubble 0.25;
    the measured bubble (the gaps) is larger; the ideal one takes each kind's median time."""
    took = [{("F", 0): 1, ("F", 1): 2, ("B", 0): 3, ("B", 1): 1}, {("F", 0): 2, ("B", 0): 1, ("F", 1): 1, ("B", 1): 4}]
    traces = []
    for s in range(2):
        clock, trace = 0.5 * s, []
        for kind, i, c in SCHEDULES["1f1b"](2, 2, s, 1):
            clock += 1.5  # a gap before every pass, as messages and bookkeeping would leave
            trace.append((kind, i, clock, clock + took[s][(kind, i)], c))
            clock += took[s][(kind, i)]
        traces.append(trace)
    assert replayed_bubble(traces, "1f1b") == pytest.approx(0.25)
    assert measured_bubble(traces) > 0.25
    medians = {"F": 1.5, "B": 2.0}, {"F": 1.5, "B": 2.5}  # each stage's median per kind
    ideal = simulate("1f1b", 2, 2, lambda s, kind, *_: medians[s][kind])
    assert ideal_bubble(traces, "1f1b") == pytest.approx(ideal) and ideal != pytest.approx(0.25)


class _Tied(nn.Module):
    """A weight used twice, on both sides of another layer: its two uses' boundaries share it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(torch.relu(self.b(torch.tanh(self.a(x))))) + self.b.bias


@pytest.mark.parametrize("name", ["mlp", "tied", "conv-norms", "embedding", "data-input"])
def test_split_backward_gives_the_same_gradients_in_two_passes(name):
    """The input's gradient comes from the first pass alone (no parameter has a gradient after
    it); the second adds the parameters' gradients: both as one backward computes them."""
    torch.manual_seed(0)
    model, x = {
        "mlp": lambda: (mlp(), torch.randn(4, 8)),
        "tied": lambda: (_Tied(), torch.randn(4, 8)),
        "conv-norms": lambda: (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                                             nn.LayerNorm(144), nn.Linear(144, 5)), torch.randn(2, 1, 8, 8)),
        "embedding": lambda: (nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 3)), torch.randint(0, 10, (4, 5))),
        "data-input": lambda: (mlp(), torch.randn(4, 8)),
    }[name]()
    wants_grad = x.is_floating_point() and name != "data-input"
    x1 = x.clone().requires_grad_(wants_grad)
    out = model(x1)
    g = torch.randn_like(out)
    out.backward(g)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    x2 = x.clone().requires_grad_(wants_grad)
    out = model(x2)
    (dx,), weights = backward_input((out,), (g,), (x2,), list(model.parameters()))
    assert all(p.grad is None for p in model.parameters()), "the first pass computed weight gradients"
    if wants_grad:
        torch.testing.assert_close(dx, x1.grad, rtol=0, atol=0)
    else:
        assert dx is None
    weights.backward()
    # the same products, summed in the same order, except where a weight's uses add up
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-6, atol=1e-7, msg=n)


def mlp(depth: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 3))


def test_cut_points():
    blocks = blocks_of(mlp())
    assert cut_points(blocks, 2, cuts=[4]) == [0, 4]
    starts = cut_points(blocks, 3)  # by parameter count: Linear blocks weigh, Tanh blocks do not
    weights = [sum(p.numel() for p in b.parameters()) for _, b in blocks]
    parts = [sum(weights[a:b]) for a, b in zip(starts, starts[1:] + [len(blocks)])]
    assert max(parts) <= 2 * min(parts)
    timed = cut_points(blocks, 2, balance="time", sample=(torch.randn(4, 8),))
    assert len(timed) == 2 and 0 < timed[1] < len(blocks)
    with pytest.raises(plait.PlaitError, match="12 stages but the model has only 11 blocks to cut"):
        cut_points(blocks, 12)
    with pytest.raises(plait.PlaitError, match="pipeline.cuts"):
        cut_points(blocks, 3, cuts=[5, 2])


def _batch(step: int, sizes: list[int] | None = None):
    gen = torch.Generator().manual_seed(100 + step)
    n = sizes[step] if sizes else 16
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def reference_training(steps: int, sizes: list[int] | None = None):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x, y = _batch(step, sizes)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return dict(model.named_parameters())


def pipeline_training(steps: int, microbatches: int, schedule: str, v: int = 1, sizes: list[int] | None = None):
    """Every rank is one stage (of v chunks: pieces s, s + p, ... of the model cut in p * v);
    returns its parameters (named as in the whole model)."""
    p, s = dist.get_world_size(), dist.get_rank()
    model = mlp()
    blocks = blocks_of(model)
    starts = cut_points(blocks, p * v) + [len(blocks)]
    chunks = [StageModule(blocks[starts[c * p + s]:starts[c * p + s + 1]]) for c in range(v)]
    module = nn.ModuleList(chunks)
    stage = PipelineStage(chunks if v > 1 else chunks[0], s, p, dist.group.WORLD, loss_fn=F.cross_entropy)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = _batch(step, sizes)
        opt.zero_grad()
        loss = stage.step(x, y, microbatches, schedule)
        losses.append(None if loss is None else loss.item())
        opt.step()
    mine = {id(q) for q in module.parameters()}
    return {n: q.detach() for n, q in model.named_parameters() if id(q) in mine}, stage.max_in_flight, losses, stage.trace


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zbh1"])
@pytest.mark.parametrize("microbatches", [1, 2, 4])
@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_pipeline_training_equals_one_process(world_name, microbatches, schedule, request):
    world = request.getfixturevalue(world_name)
    expected = {n: q.detach() for n, q in reference_training(3).items()}
    results = world.run(pipeline_training, 3, microbatches, schedule)
    merged = {}
    for stage, (params, peak, losses, _) in enumerate(results):
        assert not merged.keys() & params.keys(), "stages must not share parameters"
        merged.update(params)
        p = len(results)
        assert peak == in_flight(SCHEDULES[schedule](microbatches, p, stage))
    assert_close(merged, expected)
    assert results[-1][2][0] is not None and all(r[2][0] is None for r in results[:-1])


@pytest.mark.parametrize("world_name, schedule, microbatches, v", [
    ("world2", "1f1b", 2, 2), ("world2", "1f1b", 4, 3), ("world2", "gpipe", 1, 2),
    ("world4", "1f1b", 4, 2), ("world4", "1f1b", 8, 2), ("world4", "gpipe", 2, 2),
], ids=["pp2-1f1b-m2-v2", "pp2-1f1b-m4-v3", "pp2-gpipe-m1-v2", "pp4-1f1b-m4-v2", "pp4-1f1b-m8-v2", "pp4-gpipe-m2-v2"])
def test_interleaved_pipeline_training_equals_one_process(world_name, schedule, microbatches, v, request, tmp_path):
    """Interleaved 1F1B and looped GPipe: each stage holds v chunks of the model cut into p * v
    pieces; the activations go round the stages v times (p = 2: both directions on one link)."""
    world = request.getfixturevalue(world_name)
    p = int(world_name[-1])
    expected = {n: q.detach() for n, q in reference_training(3).items()}
    results = world.run(pipeline_training, 3, microbatches, schedule, v)
    merged = {}
    for stage, (params, peak, losses, _) in enumerate(results):
        assert not merged.keys() & params.keys(), "stages must not share parameters"
        merged.update(params)
        assert peak == in_flight(SCHEDULES[schedule](microbatches, p, stage, v))
    assert merged.keys() == expected.keys()
    assert_close(merged, expected)
    traces = [r[3] for r in results]  # each stage's passes, by chunk, as the schedule ordered them
    for stage, trace in enumerate(traces):
        assert [(k, i, c) for k, i, _, _, c in trace] == SCHEDULES[schedule](microbatches, p, stage, v)
    assert 0 <= ideal_bubble(traces, schedule) < 1 and 0 <= measured_bubble(traces) < 1  # v read from the chunks
    events = json.loads(write_chrome_trace(traces, tmp_path / "trace.json").read_text())["traceEvents"]
    assert {e["name"] for e in events if e.get("ph") == "X"} == {f"{k}{i}.{c}" for k in "FB" for i in range(microbatches)
                                                                for c in range(v)}


@pytest.mark.parametrize("schedule, v", [("1f1b", 1), ("zbh1", 1), ("1f1b", 2)], ids=["1f1b", "zbh1", "1f1b-v2"])
def test_batches_of_changing_size_between_steps(schedule, v, world2):
    """A step's first activations are received as shaped the step before (a receive posted
    before their header is read); where the batch changed, the sender's filler takes that
    receive and the real ones follow: training still equals one process. Sizes 16 -> 8 (changed),
    8 (as predicted), 16, 12 (changed again); v = 2 sends both ways over one link."""
    sizes = [16, 8, 8, 16, 12]
    expected = {n: q.detach() for n, q in reference_training(5, sizes).items()}
    results = world2.run(pipeline_training, 5, 2, schedule, v, sizes)
    merged = {}
    for params, *_ in results:
        merged.update(params)
    assert_close(merged, expected)


def check_mismatched_stages():
    torch.manual_seed(0)
    blocks = [("0", nn.Linear(8, 16)), ("1", nn.Linear(32, 4))]  # stage 1 expects 32 features, gets 16
    s = dist.get_rank()
    stage = PipelineStage(StageModule(blocks[s:s + 1]), s, 2, dist.group.WORLD, loss_fn=F.cross_entropy)
    try:
        stage.check(torch.randn(4, 8))
    except plait.PlaitError as exc:
        return str(exc)
    return "no error"


def test_mismatched_stages_fail_on_every_rank_before_training(world2):
    for message in world2.run(check_mismatched_stages):
        assert message.startswith("pipeline: stage 1 cannot take the output of stage 0: RuntimeError: mat1 and mat2"), message


# -- through the trainer: dp x pp layouts of the shipped configs ------------------------------
@pytest.mark.parametrize("layout, schedule", [
    ("world2", "1f1b"), ("world2", "gpipe"), ("world4", "1f1b"),
], ids=["pp2-1f1b", "pp2-gpipe", "dp2xpp2-1f1b"])
def test_trainer_pipeline_equals_one_process(layout, schedule, request, solo, tmp_path):
    from conftest import train_example

    world = request.getfixturevalue(layout)
    expected_params, expected_losses = train_example("digits_cnn", [], str(tmp_path / "reference"))
    results = world.run(train_example, "digits_cnn", ["parallel.pp=2", "pipeline.microbatches=4",
                                                      f"pipeline.schedule={schedule}"], str(tmp_path))
    merged = {}
    for params, _ in results:
        for name, value in params.items():  # dp replicas of a stage hold the same values
            merged.setdefault(name, value)
    assert_close(merged, expected_params)
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(expected_losses), rtol=1e-5, atol=1e-7)


def test_shipped_pipeline_config_equals_one_process(world2, solo, tmp_path):
    """examples/mlp_pipeline.toml as shipped (pp=2, 1F1B, 4 micro-batches, momentum, a trace)
    trains exactly like the same config in one process."""
    from conftest import EXAMPLES, train_example
    from plait.train.config import load_config

    assert load_config(EXAMPLES / "mlp_pipeline.toml").parallel.pp == 2
    expected, expected_losses = train_example("mlp_pipeline", ["parallel.pp=1", "pipeline.trace=false"],
                                              str(tmp_path / "one"), 4)
    results = world2.run(train_example, "mlp_pipeline", [], str(tmp_path / "pp2"), 4)
    merged = {name: value for params, _ in results for name, value in params.items()}
    assert_close(merged, expected)
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(expected_losses), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("example, overrides, message", [
    ("linreg", ["parallel.pp=2"], "parallel.pp: the model (LinearRegression) is not a chain of blocks Plait can cut"),
    ("digits_cnn", ["parallel.pp=2", "pipeline.microbatches=5"],
     "pipeline.microbatches: 5 does not divide each data-parallel rank's 64 samples"),
    ("digits_cnn", ["parallel.pp=2", "pipeline.cuts=[9]"], "pipeline.cuts=[9]: need 1 increasing block indices in 1..3"),
], ids=["more-stages-than-blocks", "microbatches-do-not-divide", "bad-cut"])
def test_bad_pipeline_input_fails_before_training_on_every_rank(world2, tmp_path, example, overrides, message):
    for error in world2.run(train_until_error, example, overrides, str(tmp_path)):
        assert error.startswith(message), error


class _Split(nn.Module):
    """Returns a tuple: features and an int64 tensor (no gradient flows through it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x):
        h = self.lin(x)
        return h, h.argmax(1, keepdim=True)  # ([N, 16] float, [N, 1] int64)


class _Join(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(17, 3)

    def forward(self, h, idx):
        return self.lin(torch.cat([torch.tanh(h), idx.float() / 16], dim=1))


def tuple_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_Split(), _Join())


def tuple_pipeline(microbatches: int, schedule: str):
    model, s = tuple_model(), dist.get_rank()
    blocks = blocks_of(model)
    module = StageModule(blocks[s:s + 1])
    stage = PipelineStage(module, s, 2, dist.group.WORLD, loss_fn=F.cross_entropy)
    x, y = _batch(0)
    stage.check(x[:4])
    stage.step(x, y, microbatches, schedule)
    return {f"{blocks[s][0]}.{n}": p.grad for n, p in blocks[s][1].named_parameters()}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_tuple_activations_with_integer_tensors(world2, schedule):
    model = tuple_model()
    x, y = _batch(0)
    F.cross_entropy(StageModule(blocks_of(model))(x), y).backward()  # one stage: the whole model
    expected = {n: p.grad for n, p in model.named_parameters()}
    got = {}
    for grads in world2.run(tuple_pipeline, 4, schedule):
        got.update(grads)
    assert_close(got, expected)


def test_traces_align_on_one_host_only():
    """Stages that entered a step 2 ms apart: on one host their traces shift onto the earliest
    origin (the step then spans from the first start to the last end on one clock); across
    hosts, whose clocks are not comparable, they stay on their own."""
    from plait.parallel.pipeline.trace import aligned

    early = [("F", 0, 0.0, 0.010, 0), ("B", 0, 0.030, 0.050, 0)]
    late = [("F", 0, 0.008, 0.018, 0), ("B", 0, 0.040, 0.050, 0)]  # its own origin 2 ms later
    same = aligned([("a", 5.000, early), ("a", 5.002, late)])
    assert same[0] == early
    assert [k for k, *_ in same[1]] == ["F", "B"]  # times to the rounding of 5.002 - 5.000
    assert [t for _, _, b, e, _ in same[1] for t in (b, e)] == pytest.approx([0.010, 0.020, 0.042, 0.052], abs=1e-12)
    assert measured_bubble(same) > measured_bubble([early, late])  # the step spans 52 ms, not 50
    assert aligned([("a", 5.000, early), ("b", 5.002, late)]) == [early, late]
