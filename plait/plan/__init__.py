"""The planner: which layout for this model, batch and cluster, how fast, in how much memory, and why.

    ranked, profile = plan_config(cfg, world_size=8, cluster=load_cluster("a100-80gb"))
    best = ranked[0]            # an Estimate: .candidate (the layout), .memory, .time, .fits

``profile`` (the model on the meta device), ``cost`` (memory and time of one layout),
``search`` (every valid layout, ranked and explained), ``cluster`` (the machines),
``calibrate`` (measure this machine), ``measure`` (run layouts and compare).
"""

from __future__ import annotations

import os

from plait.errors import PlaitError
from plait.plan.cluster import Cluster, Link, load_cluster
from plait.plan.cost import Candidate, Workload


def workload(cfg, nnodes: int = 1) -> Workload:
    t = cfg.train
    optimizer = "sgd_momentum" if t.optimizer == "sgd" and t.momentum else t.optimizer
    return Workload(t.batch_size, t.accum_steps, optimizer, cfg.parallel.bucket_mb, nnodes, t.grad_clip > 0,
                    cfg.parallel.prefetch)


def layout_check(cfg, model):
    """A function raising PlaitError when ``model`` does not allow a candidate's degrees (the
    trainer's own checks: tp plan sizes, blocks to cut, weights tied across stages or units)."""
    from plait.parallel.compose import Layout

    cache: dict = {}

    def one(key) -> None:  # each degree is checked on its own: tp's plan, pp's cut (and chunks), ZeRO-3's units
        if key not in cache:
            tp, pp, virtual, zero = key
            layout = Layout(pp=pp, tp=tp, zero=zero, virtual=virtual, blocks=cfg.pipeline.blocks,
                            tp_plan=tuple(cfg.parallel.tp_plan.items()))
            try:
                layout.check_model(model)
                cache[key] = None
            except PlaitError as exc:  # a ConfigError, or the tensor-parallel plan's own
                cache[key] = exc
        if cache[key] is not None:
            raise cache[key]

    def check(c: Candidate) -> None:
        one((c.tp, 1, 1, 0))
        one((1, c.pp, c.virtual, 0))
        if c.zero == 3:
            one((1, 1, 1, 3))
    return check


def plan_config(cfg, world_size: int, cluster: Cluster, nnodes: int = 1):
    """Every valid layout of ``cfg``'s model over ``world_size`` processes, ranked; and its profile."""
    from plait.plan.profile import profile_config
    from plait.plan.search import plan

    profile, model = profile_config(cfg)
    return plan(profile, cluster, workload(cfg, nnodes), world_size, layout_check(cfg, model)), profile


DEFAULT_FILE = "cluster.toml"
"""Where ``plait calibrate`` writes, and ``plait plan`` looks first, in the current folder."""


def default_cluster(nproc: int) -> Cluster:
    """The cluster when none is named: ``cluster.toml`` here if ``plait calibrate`` wrote one,
    else a rough estimate of this machine (CPU: a timed matrix product shared by the local
    processes, gloo over loopback) that says so."""
    if os.path.exists(DEFAULT_FILE):
        return load_cluster(DEFAULT_FILE)
    import torch

    from plait.observe.flops import datasheet_peak, measured_peak

    if torch.cuda.is_available():
        device = torch.device("cuda")
        peaks = {"fp32": (datasheet_peak(device, False) or measured_peak(device, False, 1))[0],
                 "bf16": (datasheet_peak(device, True) or measured_peak(device, True, 1))[0]}
        memory = torch.cuda.get_device_properties(0).total_memory
        return Cluster("this machine (estimated; run plait calibrate)", torch.cuda.device_count(), memory,
                       {k: 0.7 * v for k, v in peaks.items()}, Link(10e-6, 100e9), Link(30e-6, 20e9),
                       memory_bandwidth=1e12, op_overhead_s=10e-6, overlap=0.8, source="estimate")
    cores = os.cpu_count() or 1
    share = min(1.0, cores / nproc)
    threads = max(1, cores // nproc)
    flops = measured_peak(torch.device("cpu"), False, threads)[0] * share
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return Cluster("this machine (estimated; run plait calibrate)", nproc, pages / nproc, {"fp32": flops},
                   Link(100e-6, 1e9), Link(100e-6, 1e9), base_memory_bytes=350e6, memory_bandwidth=5e9 * share,
                   op_overhead_s=20e-6, cores=cores if cores < nproc else 0, source="estimate")
