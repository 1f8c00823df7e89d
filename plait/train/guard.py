"""Start a parameter-server worker so that its death does not end the run.

torch's elastic agent (torchrun) is all-or-nothing: when any process it started fails, it stops
all the others. That is right for all-reduce, where every rank is needed, and wrong for async
and ssp parameter servers, which go on without a lost worker. ``plait train`` therefore starts
those workers through this guard: it runs the real worker as its child, and if the child dies
(a crash, SIGKILL, the server dropping it), it says so and exits 0, so the agent lets the
servers and the other workers finish. A worker that exits with ``STOP_RUN`` (its loss
diverged, or a server told it the run stops) is not lost: that code is passed on. Servers run
under a guard too (for Ctrl-C, see ``main``), which passes their exit on: their failure ends the
run.

    python -m plait.train.guard SERVERS plait.train.worker CONFIG [--set K=V ...]

Only the standard library is imported here: the guard costs no torch start-up.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys


STOP_RUN = 3
"""A worker's exit code for "the whole run must stop" (its loss diverged, or a server failed and
told it so): passed on, not tolerated."""


def _start_child() -> None:
    """In the child before exec: SIGINT ignored (see ``main``), and, on Linux, SIGKILL if the guard
    itself is killed (no orphaned workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m plait.train.guard SERVERS MODULE [ARGS...]", file=sys.stderr)
        return 2
    servers, module, rest = int(argv[0]), argv[1], argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    # Every rank's process runs as this guard's child, with SIGINT ignored (Python keeps an ignored
    # SIGINT ignored): the terminal's Ctrl-C, reaching a child still in Python's start-up, would
    # print a traceback there. The guard gets Ctrl-C (from the terminal, and forwarded by the
    # launcher's agent) and passes it on as SIGTERM, which ends the child quietly at any point.
    child = subprocess.Popen([sys.executable, "-m", module, *rest], preexec_fn=_start_child)
    stopping = []

    def forward(signum, _frame):  # the agent stops the group: pass it on, and do not tolerate it
        stopping.append(signum)
        child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    if rank < servers and code < 0:  # a server's death ends the run: die of the same signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    if rank < servers or code in (0, STOP_RUN) or stopping:
        return code if code >= 0 else 128 - code
    try:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    except ValueError:
        how = f"killed by signal {-code}"
    sys.stderr.flush()
    os.write(2, f"plait: rank {rank} (parameter-server worker) was lost ({how}); the servers go on "
                f"without it\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
