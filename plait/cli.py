"""The ``plait`` command.

    plait train examples/digits_cnn.toml --nproc 2
    plait train examples/linreg.toml --nproc 4 --set train.lr=0.05
    plait train CONFIG --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 --nproc 8   # on each node
    plait export runs/NAME/checkpoints/step_00000100 --config CONFIG -o model.pt
    plait report runs/digits_cnn runs/mlp_pipeline -o report.html     # one HTML page comparing runs
    plait plan examples/gpt_hybrid.toml --nproc 8 --nnodes 4 --cluster a100-80gb   # rank every layout
    plait calibrate examples/gpt_hybrid.toml --nproc 4     # measure this machine: cluster.toml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plait.errors import PlaitError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line, like every other error, instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"plait: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="plait", description="Distributed training on torch.distributed.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a config on local (or several nodes') workers")
    train.add_argument("config", help="a TOML config, e.g. examples/digits_cnn.toml")
    # Defaults (None) come from a cluster manager's environment (plait.cluster), else 1, 1, 0, "", 0.
    train.add_argument("--nproc", "--nproc-per-node", type=_positive, help="workers on this node (default 1)")
    train.add_argument("--nnodes", type=_positive, help="number of nodes (default 1)")
    train.add_argument("--node-rank", type=int, help="this node's rank (0 hosts the rendezvous)")
    train.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous, for --nnodes > 1")
    train.add_argument("--max-restarts", type=int, help="restarts of the worker group after a failure (default 0)")
    train.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                       help="continue from the newest complete checkpoint (or from PATH)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=0.1 (repeatable)")
    train.add_argument("--plan", choices=["auto"], help="auto: let the planner choose the layout (see plait plan)")
    train.add_argument("--cluster", help="with --plan auto: the cluster file (as plait plan's --cluster)")
    export = sub.add_parser("export", help="write a checkpoint (any layout) as one torch.save state_dict")
    export.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/NAME/checkpoints/step_00000100")
    export.add_argument("--config", required=True, help="the run's config (it says which model to build)")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="the run's overrides of model or data arguments (repeatable)")
    export.add_argument("-o", "--output", required=True, help="the .pt file to write")
    report = sub.add_parser("report", help="one static HTML page comparing runs: curves, time per rank, memory")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, e.g. runs/digits_cnn")
    report.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    plan = sub.add_parser("plan", help="rank every layout of a config by predicted step time and memory, and say why")
    plan.add_argument("config", help="a TOML config")
    plan.add_argument("--nproc", "--nproc-per-node", type=_positive, default=1, help="processes per node (default 1)")
    plan.add_argument("--nnodes", type=_positive, default=1, help="number of nodes (default 1)")
    plan.add_argument("--cluster", help="a cluster file, or a shipped one by name (default: ./cluster.toml from "
                      "plait calibrate, else an estimate of this machine)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value (repeatable)")
    plan.add_argument("--json", action="store_true", help="print every layout as JSON instead of the table")
    plan.add_argument("--top", type=int, default=20, help="rows of the table (0: all; default 20)")
    plan.add_argument("--measure", type=_positive, metavar="K",
                      help="also train the K best and K worst layouts here for a few steps each and compare")
    plan.add_argument("--measure-steps", type=_positive, default=6, help="steps of each measured run (default 6)")
    plan.add_argument("--measure-repeats", type=_positive, default=1, help="runs of each measured layout (their median)")
    plan.add_argument("--measure-json", metavar="FILE", help="also write the measured rows to FILE as JSON")
    cal = sub.add_parser("calibrate", help="measure this machine's compute and links: a cluster file for plait plan")
    cal.add_argument("config", help="the config whose model's blocks are timed")
    cal.add_argument("--nproc", "--nproc-per-node", type=_positive, default=2, help="local processes (default 2)")
    cal.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value (repeatable)")
    cal.add_argument("-o", "--output", default="cluster.toml", help="the cluster file to write (default cluster.toml)")
    cal.add_argument("--rounds", type=_positive, default=3,
                     help="measure compute and links this many times, keep each figure's median (default 3)")
    return parser


def plan(args: argparse.Namespace) -> int:
    """``plait plan``: the table (or JSON) of every layout, the reasons, and measured runs."""
    from plait.plan.search import as_json, explain, shortfall, table

    world = args.nproc * args.nnodes
    cfg, cluster, ranked, profile = _planned(args.config, args.overrides, args.nproc, args.nnodes, args.cluster)
    fits = ranked[0].fits
    if args.json:
        print(json.dumps(as_json(ranked), indent=1))
    else:
        print(f"{profile.name}: {profile.params / 1e6:,.1f}M parameters, {profile.flops_per_sample / 1e9:.3g} GFLOP per "
              f"sample, batch {cfg.train.batch_size}, on {world} process{'es' if world > 1 else ''} of "
              f"{cluster.name} ({cluster.source})")
        print(table(ranked, args.top or None))
        for line in explain(ranked, cluster):
            print(line)
    if not fits:
        print(f"plait: error: {shortfall(ranked, cluster)}", file=sys.stderr)
        return 1
    if args.measure:
        from plait.plan.measure import compare

        compare(args.config, args.overrides, ranked, args.measure, args.nproc, args.measure_steps, args.measure_json,
                args.measure_repeats)
    return 0


def _planned(config: str, overrides: list[str], nproc: int, nnodes: int, cluster_name: str | None):
    """The config, the cluster (``--cluster``, else the default) and every layout ranked, for
    ``plait plan`` and ``plait train --plan auto`` alike."""
    from plait.plan import default_cluster, load_cluster, plan_config
    from plait.train.config import load_config

    cfg = load_config(config, overrides)
    if cfg.parallel.strategy == "ps":
        raise PlaitError("plan: parallel.strategy = 'ps' has no layouts to plan (servers and workers are a role "
                         "split); plan with parallel.strategy = 'allreduce'")
    cluster = load_cluster(cluster_name) if cluster_name else default_cluster(nproc)
    if nproc > cluster.devices_per_node:
        raise PlaitError(f"--nproc {nproc}: the cluster ({cluster.name}) has {cluster.devices_per_node} devices "
                         "per node")
    ranked, profile = plan_config(cfg, nproc * nnodes, cluster, nnodes)
    return cfg, cluster, ranked, profile


def export(args: argparse.Namespace) -> None:
    """Load a checkpoint into the unsplit model in this process and ``torch.save`` its state_dict:
    ``model.load_state_dict(torch.load(OUTPUT, weights_only=True))`` then works anywhere."""
    import torch

    from plait.models import build_model
    from plait.train.checkpoint import load_unsplit
    from plait.train.config import load_config
    from plait.train.tasks import build_task

    cfg = load_config(args.config, args.overrides)
    info = build_task(cfg.data.name, cfg.data.path, cfg.data.args, cfg.train.loss).info
    model = build_model(cfg.model.name, cfg.model.args, info)
    manifest = load_unsplit(args.checkpoint, model)
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out)
    except OSError as exc:
        raise PlaitError(f"--output: cannot write {out}: {exc.strerror or exc}") from None
    count = sum(p.numel() for p in model.parameters())
    print(f"plait: {args.checkpoint} (step {manifest['step']}, {manifest.get('layout', 'unknown layout')}) -> "
          f"{out}: {cfg.model.name}, {count:,} parameters")


def _check(config_path: str, overrides: list[str], world_size: int):
    """Everything that can be checked before starting workers: config, model and data arguments,
    mesh and batch, dataset file, checkpoint to resume, output folders."""
    from plait.models import check_model_args
    from plait.train.config import load_config
    from plait.train.tasks import check_data_args
    from plait.train.trainer import check_resumable

    cfg = load_config(config_path, overrides)
    check_model_args(cfg.model.name, cfg.model.args)
    check_data_args(cfg.data.name, cfg.data.args, cfg.data.path)
    if cfg.data.path:
        from plait.data.datasets import check_data_path

        check_data_path(cfg.data.name, cfg.data.path)
    if cfg.parallel.strategy == "ps":
        from plait.train.ps import check_world

        check_world(cfg, world_size)
        _check_model(cfg, None)
    else:
        from plait.parallel.compose import Layout

        _check_model(cfg, Layout.from_config(cfg, world_size))
    if cfg.checkpoint.resume:
        from plait.train.checkpoint import complete_checkpoints, read_manifest
        from plait.train.dcp_io import SafeReader

        path = Path(cfg.checkpoint.resume)
        if cfg.checkpoint.resume == "latest":
            done = complete_checkpoints(cfg.checkpoint.dir)
            if not done:
                raise PlaitError(f"checkpoint.resume: no complete checkpoint in {cfg.checkpoint.dir}")
            path = done[-1]
        manifest = read_manifest(path)  # a missing, damaged or altered checkpoint stops us here
        SafeReader(path).read_metadata()  # and one whose metadata names anything but DCP's classes
        check_resumable(cfg, manifest, path)
    if cfg.train.straggler >= world_size:
        raise PlaitError(f"train.straggler: rank {cfg.train.straggler} does not exist in a world of {world_size}")
    _check_writable(Path(cfg.run.out_dir) / cfg.run.name, "run.out_dir")
    if cfg.checkpoint.every:
        _check_writable(Path(cfg.checkpoint.dir), "checkpoint.dir")
    return cfg


def _check_model(cfg, layout) -> None:
    """The user's own code, run once here (an import that fails, data or a model that is not what
    it should be: one line now, not one per worker later), and the model against ``layout``: tp
    must divide what the plan splits, pp must not exceed the blocks, no weight may be tied across
    stages or ZeRO-3 units. The model is built on the meta device (no memory, no initialisation);
    a user's model that cannot be built there is built for real."""
    import torch

    from plait.callargs import is_import_spec
    from plait.models import build_model
    from plait.train.tasks import build_task

    own_code = any(is_import_spec(name) for name in (cfg.model.name, cfg.data.name, cfg.train.loss))
    split = layout is not None and (layout.pp > 1 or layout.tp > 1 or layout.zero == 3)
    if not (own_code or split):
        return
    info = build_task(cfg.data.name, cfg.data.path, cfg.data.args, cfg.train.loss).info
    try:
        with torch.device("meta"):
            model = build_model(cfg.model.name, cfg.model.args, info)
    except PlaitError:
        if not own_code:
            raise
        model = build_model(cfg.model.name, cfg.model.args, info)  # its own error, if any, is said
    if split:
        layout.check_model(model)


