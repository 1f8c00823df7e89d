"""The training loop, assembled from parts: task, mesh, parallel model, optimizer, data, log.

Runs inside each worker process (``plait train`` launches them; ``plait.train.worker`` is the
entry point). Every rank runs the same loop; rank 0 writes the outputs and shows progress.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from plait.data.datasets import stacked
from plait.data.partition import PartitionSampler
from plait.dist.comm import all_reduce
from plait.dist.env import DistInfo
from plait.dist.mesh import Mesh
from plait.errors import ConfigError, PlaitError
from plait.models import build_model
from plait.parallel.data import DataParallel
from plait.train.checkpoint import Checkpointer
from plait.train.config import Config, TrainConfig
from plait.train.metrics import RunLog
from plait.train.tasks import build_task


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.mesh = Mesh(cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp, device_type=info.device.type)
        self.dp, self.dp_rank, self.dp_group = self.mesh.size("dp"), self.mesh.coord("dp"), self.mesh.group("dp")
        t = cfg.train
        if t.batch_size % (self.dp * t.accum_steps):
            raise ConfigError(
                f"train.batch_size: {t.batch_size} is not divisible by dp ({self.dp}) x "
                f"train.accum_steps ({t.accum_steps})"
            )
        self.local_batch = t.batch_size // self.dp
        torch.manual_seed(t.seed)
        self.task = build_task(cfg.data.name, cfg.data.path, cfg.data.args)
        self.model = build_model(cfg.model.name, cfg.model.args, self.task.info).to(self.device)
        self.ddp = DataParallel(
            self.model, self.dp_group, bucket_mb=cfg.parallel.bucket_mb, allow_unused=cfg.parallel.allow_unused
        )
        self.optimizer = build_optimizer(t, self.model.parameters())
        self.sampler = PartitionSampler(
            self.task.train, self.dp, self.dp_rank, scheme=cfg.data.partition, global_batch=t.batch_size,
            seed=t.seed, policy=cfg.data.policy,
        )
        self.loader = DataLoader(self.task.train, batch_size=self.local_batch, sampler=self.sampler, drop_last=True,
                                 collate_fn=stacked)
        if len(self.loader) == 0:
            raise ConfigError(f"train.batch_size: {t.batch_size} leaves no full batch in {len(self.task.train)} samples")
        # Position: the next step to run, and where its batch lies (in global batches of the epoch).
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.ckpt = Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep)
        resumed = self._resume()
        self.log = RunLog(cfg.run.out_dir, cfg.run.name, resume_step=self.step if resumed else None) \
            if info.is_main else None

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
        self.optimizer.zero_grad(set_to_none=True)  # lets torch create the optimizer state to load into
        manifest = self.ckpt.load(path, self.model, self.optimizer)
        for key in ("batch_size", "partition"):
            if manifest.get(key) != self._position_keys()[key]:
                raise PlaitError(f"checkpoint {path} was made with {key}={manifest.get(key)!r}, this run has "
                                 f"{self._position_keys()[key]!r}: its position in the data would not carry over")
        self.step, self.epoch, self.batch_in_epoch = manifest["step"], manifest["epoch"], manifest["batch_in_epoch"]
        if self.info.is_main:
            print(f"plait: resumed from {path} (step {self.step})", flush=True)
        return True

    def _position_keys(self) -> dict:
        return {"batch_size": self.cfg.train.batch_size, "partition": self.cfg.data.partition}

    def _save(self) -> None:
        info = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "layout": self.mesh.describe(),
                "model": self.cfg.model.name, "run": self.cfg.run.name, **self._position_keys()}
        self.ckpt.save(self.step, self.model, self.optimizer, info)

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
        self.optimizer.zero_grad()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.bf16)
        total = torch.zeros((), device=self.device)
        micro = list(zip(x.chunk(t.accum_steps), y.chunk(t.accum_steps)))
        for i, (xm, ym) in enumerate(micro):
            last = i == len(micro) - 1
            with self.ddp.no_sync() if not last else nullcontext():
                with autocast:
                    loss = self.task.loss(self.ddp(xm), ym) / len(micro)
                loss.backward()
            total += loss.detach()
        if t.skip_nonfinite:
            # Gradients are averaged over ranks, so one rank's NaN reaches all: every rank decides alike.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if not torch.stack([torch.isfinite(g).all() for g in grads]).all():
                self.skipped += 1
                return total
        elif not math.isfinite(total.item()):
            raise PlaitError(f"rank {self.info.rank}: loss is {total.item()} at step {step}; stopping "
                             "(the last checkpoint is kept; train.skip_nonfinite = true skips such steps)")
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        return total

    def _global_mean(self, value: torch.Tensor) -> float:
        value = value.detach().clone().double()
        if self.dp > 1:
            all_reduce(value, f"loss all-reduce at step {self.step}", self.dp_group)
        return value.item() / self.dp

    def _evaluate(self) -> dict:
        return self.task.evaluate(self.model, self.device, self.dp_group, self.dp_rank, self.dp)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        bar = tqdm(total=t.steps, desc=cfg.run.name, unit="step", disable=not (self.log and cfg.run.progress),
                   dynamic_ncols=True)
        bar.update(self.step)
        batches = self._batches()
        start = interval_start = time.perf_counter()
        loss, first = float("nan"), self.step
        self.skipped = 0
        for step in range(self.step + 1, t.steps + 1):
            x, y = next(batches)
            local_loss = self._step(x.to(self.device), y.to(self.device), step)
            self.step = step
            if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == t.steps):
                self._save()
            bar.update(1)
            if step % cfg.run.log_every == 0 or step == t.steps:
                loss = self._global_mean(local_loss)
                now = time.perf_counter()
                done = cfg.run.log_every if step % cfg.run.log_every == 0 else step % cfg.run.log_every
                record = {"step": step, "epoch": self.epoch, "loss": loss, "lr": t.lr,
                          "samples_per_s": done * t.batch_size / (now - interval_start)}
                if t.skip_nonfinite:
                    record["skipped_steps"] = self.skipped
                interval_start = now
                if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                    record.update(self._evaluate())
                if self.log:
                    self.log.log(record)
                bar.set_postfix(loss=f"{loss:.4g}")
        train_time = time.perf_counter() - start
        bar.close()
        return self._finish(loss, train_time, t.steps - first)

    def _finish(self, loss: float, train_time: float, steps_run: int) -> dict:
        cfg, t = self.cfg, self.cfg.train
        metrics = self._evaluate()
        if cfg.parallel.check_consistency and self.dp > 1:
            self.ddp.check_consistency()
        summary = {
            "name": cfg.run.name, "final_loss": loss, **metrics, "steps": t.steps,
            "samples_per_s": steps_run * t.batch_size / max(train_time, 1e-9), "world_size": self.info.world_size,
            "resumed_from_step": t.steps - steps_run, "skipped_steps": self.skipped,
            "layout": self.mesh.describe(), "wall_time_s": train_time, "global_batch": t.batch_size,
            "epochs": self.epoch + 1, **self.task.report(self.model),
        }
        if self.log:
            self.log.write_json("summary.json", summary)
            self.log.write_json("config.json", cfg.to_dict())
            self.log.plot_loss(f"{cfg.run.name}: {summary['layout']}, global batch {t.batch_size}")
            self.log.close()
        return summary


def format_summary(s: dict, out_dir: str) -> str:
    lines = [f"plait: {s['name']}: {s['steps']} steps on {s['world_size']} worker(s) ({s['layout']}) "
             f"in {s['wall_time_s']:.1f} s, {s['samples_per_s']:.0f} samples/s"]
    figures = [f"final loss {s['final_loss']:.4g}", f"test loss {s['test_loss']:.4g}"]
    if "test_accuracy" in s:
        figures.append(f"test accuracy {s['test_accuracy']:.4f}")
    if "weights_rel_error" in s:
        figures.append(f"weights vs closed-form least squares: relative error {s['weights_rel_error']:.2e}")
    lines.append("  " + ", ".join(figures))
    lines.append(f"  outputs: {out_dir}/{s['name']}/ (metrics.jsonl, summary.json, loss.png)")
    return "\n".join(lines)
