"""Entry point of each worker process: ``python -m plait.train.worker CONFIG [--set K=V ...]``.

``plait train`` starts it through torch's elastic launcher; it reads RANK, WORLD_SIZE, ... from
the environment like any torchrun script.
"""

from __future__ import annotations

import argparse
import os
import sys

from plait.train.guard import STOP_RUN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plait.train.worker")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        return _train(args.config, args.overrides, os.environ.get("RANK", "0"))
    except KeyboardInterrupt:  # Ctrl-C reaches every process, even while torch loads: the launcher says it, once
        return 130


def _train(config: str, overrides: list[str], rank: str) -> int:
    import torch.distributed as dist

    from plait.dist.env import init, shutdown
    from plait.errors import PlaitError
    from plait.parallel.ps.worker import StopRun
    from plait.train.config import load_config
    from plait.train.trainer import Trainer, format_summary

    together = True  # leave the group with a barrier; parameter-server ranks leave on their own
    try:
        cfg = load_config(config, overrides)
        together = cfg.parallel.strategy != "ps"
        info = init(cfg.dist.backend, cfg.train.device, cfg.dist.timeout)
        if together:
            summary = Trainer(cfg, info).fit()
        else:
            from plait.train.ps import PSTrainer

            summary = PSTrainer(cfg, info).fit()
        if info.is_main:
            print(format_summary(summary, cfg.run.out_dir), flush=True)
    except (PlaitError, dist.DistError) as exc:  # DistError: a collective inside torch (DCP, barrier) failed
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        message = text if text.startswith("rank ") else f"rank {rank}: {text}"
        # One write call: ranks share the stream, and a pipe keeps a single small write whole.
        sys.stderr.flush()
        os.write(2, f"plait: error: {message}\n".encode())
        return STOP_RUN if isinstance(exc, StopRun) else 1  # the guard passes STOP_RUN on
    except KeyboardInterrupt:
        together = False  # the peers are stopping too: no barrier
        raise
    finally:
        shutdown(barrier=together)
    return 0


if __name__ == "__main__":
    sys.exit(main())
