"""Bringing your own model and data: code named in the config (examples/my_model.py), and models
nobody here wrote (a transformers Llama and ViT, examples/hf_models.py), train under every layout
they claim exactly like one process.

Tolerance as in test_hybrid: a layout regroups float32 sums (a few ulp, ~1e-7 relative); plain
SGD with momentum carries that through a few steps without amplifying it, so parameters agree
within 1e-5 of each tensor's largest magnitude and losses within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, train_example

STEPS = 4
SGD = ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "pipeline.microbatches=2"]
OPTIONS = {
    "my_model": [*SGD, "train.batch_size=16", "data.args.samples=512"],
    "llama": [*SGD, "train.batch_size=8", "data.args.max_chars=6000", "data.args.block_size=16", "model.args.dim=32",
              "train.eval_every=0"],
    "vit_digits": [*SGD, "train.batch_size=16", "model.args.dim=32", "model.args.layers=2"],
}
DEFERRED = "model.deferred_init=true"  # built on meta, each rank materialising its part (the reference too)
CASES = {  # example: [(world, layout, options the one-process reference shares), ...]
    "my_model": [("world2", ["parallel.zero=3"], []), ("world4", ["parallel.pp=2", "parallel.tp=2"], []),
                 ("world4", ["parallel.zero=3", "parallel.pp=2", "pipeline.schedule=gpipe"], []),
                 ("world4", ["parallel.zero=3", "parallel.tp=2"], [DEFERRED]),
                 ("world2", ["parallel.pp=2"], ["train.loss=tests.own_code:smoothed_cross_entropy"])],
    "llama": [("world2", [], []), ("world2", ["parallel.zero=3"], []), ("world2", ["parallel.tp=2"], []),
              ("world4", ["parallel.pp=2", "parallel.tp=2"], [])],
    "vit_digits": [("world2", [], []), ("world2", ["parallel.tp=2"], []),
                   ("world4", ["parallel.pp=2", "parallel.zero=2"], [])],
}
_references: dict[tuple, tuple] = {}


def _reference(example: str, shared: list[str], out_dir: str):
    key = (example, *shared)
    if key not in _references:
        _references[key] = train_example(example, [*OPTIONS[example], *shared], out_dir, STEPS)
    return _references[key]


def _id(example: str, layout: list[str], shared: list[str]) -> str:
    parts = [o.split("=")[0].split(".")[-1] + o.split("=")[1] for o in layout if "deferred" not in o]
    return f"{example}-{'+'.join(parts) or 'dp'}" + "".join("-" + o.split("=")[0].split(".")[-1] for o in shared)


@pytest.mark.parametrize("example, world_name, layout, shared",
                         [(e, w, l, s) for e, cases in CASES.items() for w, l, s in cases],
                         ids=[_id(e, l, s) for e, cases in CASES.items() for _, l, s in cases])
def test_own_model_layout_equals_one_process(example, world_name, layout, shared, request, solo, tmp_path):
    expected, expected_losses = _reference(example, shared, str(tmp_path / "one"))
    results = request.getfixturevalue(world_name).run(train_example, example, [*OPTIONS[example], *shared, *layout],
                                                      str(tmp_path), STEPS)
    for rank, (params, _) in enumerate(results):
        assert params.keys() == expected.keys()
        assert_close(params, expected, what=f"{example} {layout}, rank {rank}: ", scaled=True)
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(expected_losses), rtol=1e-5, atol=0)


def test_deferred_init_builds_on_meta_and_plain_init_keeps_the_users_own(solo):
    """A user's model is built whole (its __init__'s own initialisation kept) unless it asks for
    the meta-device build; then each module is reset by its seeded reset_parameters()."""
    from plait.models import build_model
    from plait.parallel.materialize import build_deferred, is_meta

    def factory():
        return build_model("tests.own_code:zero_head_net", {}, {})

    whole = build_deferred(factory, seed=0, deferred=False)
    assert not is_meta(whole) and whole.head.weight.abs().sum() == 0  # its own init
    assert is_meta(build_deferred(factory, seed=0, deferred=True))


MY = "examples/my_model.toml"


@pytest.mark.parametrize("overrides, message", [
    (["model.name=nowhere.models:Net"], "model.name: cannot import module 'nowhere.models'"),
    (["model.name=tests.own_code:Nett"], "model.name: module 'tests.own_code' has no attribute 'Nett'"),
    (["model.name=tests.own_code"], "model.name: unknown model 'tests.own_code'"),
    (["model.name=tests.broken_module:Net"], "model.name: importing module 'tests.broken_module' failed: ImportError: "
                                             "cannot import name 'Thing'"),
    (["model.name=tests.own_code:LOSS_NOT_CALLABLE"], "model.name: 'tests.own_code:LOSS_NOT_CALLABLE' is a int, not a callable"),
    (["model.name=tests.own_code:not_a_model", "model.args={}"], "model.name: 'tests.own_code:not_a_model' returned a dict, not a torch.nn.Module"),
    (["model.name=tests.own_code:failing_model", "model.args={}"], "model.name: 'tests.own_code:failing_model' failed: RuntimeError: out of coffee"),
    (["model.args.width=3"], "model.args.width: model 'examples.my_model:Net' takes no such argument (it takes: features, dim, depth, classes)"),
    (["model.args.depth=2.5"], "model.args.depth: expected an integer (default 4), got 2.5"),
    (["data.name=tests.own_code:not_datasets"], "data.name: 'tests.own_code:not_datasets' returned a int; expected (train, test)"),
    (["data.name=tests.own_code:pairs_missing"], "data.name: 'tests.own_code:pairs_missing': its train split's samples are ints"),
    (["data.args.rows=3"], "data.args.rows: dataset 'examples.my_model:data' takes no such argument"),
    (["data.path=x.npz"], "data.path: only the shipped datasets read a file"),
    (["train.loss=hinge"], "train.loss: 'hinge' is not one of auto, cross_entropy, mse, nor package.module:callable"),
    (["train.loss=tests.own_code:nothing"], "train.loss: module 'tests.own_code' has no attribute 'nothing'"),
], ids=["no-module", "no-attribute", "no-colon", "import-fails", "not-callable", "not-a-module", "model-raises",
        "unknown-arg", "arg-type", "data-not-tuple", "data-not-pairs", "data-arg", "data-path", "loss-name", "loss-import"])
def test_bad_own_code_is_one_line_before_workers_start(overrides, message, tmp_path):
    from plait.cli import _check
    from plait.errors import PlaitError

    with pytest.raises(PlaitError) as error:
        _check(MY, [*overrides, f"run.out_dir={tmp_path}"], 2)
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("world, overrides, message", [
    (2, ["parallel.tp=2", "parallel.tp_plan={}", "model.args.depth=2"],
     "parallel.tp: the model (Net) has no tensor-parallel plan; say how to split it in the config: parallel.tp_plan"),
    (2, ["parallel.pp=2", "pipeline.blocks=''"],
     "parallel.pp: the model (Net) is not a chain of blocks Plait can cut; name its ModuleList of layers in the config: "
     "pipeline.blocks"),
    (2, ["parallel.tp=2", "parallel.tp_plan={\"blocks.*.up\"=\"colwise\"}"],
     "tensor parallel plan: pattern 'blocks.*.up' matches no module of Net"),
    (2, ["parallel.tp=2", "parallel.tp_plan={\"layers.*.up\"=\"vocab\"}"],
     "tensor parallel plan: layers.0.up is a Linear, style 'vocab' needs an Embedding"),
    (3, ["parallel.tp=3"], "tensor parallel: layers.0.up: output features 128 is not divisible by tp=3"),
    (2, ["parallel.tp=2", "parallel.tp_plan={\"layers.*.up\"=\"sideways\"}"],
     "parallel.tp_plan.'layers.*.up': unknown style 'sideways'"),
    (2, ["parallel.pp=2", "pipeline.blocks=trunk"], "pipeline.blocks: Net has no module 'trunk' (its modules: embed, layers, head"),
    (2, ["parallel.pp=2", "pipeline.blocks=layers.0"], "pipeline.blocks: layers.0 is a Block, not a ModuleList or Sequential"),
    (4, ["parallel.pp=4", "model.args.depth=3"], "parallel.pp: 4 stages, but the model (Net) has only 3 blocks to cut"),
    (2, ["parallel.pp=2", "pipeline.balance=time"], "pipeline.balance: 'time' times blocks on their own"),
    (2, ["parallel.pp=2", "pipeline.virtual=2"], "pipeline.virtual: a model that runs its own forward around its blocks "
     "(pipeline.blocks = 'layers') holds one chunk per stage; use pipeline.virtual = 1"),
], ids=["tp-no-plan", "pp-no-blocks", "pattern-matches-nothing", "wrong-kind", "size", "style", "no-such-blocks",
        "blocks-not-a-list", "too-few-blocks", "balance-time", "virtual-own-forward"])
def test_bad_split_of_own_model_is_one_line_before_workers_start(world, overrides, message, tmp_path):
    from plait.cli import _check
    from plait.errors import PlaitError

    with pytest.raises(PlaitError) as error:
        _check(MY, [*overrides, f"run.out_dir={tmp_path}"], world)
    assert str(error.value).startswith(message), str(error.value)


def test_attention_heads_that_tp_cannot_split_are_refused_by_their_head_dim(tmp_path):
    """Llama's k_proj holds 2 key-value heads of 16: 32 rows divide by tp=4, the heads do not."""
    from plait.cli import _check
    from plait.errors import PlaitError

    with pytest.raises(PlaitError) as error:
        _check("examples/llama.toml", ["parallel.tp=4", "data.args.max_chars=6000", f"run.out_dir={tmp_path}"], 4)
    assert str(error.value) == ("tensor parallel: model.layers.0.self_attn.k_proj: its 2 attention heads (of 16) "
                                "are not divisible by tp=4"), str(error.value)


