"""``parallel.strategy = "ps"``: servers own the parameters, workers send them gradients.

Ranks ``0 .. ps.servers-1`` serve (rank 0 also logs, shows progress and writes the summary);
the others train, each on its share of every global batch (the data partition of the config).

    plait train examples/linreg.toml --nproc 3 --set parallel.strategy=ps --set ps.mode=async

A worker lost in async or ssp mode is dropped and the run goes on (``plait train`` launches
those workers through ``plait.train.guard``); in sync mode it ends the run, naming the rank.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from plait.distributed.comm import data_bytes, from_data_bytes
from plait.distributed.env import DistInfo
from plait.errors import ConfigError
from plait.models import build_model, builds_deferred
from plait.parallel.materialize import build_deferred, materialize_all
from plait.parallel.ps import ParameterServer, PSLayout, PSWorker, ServerStats
from plait.parallel.ps.layout import scatter, trainable
from plait.train.config import Config
from plait.train.metrics import RunLog
from plait.train.tasks import build_task
from plait.train.schedule import scheduled_lr
from plait.train.trainer import build_loader, build_optimizer


def check_world(cfg: Config, world_size: int) -> int:
    """The number of workers ``world_size`` leaves after ``ps.servers``; errors name the keys."""
    servers, t = cfg.ps.servers, cfg.train
    workers = world_size - servers
    if workers < 1:
        raise ConfigError(f"ps.servers: {servers} server(s) in a world of {world_size} leaves no worker; "
                          f"start at least {servers + 1} processes (--nproc)")
    if cfg.parallel.dp not in (0, workers):
        raise ConfigError(f"parallel.dp: {cfg.parallel.dp}, but {world_size} processes with {servers} server(s) "
                          f"make {workers} data-parallel workers")
    if t.batch_size % (workers * t.accum_steps):
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by {workers} workers x "
                          f"train.accum_steps ({t.accum_steps})")
    if cfg.ps.straggler != -1 and not servers <= cfg.ps.straggler < world_size:
        raise ConfigError(f"ps.straggler: rank {cfg.ps.straggler} is not a worker (workers are ranks "
                          f"{servers}..{world_size - 1})")
    return workers


_runs = 0  # parameter-server runs started in this process: the same count on every rank


class PSTrainer:
    def __init__(self, cfg: Config, info: DistInfo):
        global _runs
        _runs += 1
        self._left_key = f"plait/ps/left/{_runs}"  # runs in one process group never share the key
        self.cfg, self.info = cfg, info
        self.workers = check_world(cfg, info.world_size)
        torch.manual_seed(cfg.train.seed)
        self.task = build_task(cfg.data.name, cfg.data.path, cfg.data.args, cfg.train.loss)
        model = build_deferred(lambda: build_model(cfg.model.name, cfg.model.args, self.task.info), cfg.train.seed,
                               builds_deferred(cfg.model.name, cfg.model.deferred_init))
        self.model = materialize_all(model, cfg.train.seed, torch.device("cpu"))  # the values plait train starts from
        self.layout = PSLayout.build(self.model, cfg.ps.servers, cfg.ps.partition)
        self.local_batch = cfg.train.batch_size // self.workers
        self.log = RunLog(cfg.run.out_dir, cfg.run.name) if info.is_main else None

    def fit(self) -> dict | None:
        """Serve or train; rank 0 returns the summary, other ranks None."""
        if self.info.rank in self.layout.servers:
            summary = self._serve()
        else:
            self._work()
            summary = None
        self._leave(summary)
        return summary

    def _leave(self, summary: dict | None) -> None:
        """Rank 0 hosts the store: it waits (briefly) until every rank still alive is done."""
        store = dist.distributed_c10d._get_default_store()
        store.add(self._left_key, 1)
        if summary is None:
            return
        expected = self.info.world_size - len(summary["lost_workers"])
        deadline = time.monotonic() + 10.0
        while store.add(self._left_key, 0) < expected and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- workers ----------------------------------------------------------------------------
    def _batches(self):
        index = self.layout.workers.index(self.info.rank)
        sampler, loader = build_loader(self.cfg, self.task.train, self.workers, index, self.task.collate)
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    def _work(self) -> None:
        t, device = self.cfg.train, self.info.device
        model = self.model.to(device)
        worker = PSWorker(model, self.layout)
        batches = self._batches()
        delay = self.cfg.ps.straggler_delay if self.info.rank == self.cfg.ps.straggler else 0.0
        for _ in range(t.steps):
            x, y = (v.to(device) for v in next(batches))
            worker.zero_grad()
            loss = torch.zeros((), device=device)
            for xm, ym in zip(x.chunk(t.accum_steps), y.chunk(t.accum_steps)):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.bf16):
                    part = self.task.loss(model(xm), ym) / t.accum_steps
                part.backward()
                loss += part.detach()
            if delay:
                time.sleep(delay)
            worker.push(loss)  # a NaN or infinite loss stops the run (LossNotFinite)
        worker.close()

    # -- servers ----------------------------------------------------------------------------
    def _serve(self) -> dict | None:
        t, ps = self.cfg.train, self.cfg.ps
        progress = _Progress(self, t.steps) if self.log else None
        server = ParameterServer(self.model, lambda params: build_optimizer(t, params), self.layout, mode=ps.mode,
                                 staleness=ps.staleness if ps.mode == "ssp" else 0, timeout_s=ps.timeout,
                                 on_push=progress.update if progress else None, lr_at=scheduled_lr(t))
        start = time.perf_counter()
        server.serve()
        train_time = time.perf_counter() - start
        if progress:
            progress.close(server)
        everyone = _gather_to_rank0(server, self.model, self.layout)
        if not self.log:
            return None
        return self._finish(everyone, progress, train_time)

    def _finish(self, stats: list[ServerStats], progress: _Progress, train_time: float) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for x, y in self.task.test_batches(0, len(self.task.test), self.local_batch):
                sums += self.task.score(self.model(x), y)
        metrics = self.task.metrics(sums)
        lost = {}
        for s in stats:
            lost.update(s.lost)
        pushes = stats[0].pushes
        summary = {
            "name": cfg.run.name, "final_loss": progress.last_loss, **metrics, "steps": t.steps,
            "samples_per_s": pushes * self.local_batch / max(train_time, 1e-9), "world_size": self.info.world_size,
            "layout": f"ps {cfg.ps.mode}: {self.layout.describe()}", "wall_time_s": train_time,
            "global_batch": t.batch_size, "resumed_from_step": 0, "skipped_steps": 0,
            "ps_mode": cfg.ps.mode, "ps_staleness": cfg.ps.staleness if cfg.ps.mode == "ssp" else 0,
            "ps_updates": [s.updates for s in stats], "ps_pushes": pushes,
            "ps_max_clock_gap": max(s.max_gap for s in stats),
            "ps_max_staleness": max(s.max_staleness for s in stats),
            "lost_workers": {str(rank): why for rank, why in sorted(lost.items())},
            **self.task.report(self.model),
        }
        self.log.finish(summary, cfg.to_dict(), f"{cfg.run.name}: {summary['layout']}, global batch {t.batch_size}")
        return summary


class _Progress:
    """Rank 0's view: the bar follows the slowest live worker's clock; a record every log_every steps."""

    def __init__(self, trainer: PSTrainer, steps: int):
        self.cfg, self.log, self.local_batch = trainer.cfg, trainer.log, trainer.local_batch
        self.bar = tqdm(total=steps, desc=self.cfg.run.name, unit="step", disable=not self.cfg.run.progress,
                        dynamic_ncols=True)
        self.start = self.interval_start = time.perf_counter()
        self.logged, self.pushes_at_log, self.last_loss = 0, 0, math.nan

    def _step(self, server: ParameterServer) -> int:
        active = [server.clock[w] for w in server.workers if w in server.live and w not in server.done]
        return min(active) if active else max(server.clock.values())

    def update(self, server: ParameterServer, worker: int) -> None:
        step = self._step(server)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        every = self.cfg.run.log_every
        if step // every > self.logged // every or step == self.cfg.train.steps > self.logged:
            self._record(server, step)

    def _record(self, server: ParameterServer, step: int) -> None:
        now = time.perf_counter()
        live = [server.loss[w] for w in server.workers if w in server.live and w in server.loss]
        self.last_loss = sum(live) / len(live) if live else math.nan
        self.log.log({"step": step, "loss": self.last_loss, "lr": scheduled_lr(self.cfg.train)(step - 1),
                      "time_s": now - self.start,
                      "samples_per_s": (server.stats.pushes - self.pushes_at_log) * self.local_batch
                      / max(now - self.interval_start, 1e-9),
                      "updates": server.version, "max_clock_gap": server.stats.max_gap,
                      "workers": len(server.live)})
        self.bar.set_postfix(loss=f"{self.last_loss:.4g}")
        self.logged, self.pushes_at_log, self.interval_start = step, server.stats.pushes, now

    def close(self, server: ParameterServer) -> None:
        if self.logged < self._step(server):
            self._record(server, self._step(server))
        self.bar.close()


def _gather_to_rank0(server: ParameterServer, model, layout: PSLayout) -> list[ServerStats] | None:
    """Servers send their shard and stats to rank 0, which writes the whole model's parameters."""
    if server.index > 0:  # the stats as JSON bytes, the shard as a tensor: nothing rank 0 unpickles
        stats = data_bytes(dataclasses.asdict(server.stats))
        for t in (torch.tensor([stats.numel()]), stats, server.shard.detach().contiguous()):
            dist.send(t, dst=0, group=layout.group)
        return None
    flat = torch.empty(layout.numel, dtype=server.shard.dtype)
    scatter(server.shard.detach(), server.segments, flat)
    everyone = [server.stats]
    for s in range(1, len(layout.servers)):
        src = layout.servers[s]
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src, group=layout.group)
        stats = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(stats, src=src, group=layout.group)
        shard = torch.empty(sum(hi - lo for lo, hi in layout.segments[s]), dtype=flat.dtype)
        dist.recv(shard, src=src, group=layout.group)
        fields = from_data_bytes(stats)
        for name in ("clocks", "lost"):  # JSON keys are strings; these are ranks
            fields[name] = {int(k): v for k, v in fields[name].items()}
        everyone.append(ServerStats(**fields))
        scatter(shard, layout.segments[s], flat)
    offset = 0
    with torch.no_grad():
        for _, p in trainable(model):
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return everyone
