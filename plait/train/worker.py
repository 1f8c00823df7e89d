"""Entry point of each worker process: ``python -m plait.train.worker CONFIG [--set K=V ...]``.

``plait train`` starts it through torch's elastic launcher; it reads RANK, WORLD_SIZE, ... from
the environment like any torchrun script.

A failure on this rank, whatever raised it, is said in one line (rank, where, cause) and the
process exits at once, without waiting for its peers: the launcher's agent sees the exit and
stops the other ranks within its monitor interval, so a failure on one rank ends the whole run
in seconds instead of leaving its peers blocked in a collective until ``dist.timeout``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from plait.train.guard import STOP_RUN

FOLLOW_ON_GRACE_S = 3.0
"""How long a rank whose error may follow from a peer's (``PlaitError.follow_on``, or an error
that is not Plait's own) waits before saying so. When a peer failed first, the launcher's agent
stops this rank within that time and only the peer's own cause is printed; when nobody stopped
it (a peer stalled, or no agent watches), the rank reports after it."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plait.train.worker")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        code = _train(args.config, args.overrides, os.environ.get("RANK", "0"))
    except KeyboardInterrupt:  # Ctrl-C reaches every process, even while torch loads: the launcher says it, once
        return 130
    # Leave now, either way. Failed, and said so: closing every connection at once (the peers see
    # it, and the agent stops them); the interpreter's own teardown of torch could take seconds on
    # a loaded machine. Done: the run's files are closed and the process group destroyed, and the
    # teardown's C++ destructors aborted the process about once in 25 runs here ("terminate called
    # without an active exception", a joinable thread destroyed), failing a finished run.
    if not code:
        import atexit

        atexit._run_exitfuncs()  # what the user's code registered still runs
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train(config: str, overrides: list[str], rank: str) -> int:
    from plait.distributed.env import init, shutdown
    from plait.train.config import load_config
    from plait.train.metrics import format_summary
    from plait.train.trainer import Trainer

    together = True  # leave the group with a barrier; parameter-server ranks leave on their own
    failed = False  # then leave without touching the group: main() exits the process at once
    trainer, cfg, where = None, None, "start-up"
    try:
        cfg = load_config(config, overrides)
        together = cfg.parallel.strategy != "ps"
        info = init(cfg.dist.backend, cfg.train.device, cfg.dist.timeout)
        if together:
            trainer = Trainer(cfg, info)
            summary = trainer.fit()
        else:
            from plait.train.ps import PSTrainer

            ps_trainer = PSTrainer(cfg, info)
            where = "the parameter-server run"
            summary = ps_trainer.fit()
        if info.is_main:
            print(format_summary(summary, cfg.run.out_dir), flush=True)
    except KeyboardInterrupt:
        together = False  # the peers are stopping too: no barrier
        raise
    except Exception as exc:  # noqa: BLE001 - any failure: one line, and leave without the peers
        failed = True
        # Rank 0's progress bar may hold the terminal's current line: another rank's error starts
        # on a new one (rank 0 closes its bar on the way out).
        lead = "\n" if trainer is not None and cfg.run.progress and rank != "0" else ""
        return _report(exc, rank, trainer.where if trainer is not None else where, cfg, lead)
    finally:
        if not failed:
            shutdown(barrier=together)
    return 0


def _report(exc: Exception, rank: str, where: str, cfg, lead: str = "") -> int:
    """Say one line for ``exc``; return the exit code. Unexpected errors keep their traceback in
    the run folder (``PLAIT_VERBOSE=1`` prints it as well)."""
    import traceback

    import torch.distributed as dist

    from plait.errors import PlaitError, first_line
    from plait.parallel.ps.worker import StopRun

    alone = os.environ.get("WORLD_SIZE", "1") == "1"
    if not alone and (not isinstance(exc, PlaitError) or exc.follow_on):
        # A peer's failure may be the cause (gloo says "Connection closed by peer" from inside
        # torch, DCP, ...): let the agent stop this rank first, so only the cause is printed.
        time.sleep(FOLLOW_ON_GRACE_S)
    text = first_line(exc)
    if isinstance(exc, (PlaitError, dist.DistError)):
        message = text if text.startswith("rank ") else f"rank {rank}: {text}"
    else:  # a bug, or an error in user code or data: name the place and keep the traceback
        message = f"rank {rank}: {where}: {type(exc).__name__}: {text}"
        detail = "".join(traceback.format_exception(exc))
        saved = _save_traceback(detail, rank, cfg)
        if saved:
            message += f" (traceback: {saved})"
        if os.environ.get("PLAIT_VERBOSE"):
            sys.stderr.write(detail)
    # One write call: ranks share the stream, and a pipe keeps a single small write whole.
    sys.stderr.flush()
    os.write(2, f"{lead}plait: error: {message}\n".encode())
    return STOP_RUN if isinstance(exc, StopRun) else 1  # the guard passes STOP_RUN on


def _save_traceback(detail: str, rank: str, cfg) -> str | None:
    if cfg is None:
        return None
    from pathlib import Path

    path = Path(cfg.run.out_dir) / cfg.run.name / f"error_rank{rank}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(detail)
    except OSError:
        return None
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