def _check_writable(folder: Path, key: str) -> None:
    """Create ``folder`` (as the run would) and a file in it, so that a folder the run could not
    write is found now, not by rank 0 after every worker has started."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PlaitError(f"{key}: cannot write to {folder}: {exc.strerror or exc}") from None


def train(args: argparse.Namespace) -> None:
    from plait.cluster import launch_defaults
    from plait.launch import LaunchSpec, launch

    if args.resume is not None:  # a JSON string is a TOML string: any path survives quoting
        args.overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    module_args = [args.config] + [a for o in args.overrides for a in ("--set", o)]
    given = {"nproc": args.nproc, "nnodes": args.nnodes, "node_rank": args.node_rank,
             "rdzv_endpoint": args.rdzv_endpoint, "max_restarts": args.max_restarts}
    settings = {"run_id": Path(args.config).stem, **launch_defaults(),
                **{key: value for key, value in given.items() if value is not None}}
    spec = LaunchSpec(**settings, module_args=module_args)
    if args.plan:
        chosen = _auto_layout(args, spec)
        args.overrides += chosen
        module_args += [a for o in chosen for a in ("--set", o)]
    elif args.cluster:
        raise PlaitError("--cluster is for --plan auto")
    cfg = _check(args.config, args.overrides, spec.world_size)
    spec.huge_pages = cfg.parallel.strategy != "ps" and cfg.parallel.zero == 3
    if cfg.parallel.strategy == "ps" and cfg.ps.mode != "sync":
        # Async and ssp go on without a lost worker; torchrun alone would stop every rank.
        spec.module_args = [str(cfg.ps.servers), spec.module, *spec.module_args]
        spec.module = "plait.train.guard"
    launch(spec)


def _auto_layout(args: argparse.Namespace, spec) -> list[str]:
    """``--plan auto``: the planner's best layout for this world, said with its reason; the
    ``--set`` values that train it."""
    from plait.plan.search import explain, shortfall

    _, cluster, ranked, _ = _planned(args.config, args.overrides, spec.nproc, spec.nnodes, args.cluster)
    if not ranked[0].fits:
        raise PlaitError(shortfall(ranked, cluster).removeprefix("plan: "))
    best = ranked[0]
    print(f"plait: plan: {best.candidate.describe()} (predicted {best.step_s:.3g} s per step, "
          f"{best.memory_bytes / 1e9:.2f} GB per rank, on {cluster.name})", flush=True)
    for line in explain(ranked, cluster, runners=1):
        print(f"plait: plan: {line}", flush=True)
    return best.candidate.overrides()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            train(args)
        elif args.command == "export":
            export(args)
        elif args.command == "plan":
            return plan(args)
        elif args.command == "calibrate":
            from plait.plan.calibrate import calibrate

            calibrate(args.config, args.overrides, args.nproc, args.output, args.rounds)
        elif args.command == "report":
            from plait.observe.report import write_report

            out = write_report(args.runs, args.output)
            print(f"plait: report of {len(args.runs)} run{'s' if len(args.runs) > 1 else ''} -> {out} "
                  f"(open it in a browser: file://{out.resolve()})")
    except PlaitError as exc:
        print(f"plait: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
