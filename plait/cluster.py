"""Where ``plait train`` runs: the launch settings a cluster manager gives in the environment.

- **Kubernetes** (Kubeflow's PyTorchJob): ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
  ``PET_RDZV_ENDPOINT``, ``PET_RDZV_BACKEND`` (and ``PET_NODE_RANK``, ``PET_MAX_RESTARTS``), which
  torchrun itself reads as the defaults of its options of the same names.
- **Slurm**: one ``plait train`` per node from ``srun`` (``--ntasks-per-node=1``): the step's
  node count (``SLURM_STEP_NUM_NODES``), this node's index (``SLURM_NODEID``), and the rendezvous
  on the step's first host (``SLURM_STEP_NODELIST``) at ``MASTER_PORT`` (default 29400); the run
  id is the job id. Only inside an ``srun`` step: a batch script's own shell is one node.

A command-line option wins over the environment; PyTorchJob's variables win over Slurm's.
"""

from __future__ import annotations

import os
import re

from plait.errors import PlaitError

DEFAULT_PORT = 29400


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``node[07-09,12],gpu1`` -> ``node07``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise PlaitError(f"SLURM_STEP_NODELIST={nodelist!r}: cannot read its first host")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def _int(env: dict, name: str) -> int:
    value = env[name]
    low, sep, high = value.partition(":")
    if sep and low == high:  # an elastic range of one size, as a PyTorchJob with min = max sets it
        value = low
    try:
        return int(value)
    except ValueError:
        hint = "; plait train runs a fixed number of nodes (MIN:MAX with MIN = MAX)" if ":" in value else ""
        raise PlaitError(f"environment variable {name}={value!r} is not an integer{hint}") from None


def launch_defaults(env: dict | None = None) -> dict:
    """Launch settings from the environment: any of nnodes, nproc, node_rank, rdzv_endpoint,
    max_restarts, run_id (None where the environment says nothing)."""
    env = os.environ if env is None else env
    found: dict = {}
    if "SLURM_STEP_NUM_NODES" in env and "SLURM_NODEID" in env:
        found["nnodes"] = _int(env, "SLURM_STEP_NUM_NODES")
        found["node_rank"] = _int(env, "SLURM_NODEID")
        if found["nnodes"] > 1:
            host = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
            found["rdzv_endpoint"] = f"{host}:{env.get('MASTER_PORT', DEFAULT_PORT)}"
        if "SLURM_JOB_ID" in env:
            found["run_id"] = f"slurm-{env['SLURM_JOB_ID']}"
    for key, name in (("nnodes", "PET_NNODES"), ("nproc", "PET_NPROC_PER_NODE"), ("node_rank", "PET_NODE_RANK"),
                      ("max_restarts", "PET_MAX_RESTARTS")):
        if env.get(name):
            found[key] = _int(env, name)
    if env.get("PET_RDZV_ENDPOINT"):
        found["rdzv_endpoint"] = env["PET_RDZV_ENDPOINT"]
        if "PET_NODE_RANK" not in env:
            found.pop("node_rank", None)  # c10d decides which node hosts the rendezvous
    backend = env.get("PET_RDZV_BACKEND")
    if backend and backend != "c10d":
        raise PlaitError(f"PET_RDZV_BACKEND={backend!r}: plait train uses torch's c10d rendezvous; set it to c10d")
    return found