def test_own_model_without_any_split_config_runs_data_parallel_and_zero(tmp_path):
    """No plan, no blocks: data parallel and ZeRO 1 to 3 are allowed on any model."""
    from plait.cli import _check

    for zero in (0, 1, 2, 3):
        _check(MY, ["parallel.tp_plan={}", "pipeline.blocks=''", f"parallel.zero={zero}", f"run.out_dir={tmp_path}"], 2)


# -- the whole trainer from a script ---------------------------------------------------------------
FIT = ["train.steps=6", "train.batch_size=16", "run.log_every=1", "run.progress=false", "checkpoint.every=2"]


def fit_in_world(out_dir: str, overrides: list[str]) -> list[float]:
    """plait.fit as examples/fit_script.py calls it, on every rank of a World; rank 0's losses."""
    import plait
    from examples.fit_script import CONFIG
    from examples.my_model import Net, data

    summary = plait.fit(Net, data, CONFIG, overrides=[f"run.out_dir={out_dir}", *overrides])
    return summary["final_loss"]


def test_fit_from_a_script_under_plain_torchrun_resumes_like_an_unbroken_run(world2, tmp_path):
    """plait.fit stopped after 4 steps, then examples/fit_script.py under plain torchrun resumed to
    6 from its checkpoint, logs what an unbroken 6-step run logs, and leaves plait train's outputs."""
    import json
    import os
    import subprocess
    import sys

    from conftest import EXAMPLES, ROOT

    def torchrun(*overrides: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(EXAMPLES / "fit_script.py"), *(a for o in [*FIT, f"run.out_dir={tmp_path}", *overrides]
                                                    for a in ("--set", o))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr

    world2.run(fit_in_world, str(tmp_path), [*FIT, "train.steps=4"])  # stopped after 4 steps
    torchrun("checkpoint.resume=latest")
    run = tmp_path / "fit_script"
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"step_00000004", "step_00000006"}
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 4

    world2.run(fit_in_world, str(tmp_path / "unbroken"), FIT)
    unbroken = [json.loads(line) for line in (tmp_path / "unbroken" / "fit_script" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in unbroken]  # bitwise: same layout, same arithmetic


def test_llama_checkpoint_moves_between_layouts_and_exports(world2, solo, tmp_path):
    """A transformers model's checkpoints are keyed by its own parameter names: saved under tp2,
    resumed under pp2 (with ZeRO-3 on its dp of 1), it ends where one unbroken process ends; `plait export`
    writes a state_dict that LlamaForCausalLM loads strictly."""
    import subprocess
    import sys

    from conftest import EXAMPLES, ROOT
    from examples.hf_models import llama
    from plait.train.tasks import build_task

    options = [*OPTIONS["llama"], "checkpoint.every=2", f"checkpoint.dir={tmp_path}/ck"]
    expected, expected_losses = _reference("llama", [], str(tmp_path / "one"))
    losses = []
    for i, layout in enumerate([["parallel.tp=2"], ["parallel.pp=2", "parallel.zero=3"]]):
        resume = ["checkpoint.resume=latest"] if i else []
        params, logged = world2.run(train_example, "llama", [*options, *layout, *resume], str(tmp_path / f"part{i}"),
                                    2 * (i + 1))[0]
        losses += logged
    assert_close(params, expected, what="tp2 -> pp2 x ZeRO-3: ", scaled=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=0)

    out = tmp_path / "llama.pt"
    done = subprocess.run([sys.executable, "-c", "import sys; from plait.cli import main; sys.exit(main())", "export",
                           str(tmp_path / "ck" / f"step_{STEPS:08d}"), "--config", str(EXAMPLES / "llama.toml"),
                           *(a for o in OPTIONS["llama"] for a in ("--set", o)), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    info = build_task("text", "", {"max_chars": 6000, "block_size": 16}).info
    model = llama(info["vocab_size"], info["block_size"], dim=32)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-5 * expected[name].abs().max().item())
