"""The training loop, assembled from parts: task, mesh, parallel model, optimizer, data, log.

Runs inside each worker process (``plait train`` launches them; ``plait.train.worker`` is the
entry point). Every rank runs the same loop; rank 0 writes the outputs and shows progress.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from plait.data.datasets import stacked
from plait.data.partition import PartitionSampler
from plait.distributed.comm import all_gather_data, all_gather_flat, all_reduce, barrier
from plait.distributed.env import DistInfo
from plait.distributed.mesh import Mesh
from plait.errors import ConfigError, PlaitError
from plait.models import build_model, builds_deferred
from plait.observe.breakdown import Breakdown, peak_rss
from plait.observe.flops import count_flops, find_peak
from plait.observe.timing import Recorder, recording, span
from plait.observe.trace import write_run_trace
from plait.parallel.compose import Layout, parallelize
from plait.parallel.materialize import build_deferred, is_meta
from plait.parallel.pipeline.schedules import bubble_fraction
from plait.parallel.pipeline.trace import (ideal_bubble, measured_bubble, plot_timeline, replayed_bubble,
                                          write_chrome_trace)
from plait.train.checkpoint import Checkpointer, read_manifest
from plait.train.config import Config, TrainConfig
from plait.train.metrics import RunLog
from plait.train.schedule import WarmupDecay
from plait.train.tasks import build_task


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def position_keys(cfg: Config) -> dict:
    """What a checkpoint's position in the data depends on: it must not change on resume."""
    return {"batch_size": cfg.train.batch_size, "partition": cfg.data.partition}


def check_resumable(cfg: Config, manifest: dict, path: Path) -> None:
    """This run can continue from the checkpoint ``manifest`` (at ``path``), whatever layout
    either has: one line saying why not otherwise. The launcher calls it before any worker
    starts; the trainer again."""
    for key in ("epoch", "batch_in_epoch"):
        if not isinstance(manifest.get(key), int):
            raise PlaitError(f"checkpoint {path} holds no training position ({key}): it was not saved by plait train")
    for key, value in position_keys(cfg).items():
        if manifest.get(key) != value:
            raise PlaitError(f"checkpoint {path} was made with {key}={manifest.get(key)!r}, this run has "
                             f"{value!r}: its position in the data would not carry over")
    made_with = manifest.get("optimizer", cfg.train.optimizer)
    if made_with != cfg.train.optimizer:
        raise PlaitError(f"checkpoint {path} was made with train.optimizer={made_with!r}, this run has "
                         f"{cfg.train.optimizer!r}: its optimizer state would not carry over")
    saved_momentum = [v for k, v in manifest["optimizer_extras"].items() if k.split("@")[0].endswith(".momentum")]
    if cfg.train.momentum and saved_momentum and not any(saved_momentum):
        raise PlaitError(f"checkpoint {path} was made with train.momentum=0 and holds no momentum buffers; "
                         f"this run has train.momentum={cfg.train.momentum:g}: resume with momentum 0, or start a new run")


HYPERPARAMETERS = ("lr", "momentum", "weight_decay")
"""Param-group keys (named as in ``[train]``) that on resume come from the config, not the checkpoint."""


