"""Typed run configuration: dataclasses loaded from TOML, with ``--set a.b=value`` overrides.

One way in: ``load_config(path, ["train.lr=0.1", ...])``. Unknown keys and bad values raise
``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import keyword
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.data.partition import POLICIES, SCHEMES
from plait.errors import ConfigError
from plait.parallel.pipeline.schedules import SCHEDULES as PIPELINE_SCHEDULES, VIRTUAL
from plait.parallel.ps.layout import MODES as PS_MODES, SCHEMES as PS_SCHEMES
from plait.parallel.tensor.plan import STYLES as TP_STYLES
from plait.train.schedule import SCHEDULES

LOSSES = ("auto", "cross_entropy", "mse")
"""``train.loss``'s names; anything else must be ``package.module:callable``."""

OPTIMIZERS = ("sgd", "adam", "adamw")
STRATEGIES = ("allreduce", "ps")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    _require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


@dataclass
class RunConfig:
    name: str = ""
    """Run name; outputs go to ``out_dir/name``. Default: the config file's name."""
    out_dir: str = "runs"
    """Folder for run outputs (metrics.jsonl, summary.json, loss.png)."""
    log_every: int = 10
    """Log metrics every this many steps (and at the last step)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    tensorboard: bool = True
    """Write TensorBoard event files beside metrics.jsonl (tensorboard --logdir runs)."""
    trace: bool = False
    """Write trace.json: a Perfetto trace of trace_steps steps on every rank (compute,
    communication and pipeline spans)."""
    trace_steps: int = 3
    """Steps the trace covers, from the second step of the run on."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device, for MFU (0: the datasheet's for known GPUs, else measured)."""

    def __post_init__(self):
        _require(self.log_every >= 1, "run.log_every", f"must be >= 1, got {self.log_every}")
        _require(self.trace_steps >= 1, "run.trace_steps", f"must be >= 1, got {self.trace_steps}")
        _require(self.peak_flops >= 0, "run.peak_flops", f"must be >= 0, got {self.peak_flops}")


@dataclass
class DataConfig:
    name: str = "digits"
    """Dataset: 'digits' (handwritten digits), 'regression' (generated, known coefficients), 'text',
    or your own as 'package.module:callable' returning (train, test) datasets of (input, target)."""
    path: str = ""
    """Optional .npz file to load the dataset's arrays from instead of the built-in source."""
    partition: str = "batch"
    """How samples are spread over data-parallel ranks: batch, split, replicate or hash."""
    policy: str = "drop"
    """Making shards equal: 'drop' the tail or 'pad' by repeating samples."""
    args: dict = field(default_factory=dict)
    """Arguments of the dataset builder (e.g. samples, features, noise, test_fraction)."""

    def __post_init__(self):
        _one_of(self.partition, SCHEMES, "data.partition")
        _one_of(self.policy, POLICIES, "data.policy")


