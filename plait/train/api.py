"""The whole trainer from a script: ``plait.fit``, started by plain ``torchrun``.

    # train.py, started by: torchrun --nproc-per-node 4 train.py
    import plait
    from mymodels import Net, load_data

    plait.fit(Net, load_data, "train.toml", overrides=["parallel.pp=2", "parallel.tp=2"])

Everything ``plait train`` does (layouts from the config, checkpoints and resume, the outputs
under ``runs/<name>/``, the progress bar and summary on rank 0) with the model and data given as
Python callables instead of names in the config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from plait.train.config import Config, load_config


def fit(model: Callable | str, data: Callable | str, config: str | Path | dict | Config | None = None, *,
        loss: Callable | str | None = None, overrides: list[str] = ()) -> dict:
    """Train ``model(**model.args)`` on ``data(**data.args)`` as the config says, on every rank
    of the process group torchrun started (or alone, without torchrun); returns the summary.

    Args:
        model: a callable returning an ``nn.Module`` (a class, a function), or a config name.
        data: a callable returning ``(train, test)`` map-style datasets of ``(input, target)``
            pairs (or ``(train, test, info)``), or a config name such as ``"digits"``.
        config: a TOML file, a dict of the same tables, a ``Config``, or None (defaults).
        loss: ``loss(output, target)`` (a mean), or a ``train.loss`` name; default: the config's.
        overrides: ``"key=value"`` strings, as ``plait train --set``.
    """
    from plait.distributed.env import init
    from plait.train.metrics import format_summary
    from plait.train.trainer import Trainer

    cfg = _config(config, overrides)
    for table, value in (("model", model), ("data", data)):
        setattr(getattr(cfg, table), "name", _name(value))  # what the run's records say it trained
    if isinstance(loss, str):
        cfg.train.loss, loss = loss, None
    info = init(cfg.dist.backend, cfg.train.device, cfg.dist.timeout)
    trainer = Trainer(cfg, info, model_fn=None if isinstance(model, str) else model,
                      data_fn=None if isinstance(data, str) else data, loss_fn=loss)
    summary = trainer.fit()
    if info.is_main:
        print(format_summary(summary, cfg.run.out_dir), flush=True)
    return summary


def _config(config, overrides) -> Config:
    if isinstance(config, Config):
        config = config.to_dict()
    return load_config(config, list(overrides))


def _name(value) -> str:
    if isinstance(value, str):
        return value
    return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', type(value).__name__)}"