class Trainer:
    """The training loop of ``plait train`` for ``cfg`` on this process. ``model_fn``,
    ``data_fn`` and ``loss_fn``: callables standing for ``model.name``, ``data.name`` and
    ``train.loss`` (``plait.fit`` passes them from a script)."""

    def __init__(self, cfg: Config, info: DistInfo, model_fn=None, data_fn=None, loss_fn=None):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.where = "start-up"
        """What this rank is doing, for error messages: 'start-up', 'step 7', ..."""
        self.layout = Layout.from_config(cfg, info.world_size)
        lay = self.layout
        self.mesh = Mesh(lay.dp, lay.pp, lay.tp, device_type=info.device.type)
        self.dp, self.dp_rank, self.dp_group = lay.dp, self.mesh.coord("dp"), self.mesh.group("dp")
        self.pp, self.tp = lay.pp, lay.tp
        t = cfg.train
        self.local_batch = t.batch_size // self.dp
        torch.manual_seed(t.seed)
        self.task = build_task(data_fn or cfg.data.name, cfg.data.path, cfg.data.args, loss_fn or t.loss)
        if lay.zero == 3:
            return_freed_memory()
        self.rss_before_model = peak_rss()
        # On the meta device where the model allows: each rank gives memory only to what it holds.
        name = model_fn or cfg.model.name
        self.model = build_deferred(lambda: build_model(name, cfg.model.args, self.task.info), t.seed,
                                    builds_deferred(name, cfg.model.deferred_init))
        if not is_meta(self.model):
            self.model.to(self.device)
        sample = self.task.sample(self.local_batch).to(self.device)
        loss = None if self.task.objective == "cross_entropy" else self.task.loss  # None: vocab-parallel under tp
        self.parallel = parallelize(self.model, self.mesh, lay, loss, self.device, sample, t.seed)
        self.parallel.check(sample)  # stages that do not fit together fail here, on every rank
        self.optimizer = build_optimizer(t, self.parallel.parameters())
        self.parallel.attach(self.optimizer)
        self.sampler, self.loader = build_loader(cfg, self.task.train, self.dp, self.dp_rank, self.task.collate)
        # Position: the next step to run, and where its batch lies (in global batches of the epoch).
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.ckpt = Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep,
                                 asynchronous=cfg.checkpoint.async_ and cfg.checkpoint.every > 0)
        resumed = self._resume()
        self.scheduler = WarmupDecay(self.optimizer, t, done=self.step)
        self.log = RunLog(cfg.run.out_dir, cfg.run.name, resume_step=self.step if resumed else None,
                          tensorboard=cfg.run.tensorboard) if info.is_main else None
        self.skipped, self.pipeline_report = 0, {}
        self.recorder = Recorder(sync=torch.cuda.synchronize if self.device.type == "cuda" else None)
        self.breakdown = Breakdown(info.world_size, self.device)
        self.flops_per_sample = self._count_flops(name)
        self.peak_flops = None  # (FLOP/s, source), found when training starts

    def _count_flops(self, name) -> float | None:
        """FLOPs of a training step per sample, counted on a meta-device copy of the whole model."""
        try:
            with torch.device("meta"):
                model = build_model(name, self.cfg.model.args, self.task.info)
        except Exception:  # a user's model that cannot be built there: no MFU
            return None
        return count_flops(model, self.task.sample(2))

    # -- checkpoints ------------------------------------------------------------------------
    def _resume(self) -> bool:
        """Load the checkpoint asked for; after an elastic restart, the newest one if any."""
        where = self.cfg.checkpoint.resume
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
        if not where and restarted and self.cfg.checkpoint.every:
            where = "latest"
        if not where:
            return False
        path = self.ckpt.latest() if where == "latest" else Path(where)
        if path is None:
            if restarted:
                return False  # the worker group died before its first checkpoint: start over
            raise PlaitError(f"checkpoint.resume: no complete checkpoint in {self.ckpt.root}")
        manifest = read_manifest(path, verify=(self.info.rank, self.info.world_size))  # the ranks share the hashing
        check_resumable(self.cfg, manifest, path)
        self.ckpt.load(path, self.parallel, self.optimizer, manifest)
        changed = self._hyperparameter_changes(manifest)
        self.step, self.epoch, self.batch_in_epoch = manifest["step"], manifest["epoch"], manifest["batch_in_epoch"]
        if self.info.is_main:
            print(f"plait: resumed from {path} (step {self.step})"
                  + "".join(f"; {key} {old!r} -> {new!r}" for key, (old, new) in changed.items()), flush=True)
        return True

    def _hyperparameter_changes(self, manifest: dict) -> dict:
        """The resume rule: state (momentum buffers, Adam's moments, step counts) comes from the
        checkpoint, hyperparameters from this run's config (the optimizer was built with them).
        Returns {key: (saved, now)} for the ones that differ."""
        changed = {}
        extras = manifest["optimizer_extras"]
        for name in HYPERPARAMETERS:
            # The lr a schedule set at the save is not the configured one, which it keeps as initial_lr.
            key = "initial_lr" if name == "lr" and any(k.endswith(".initial_lr") for k in extras) else name
            saved = next((v for k, v in extras.items() if k.startswith("param_groups.") and k.endswith(f".{key}")), None)
            now = getattr(self.cfg.train, name)
            if saved is not None and name in self.optimizer.param_groups[0] and saved != now:
                changed[f"train.{name}"] = (saved, now)
        return changed

    def _save(self) -> None:
        info = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "layout": self.layout.describe(),
                "pp": self.pp, "tp": self.tp, "zero": self.layout.zero, "optimizer": self.cfg.train.optimizer,
                "model": self.cfg.model.name, "run": self.cfg.run.name, **position_keys(self.cfg)}
        self.where = f"checkpoint save of step {self.step}"
        self.ckpt.save(self.step, self.parallel, self.optimizer, info)

    # -- data -------------------------------------------------------------------------------
    def _batches(self):
        """Endless local batches from the current position, epoch after epoch.

        ``batch_in_epoch`` counts global batches (steps), so the position reshards: on N ranks it
        is ``batch_in_epoch * batch_size / N`` indices into each rank's share of the epoch.
        """
        while True:
            self.sampler.set_epoch(self.epoch, offset=self.batch_in_epoch * self.local_batch)
            for batch in self.loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # -- one optimizer step -----------------------------------------------------------------
    def _step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        t = self.cfg.train
        with span("optimizer", "zero_grad"):
            self.optimizer.zero_grad()
        if self.info.rank == t.straggler:
            with span("forward", "straggler sleep"):
                time.sleep(t.straggler_delay)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.bf16):
            local_loss = self.parallel.step(x, y)
        if t.skip_nonfinite:
            if not self.parallel.all_finite():  # every rank decides alike
                self.skipped += 1
                return local_loss
        elif not math.isfinite(local_loss.item()):
            raise PlaitError(f"rank {self.info.rank}: loss is {local_loss.item()} at step {step}; stopping "
                             "(the last checkpoint is kept; train.skip_nonfinite = true skips such steps)")
        with span("optimizer", "optimizer step"):
            if t.grad_clip > 0:
                norm = self.parallel.grad_norm()  # each element counted once, whatever the layout
                coef = t.grad_clip / (norm + 1e-6)
                if coef < 1.0:
                    torch._foreach_mul_(self.parallel.grads(), coef)
            self.optimizer.step()
        return local_loss

    def _global_mean(self, value: torch.Tensor) -> float:
        """Mean loss over the global batch: ranks holding a loss (all, or the last stages) add."""
        value = value.detach().clone().double() if self.parallel.has_loss else torch.zeros((), dtype=torch.float64)
        if self.info.world_size > 1:
            all_reduce(value, f"loss all-reduce at step {self.step}")
        return value.item() / (self.dp * self.parallel.loss_copies)

    def _evaluate(self) -> dict:
        """Test metrics: each dp rank scores a contiguous slice, through its pipeline if any."""
        n = len(self.task.test)
        lo, hi = n * self.dp_rank // self.dp, n * (self.dp_rank + 1) // self.dp
        was_training = self.parallel.training
        self.parallel.train(False)
        sums = torch.zeros(3, dtype=torch.float64)
        for x, y in self.task.test_batches(lo, hi, self.local_batch):
            out = self.parallel.infer(x.to(self.device))
            if out is not None:
                sums += self.task.score(out, y.to(self.device))
        self.parallel.train(was_training)
        if self.info.world_size > 1:
            all_reduce(sums, "evaluation all-reduce")
        return self.task.metrics(sums)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.peak_flops = find_peak(self.device, t.bf16, cfg.run.peak_flops, self.info.world_size)
        # The bar is closed on the way out, an error included, so that its line ends before any message.
        with tqdm(total=t.steps, desc=cfg.run.name, unit="step", disable=not (self.log and cfg.run.progress),
                  dynamic_ncols=True) as bar, recording(self.recorder):
            bar.update(self.step)
            batches = self._batches()
            start = interval_start = time.perf_counter()
            loss, first = float("nan"), self.step
            traced = self._traced_steps(first)
            for step in range(self.step + 1, t.steps + 1):
                self.where = f"step {step}"
                tracing = self.pp > 1 and cfg.pipeline.trace and step == t.steps
                if tracing or step == traced.start:
                    barrier("trace start")  # one clock start for every rank's timeline
                if step == traced.start:
                    self.recorder.start_trace()
                self.recorder.take()  # what logging and saving did since the last step is no part of a step
                with span("step", f"step {step}"):
                    with span("data", "next batch"):
                        x, y = next(batches)
                        x, y = x.to(self.device), y.to(self.device)
                    local_loss = self._step(x, y, step)
                    lr = self.optimizer.param_groups[0]["lr"]  # the one this step used
                    with span("optimizer", "lr schedule"):
                        self.scheduler.step()
                self.breakdown.add(self.recorder.take())
                writing = time.perf_counter()
                if step == traced.stop - 1:
                    self._write_run_trace(self.recorder.stop_trace(), traced)
                if tracing:
                    self.pipeline_report = self._write_trace()
                interval_start += time.perf_counter() - writing  # traces are no part of throughput
                self.step = step
                bar.update(1)
                if step % cfg.run.log_every == 0 or step == t.steps:
                    loss = self._global_mean(local_loss)
                    now = time.perf_counter()
                    done = cfg.run.log_every if step % cfg.run.log_every == 0 else step % cfg.run.log_every
                    record = {"step": step, "epoch": self.epoch, "loss": loss, "lr": lr,
                              "samples_per_s": done * t.batch_size / (now - interval_start)}
                    if t.skip_nonfinite:
                        record["skipped_steps"] = self.skipped
                    record.update(self._efficiency(self.breakdown.interval_fields()))
                    interval_start = now
                    if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                        record.update(self._evaluate())
                    if self.log:
                        self.log.log(record)
                    bar.set_postfix(loss=f"{loss:.4g}")
                # After the step's record: a checkpoint on disk implies its steps' records are too, so a
                # worker killed between the two never resumes past a step it did not log.
                if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == t.steps):
                    self._save()
                self.ckpt.poll()  # an asynchronous save that failed ends the run now
            train_time = time.perf_counter() - start
        return self._finish(loss, train_time, t.steps - first)

    def _efficiency(self, fields: dict) -> dict:
        """Achieved FLOP/s per device and MFU beside a breakdown's figures (from its step time)."""
        if self.flops_per_sample and fields["step_time_s"] > 0:
            per_device = self.flops_per_sample * self.cfg.train.batch_size / fields["step_time_s"] / self.info.world_size
            fields.update(flops_per_s=per_device, mfu=per_device / self.peak_flops[0])
        return fields

    def _traced_steps(self, first: int) -> range:
        """The steps ``run.trace`` records: from the second of this run (the first warms up)."""
        if not self.cfg.run.trace:
            return range(0)
        begin = first + 2 if self.cfg.train.steps - first >= 2 else first + 1
        return range(begin, min(begin + self.cfg.run.trace_steps, self.cfg.train.steps + 1))

    def _write_run_trace(self, spans: list, steps: range) -> None:
        """Every rank's spans of the traced steps; rank 0 writes them as one Perfetto trace."""
        everyone = all_gather_data(spans, "gathering the traced steps") if self.info.world_size > 1 else [spans]
        if self.log:
            names = [f"rank {r} ({', '.join(f'{a}={self.mesh.coords_of(r)[a]}' for a in ('dp', 'pp', 'tp'))})"
                     for r in range(self.info.world_size)]
            write_run_trace(everyone, names, self.log.dir / "trace.json", f"steps {steps.start}-{steps.stop - 1}")

    def _write_trace(self) -> dict:
        """Gather every stage's timeline of this step; rank 0 writes the trace and the plot."""
        traces = self.parallel.pipe.all_traces()
        m, p, schedule, v = self.cfg.pipeline.microbatches, self.pp, self.cfg.pipeline.schedule, self.cfg.pipeline.virtual
        report = {"pipeline_schedule": schedule, "pipeline_microbatches": m, "pipeline_virtual": v,
                  "bubble_measured": measured_bubble(traces), "bubble_theory": bubble_fraction(m, p, schedule, v),
                  "bubble_ideal": ideal_bubble(traces, schedule), "bubble_replayed": replayed_bubble(traces, schedule)}
        if self.log:
            write_chrome_trace(traces, self.log.dir / "pipeline_trace.json")
            plot_timeline(traces, self.log.dir / "pipeline_timeline.png",
                          f"{schedule}, p={p}, m={m}{f', {v} chunks per stage' if v > 1 else ''}: bubble "
                          f"{report['bubble_measured']:.2f} measured, {report['bubble_theory']:.2f} in theory")
        return report

    def _finish(self, loss: float, train_time: float, steps_run: int) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.where = "the final evaluation and summary"
        metrics = self._evaluate()
        if cfg.parallel.check_consistency and self.dp > 1:
            self.parallel.check_consistency()
        self.where = "the last checkpoint save"
        self.ckpt.wait()  # an asynchronous one was written during the evaluation
        report = {}
        if self.task.kind == "regression" and self.pp == self.tp == 1:
            with self.parallel.whole_model():  # ZeRO-3 gathers the (one-layer) model for the while
                report = self.task.report(self.model)
        rss = torch.tensor([peak_rss(), peak_rss() - self.rss_before_model], dtype=torch.float64)
        if self.info.world_size > 1:
            everyone = rss.new_empty(self.info.world_size * 2)
            all_gather_flat(everyone, rss, None)
            rss = everyone.view(-1, 2)
        rss = rss.view(-1, 2).long().tolist()
        summary = {
            "name": cfg.run.name,
            "peak_rss_bytes": max(r[0] for r in rss), "peak_rss_bytes_per_rank": [r[0] for r in rss],
            "model_rss_bytes": max(r[1] for r in rss), "final_loss": loss, **metrics, "steps": t.steps,
            "samples_per_s": steps_run * t.batch_size / max(train_time, 1e-9), "world_size": self.info.world_size,
            "resumed_from_step": t.steps - steps_run, "skipped_steps": self.skipped,
            "layout": self.layout.describe(), "wall_time_s": train_time, "global_batch": t.batch_size,
            "epochs": self.epoch + 1, **self.pipeline_report,
            **({"tokens_per_s": steps_run * t.batch_size * self.task.info["block_size"] / max(train_time, 1e-9)}
               if self.task.kind == "lm" else {}),
            **report, **self.parallel.report(self.optimizer),
            "time_breakdown": self._efficiency(self.breakdown.whole_fields()), "flops_per_sample": self.flops_per_sample,
            "peak_flops_per_s": self.peak_flops[0], "peak_flops_source": self.peak_flops[1],
            "tensorboard": cfg.run.tensorboard, "trace": bool(self._traced_steps(t.steps - steps_run)),
        }
        summary["mfu"] = summary["time_breakdown"].get("mfu")
        if self.log:
            self.log.finish(summary, cfg.to_dict(), f"{cfg.run.name}: {summary['layout']}, global batch {t.batch_size}")
        return summary