@dataclass
class ModelConfig:
    name: str = "digits_cnn"
    """Shipped model (digits_cnn, linreg, mlp, gpt), or your own as 'package.module:callable'
    returning an nn.Module."""
    args: dict = field(default_factory=dict)
    """Arguments of the model factory (e.g. hidden, depth for mlp)."""
    deferred_init: bool = False
    """Your own model: build it on the meta device and give each rank memory only for its part,
    each module initialised by its reset_parameters() (seeded by its name). Only for models whose
    __init__ initialises nothing itself; otherwise every rank builds the whole model first. The
    shipped models always are."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run."""
    batch_size: int = 64
    """Global batch: samples per optimizer step over all data-parallel ranks."""
    lr: float = 0.01
    """Learning rate."""
    seed: int = 0
    """Seed for model initialisation and data order."""
    optimizer: str = "sgd"
    """sgd, adam or adamw."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay."""
    grad_clip: float = 0.0
    """Clip gradients to this global norm (0: no clipping)."""
    accum_steps: int = 1
    """Micro-batches per step per rank; gradients accumulate without communication in between."""
    bf16: bool = False
    """Run forward and loss under bf16 autocast."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    skip_nonfinite: bool = False
    """Skip an optimizer step whose loss or gradients are not finite, instead of stopping."""
    loss: str = "auto"
    """cross_entropy, mse, your own 'package.module:callable' (output, target) -> mean loss, or
    auto (the shipped dataset's own; cross_entropy for your data)."""
    lr_schedule: str = "constant"
    """After warmup: 'constant' (lr), 'cosine' or 'linear' decay from lr to min_lr at the last step."""
    warmup_steps: int = 0
    """Steps of linear warmup from lr / (warmup_steps + 1) up to lr."""
    min_lr: float = 0.0
    """Where cosine and linear decay end."""
    recompute: bool = False
    """Recompute each block's activations in backward (torch.utils.checkpoint) instead of keeping
    them: less memory, one more forward per step."""
    straggler: int = -1
    """A rank slowed down on purpose, for experiments (-1: none): it sleeps in every forward."""
    straggler_delay: float = 0.0
    """Seconds that rank sleeps per step."""

    def __post_init__(self):
        for key in ("steps", "batch_size", "accum_steps"):
            _require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        _one_of(self.optimizer, OPTIMIZERS, "train.optimizer")
        _require(self.loss in LOSSES or ":" in self.loss, "train.loss",
                 f"{self.loss!r} is not one of {', '.join(LOSSES)}, nor package.module:callable")
        _one_of(self.device, ("auto", "cpu", "cuda"), "train.device")
        for key in ("momentum", "weight_decay", "grad_clip", "eval_every", "warmup_steps", "min_lr", "straggler_delay"):
            _require(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        _one_of(self.lr_schedule, SCHEDULES, "train.lr_schedule")
        _require(self.min_lr <= self.lr, "train.min_lr", f"{self.min_lr:g} is above train.lr ({self.lr:g})")
        _require(self.warmup_steps < self.steps or self.lr_schedule == "constant", "train.warmup_steps",
                 f"{self.warmup_steps} leaves none of the {self.steps} steps to the {self.lr_schedule} decay")


@dataclass
class ParallelConfig:
    strategy: str = "allreduce"
    """How data-parallel gradients are combined: 'allreduce' among the ranks, or 'ps' (parameter servers)."""
    dp: int = 0
    """Data-parallel degree (0: inferred from the world size)."""
    pp: int = 1
    """Pipeline-parallel degree."""
    tp: int = 1
    """Tensor-parallel degree."""
    zero: int = 0
    """ZeRO stage (0: none)."""
    bucket_mb: float = 25.0
    """Gradient bucket size in MiB (data parallel and ZeRO 1-2: each reduced as backward fills it)."""
    prefetch: bool = True
    """ZeRO-3: launch the next block's all-gather before this block's pass (false: gather each
    block only when its pass needs it: one block whole at a time instead of two)."""
    reshard_after_forward: bool = True
    """ZeRO-3: free each block's gathered parameters after its forward (false: keep them until its
    backward, which then needs no all-gather: one gather per block and step fewer, for the whole
    model's parameters held at the end of the forward; FSDP's option of the same name)."""
    allow_unused: bool = False
    """Allow parameters that get no gradient (otherwise an error naming them)."""
    check_consistency: bool = True
    """At the end, verify that all replicas hold bitwise identical parameters."""
    grad_dtype: str = "fp32"
    """The dtype data-parallel (and ZeRO) gradients are reduced in: fp32, or bf16 (half the bytes;
    the optimizer and the parameters stay fp32)."""
    compress: str = "none"
    """Gradient compression with error feedback on dp and ZeRO-1: none, powersgd (rank
    ``compress_rank`` factors of each gradient matrix) or topk (each rank sends the
    ``compress_ratio`` largest elements); see plait.parallel.compress."""
    compress_rank: int = 2
    compress_ratio: float = 0.01
    compress_start: int = 10
    """Steps reduced uncompressed before compression starts."""
    tp_plan: dict = field(default_factory=dict)
    """How tensor parallelism splits the model: {module-name pattern: style}, e.g.
    {"model.layers.*.mlp.up_proj" = "colwise"}; styles colwise, colwise_gather, qkv, rowwise,
    vocab. Empty: the model's own tp_plan(), if it has one."""

    def __post_init__(self):
        _one_of(self.strategy, STRATEGIES, "parallel.strategy")
        for key in ("dp", "pp", "tp", "zero"):
            _require(getattr(self, key) >= 0, f"parallel.{key}", f"must be >= 0, got {getattr(self, key)}")
        _require(self.bucket_mb > 0, "parallel.bucket_mb", f"must be positive, got {self.bucket_mb}")
        _one_of(self.grad_dtype, ("fp32", "bf16"), "parallel.grad_dtype")
        _one_of(self.compress, ("none", "powersgd", "topk"), "parallel.compress")
        _require(self.compress_rank >= 1, "parallel.compress_rank", f"must be >= 1, got {self.compress_rank}")
        _require(0 < self.compress_ratio <= 1, "parallel.compress_ratio", f"must be in (0, 1], got {self.compress_ratio}")
        _require(self.compress_start >= 0, "parallel.compress_start", f"must be >= 0, got {self.compress_start}")
        if self.compress != "none":
            _require(self.zero <= 1, "parallel.compress", f"{self.compress!r} serves plain data parallel and ZeRO-1, "
                     f"not parallel.zero={self.zero} (it reduces slices); parallel.grad_dtype = 'bf16' halves its bytes")
            _require(self.grad_dtype == "fp32", "parallel.compress", f"{self.compress!r} and parallel.grad_dtype = "
                     f"{self.grad_dtype!r} both shrink the reduction; choose one")
        _require(self.zero in (0, 1, 2, 3), "parallel.zero", f"ZeRO stages are 0 (off), 1, 2 and 3, got {self.zero}")
        for pattern, style in self.tp_plan.items():
            _require(isinstance(style, str) and style in TP_STYLES, f"parallel.tp_plan.{pattern!r}",
                     f"unknown style {style!r}; choose one of {', '.join(TP_STYLES)}")


@dataclass
class PipelineConfig:
    microbatches: int = 1
    """Micro-batches per step per data-parallel rank (must divide its share of the batch)."""
    schedule: str = "1f1b"
    """'gpipe' (all forwards, then all backwards), '1f1b' (at most pp micro-batches in flight), or
    'zbh1' (1F1B with each backward split into the input's gradient and the weights', the latter
    run later, where the stage would wait)."""
    virtual: int = 1
    """Chunks (virtual stages) per stage: the model is cut into pp x virtual pieces, stage s
    holding pieces s, s + pp, ...; with '1f1b' that is interleaved 1F1B (its bubble shrinks
    virtual-fold; micro-batches must divide by pp), with 'gpipe' looped GPipe."""
    balance: str = "params"
    """Cut the model into stages balanced by 'params' (parameter count) or 'time' (measured)."""
    cuts: list = field(default_factory=list)
    """Explicit cut points instead: the index of the first block of stages 1..pp-1."""
    trace: bool = False
    """Record the last step: a Perfetto trace, a PNG timeline and the measured bubble."""
    blocks: str = ""
    """The model's chain of blocks, for models that are not an nn.Sequential and have no
    pipeline_blocks(): the dotted name of a ModuleList or Sequential, e.g. "model.layers". The
    modules its forward runs before it go to the first stage, the others to the last."""

    def __post_init__(self):
        _require(self.microbatches >= 1, "pipeline.microbatches", f"must be >= 1, got {self.microbatches}")
        _one_of(self.schedule, tuple(PIPELINE_SCHEDULES), "pipeline.schedule")
        _require(isinstance(self.virtual, int) and self.virtual >= 1, "pipeline.virtual", f"must be >= 1, got {self.virtual!r}")
        _require(self.virtual == 1 or self.schedule in VIRTUAL, "pipeline.virtual",
                 f"{self.virtual} chunks per stage run under pipeline.schedule = {' or '.join(map(repr, VIRTUAL))}, "
                 f"not {self.schedule!r}")
        _one_of(self.balance, ("params", "time"), "pipeline.balance")
        _require(all(isinstance(c, int) and not isinstance(c, bool) for c in self.cuts), "pipeline.cuts",
                 f"expected a list of block indices, got {self.cuts!r}")


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Folder of checkpoints (default: <run.out_dir>/<run.name>/checkpoints)."""
    every: int = 0
    """Save every this many steps, and at the end (0: never)."""
    keep: int = 2
    """How many complete checkpoints to keep; older ones are deleted."""
    resume: str = ""
    """'' starts fresh; 'latest' continues from the newest complete checkpoint; or a checkpoint folder."""
    async_: bool = False
    """``checkpoint.async``: copy the state at the step and write it while training goes on."""

    def __post_init__(self):
        _require(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        _require(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass
class DistConfig:
    backend: str = "auto"
    """auto (gloo on CPU, nccl on CUDA), gloo or nccl."""
    timeout: float = 300.0
    """Seconds any collective may wait for a peer before the run fails with an error."""

    def __post_init__(self):
        _one_of(self.backend, ("auto", "gloo", "nccl"), "dist.backend")
        _require(self.timeout > 0, "dist.timeout", f"must be positive, got {self.timeout}")


@dataclass
class PSConfig:
    servers: int = 1
    """Parameter servers: ranks 0..servers-1; the other ranks are workers."""
    mode: str = "sync"
    """sync (every step waits for every worker), async (no waiting) or ssp (bounded staleness)."""
    staleness: int = 2
    """ssp: how many steps a worker may run ahead of the slowest live worker (0 waits like sync)."""
    partition: str = "range"
    """How parameters are split over servers: 'range' (equal slices) or 'hash' (whole tensors by name)."""
    timeout: float = 60.0
    """Seconds a server waits for a worker's gradient before dropping it (async, ssp) or failing (sync)."""
    straggler: int = -1
    """Rank of a worker slowed down on purpose, for experiments (-1: none)."""
    straggler_delay: float = 0.0
    """Seconds that worker sleeps before each push."""

    def __post_init__(self):
        _require(self.servers >= 1, "ps.servers", f"must be >= 1, got {self.servers}")
        _one_of(self.mode, PS_MODES, "ps.mode")
        _require(self.staleness >= 0, "ps.staleness", f"must be >= 0, got {self.staleness}")
        _one_of(self.partition, PS_SCHEMES, "ps.partition")
        _require(self.timeout > 0, "ps.timeout", f"must be positive, got {self.timeout}")
        _require(self.straggler_delay >= 0, "ps.straggler_delay", f"must be >= 0, got {self.straggler_delay}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ps: PSConfig = field(default_factory=PSConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_combinations(cfg: Config) -> None:
    """Options that do not go together, refused before any worker starts. Every product of
    dp (or ZeRO 1-3), pp and tp composes; the parameter server is a role split, not a mesh axis."""
    p, t, z = cfg.parallel.pp, cfg.parallel.tp, cfg.parallel.zero
    if cfg.parallel.strategy != "ps":
        _require(cfg.ps == PSConfig(), "ps", f"ps.* options are set but parallel.strategy is "
                 f"{cfg.parallel.strategy!r}; add --set parallel.strategy=ps")
        return
    unsupported = {"parallel.pp": p > 1, "parallel.tp": t > 1, "parallel.zero": z,
                   "checkpoint": cfg.checkpoint.every or cfg.checkpoint.resume, "train.grad_clip": cfg.train.grad_clip,
                   "train.skip_nonfinite": cfg.train.skip_nonfinite, "train.eval_every": cfg.train.eval_every,
                   "train.recompute": cfg.train.recompute, "run.trace": cfg.run.trace,
                   "parallel.grad_dtype": cfg.parallel.grad_dtype != "fp32",
                   "parallel.compress": cfg.parallel.compress != "none",
                   "train.straggler (ps.straggler slows a worker here)": cfg.train.straggler >= 0}
    for key, used in unsupported.items():
        _require(not used, key, "not available with parallel.strategy = 'ps' in this version")
    _require(cfg.ps.timeout < cfg.dist.timeout, "ps.timeout", f"{cfg.ps.timeout:g} s must be shorter than "
             f"dist.timeout ({cfg.dist.timeout:g} s), which bounds how long a worker waits for its server")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    if kind is bool:
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
    elif kind is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
    elif kind is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        value = float(value)
    elif kind is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
    elif kind is dict:
        _require(isinstance(value, dict), key, f"expected a table, got {value!r}")
    elif kind is list:
        _require(isinstance(value, list), key, f"expected a list, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested ``data``, rejecting unknown keys by their full name."""
    hints = typing.get_type_hints(cls)
    names = [f.name.rstrip("_") for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if keyword.iskeyword(key):  # checkpoint.async: the field is async_
            key = f"{key}_"
        if key not in hints:
            raise ConfigError(f"{full}: unknown key (known here: {', '.join(names)})")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            _require(isinstance(value, dict), full, f"expected a table, got {value!r}")
            kwargs[key] = from_dict(kind, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, kind, full)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A TOML value (number, bool, string, array); a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` to nested ``data`` in place."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=0.1")
    *tables, leaf = key.split(".")
    node = data
    for i, table in enumerate(tables):
        node = node.setdefault(table, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(tables[: i + 1])} is a value, not a table")
    node[leaf] = _parse_value(text.strip())


def load_config(path: str | Path | dict | None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (or take a dict of its tables, or start from defaults when ``path`` is
    None) and apply overrides."""
    data: dict = {}
    if isinstance(path, dict):
        import copy

        data, path = copy.deepcopy(path), None
    if path is not None:
        file = Path(path)
        if file.is_dir():
            raise ConfigError(f"config {path} is a folder; expected a TOML file such as examples/digits_cnn.toml")
        try:
            data = tomllib.loads(file.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"config {path} cannot be read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {path} is not a text file (not UTF-8 at byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for assignment in overrides:
        apply_override(data, assignment)
    config = from_dict(Config, data)
    _check_combinations(config)
    if not config.run.name:
        config.run.name = Path(path).stem if path is not None else "run"
    if not config.checkpoint.dir:
        config.checkpoint.dir = str(Path(config.run.out_dir) / config.run.name / "checkpoints")
    return config