def return_freed_memory(threshold: int = 4 << 20) -> bool:
    """Make glibc hand blocks of ``threshold`` bytes and more back to the system when they are
    freed (``mallopt(M_MMAP_THRESHOLD)``). By default it raises that threshold up to 32 MiB as
    blocks are freed, then keeps freed blocks below it for reuse, so the resident memory of a
    ZeRO-3 rank, which gathers and frees whole units, follows the most it ever held rather than
    what it holds. Costs page faults on every such block (~18% of a step of data parallelism on
    a 1M-parameter-layer MLP, measured), hence only for ZeRO-3. ``MALLOC_MMAP_THRESHOLD_`` set by
    the user wins. False where there is no glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(-3, threshold))  # M_MMAP_THRESHOLD


def build_loader(cfg: Config, dataset, parts: int, index: int, collate=stacked) -> tuple[PartitionSampler, DataLoader]:
    """Part ``index`` of ``parts`` of every global batch (``data.partition``), as a loader of local batches."""
    t = cfg.train
    sampler = PartitionSampler(dataset, parts, index, scheme=cfg.data.partition, global_batch=t.batch_size,
                               seed=t.seed, policy=cfg.data.policy)
    loader = DataLoader(dataset, batch_size=t.batch_size // parts, sampler=sampler, drop_last=True, collate_fn=collate)
    if len(loader) == 0:
        raise ConfigError(f"train.batch_size: {t.batch_size} leaves no full batch in {len(dataset)} samples")
    return sampler, loader
