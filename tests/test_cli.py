"""End to end through the real command line: `plait train`, torchrun, two nodes, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from plait.testing import free_port

from conftest import EXAMPLES, ROOT, kill_worker_when, wait_until, worker_pid

PLAIT = [sys.executable, "-m", "plait.cli"]


def plait_train(*args: str, out_dir: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [*PLAIT, "train", *args, "--set", f"run.out_dir={out_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **env} if env else None)


def read_run(out_dir: Path, name: str):
    run = out_dir / name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((run / "summary.json").read_text())


def test_demo_trains_the_seed_cnn_on_two_workers(tmp_path):
    """What `make demo` runs: the shipped digits config, data parallel on 2 workers."""
    done = plait_train(str(EXAMPLES / "digits_cnn.toml"), "--nproc", "2", out_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics, summary = read_run(tmp_path, "digits_cnn")
    assert summary["test_accuracy"] >= 0.95
    assert summary["world_size"] == 2 and summary["layout"] == "dp=2 x pp=1 x tp=1"
    for key in ("final_loss", "steps", "samples_per_s", "wall_time_s"):
        assert key in summary
    assert [m["step"] for m in metrics] == list(range(10, summary["steps"] + 1, 10))
    assert all({"loss", "samples_per_s", "lr", "epoch"} <= m.keys() for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (tmp_path / "digits_cnn" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in done.stdout  # the summary
    assert re.search(r"per step \(rank 0\): [\d.]+ ms = .*forward [\d.]+.*; MFU [\d.]+% \(peak [\d.]+ GFLOP/s, measured\)",
                     done.stdout), done.stdout
    assert list((tmp_path / "digits_cnn").glob("events.out.tfevents.*"))  # TensorBoard's
    assert f"{summary['steps']}/{summary['steps']}" in done.stderr  # the progress bar


def test_linreg_is_world_size_invariant_and_matches_least_squares(tmp_path):
    runs = {}
    with ThreadPoolExecutor(2) as pool:
        futures = {n: pool.submit(plait_train, str(EXAMPLES / "linreg.toml"), "--nproc", str(n),
                                  "--set", f"run.name=linreg{n}", "--set", "run.progress=false",
                                  out_dir=tmp_path) for n in (1, 2)}
    for n, future in futures.items():
        done = future.result()
        assert done.returncode == 0, done.stderr
        runs[n] = read_run(tmp_path, f"linreg{n}")
        assert runs[n][1]["weights_rel_error"] < 1e-3
    curve1, curve2 = (torch.tensor([m["loss"] for m in runs[n][0]]) for n in (1, 2))
    torch.testing.assert_close(curve2, curve1, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.tensor(runs[2][1]["learned_weights"]),
                               torch.tensor(runs[1][1]["learned_weights"]), rtol=1e-5, atol=1e-7)


def test_two_nodes_on_loopback(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    common = [str(EXAMPLES / "linreg.toml"), "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint,
              "--set", "run.progress=false", "--set", "train.steps=50"]
    with ThreadPoolExecutor(2) as pool:
        nodes = [pool.submit(plait_train, *common, "--node-rank", str(r), out_dir=tmp_path) for r in (0, 1)]
        results = [n.result() for n in nodes]
    for r, done in enumerate(results):
        assert done.returncode == 0, f"node {r}: {done.stderr}"
    _, summary = read_run(tmp_path, "linreg")
    assert summary["world_size"] == 2 and summary["steps"] == 50


def test_two_nodes_from_a_cluster_managers_environment_alone(tmp_path):
    """The same command on every node, as a PyTorchJob's container runs it: the nodes, workers
    per node and rendezvous come from the operator's variables alone (torchrun reads the same),
    and c10d picks the node that hosts the rendezvous. One node from Slurm's variables, and a
    node rank, an endpoint, from the flags, take the path test_two_nodes_on_loopback takes
    (test_cluster_environment_is_read_as_documented reads them)."""
    port = str(free_port())
    nodes = [{"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}",
              "PET_RDZV_BACKEND": "c10d"}] * 2
    common = [str(EXAMPLES / "linreg.toml"), "--set", "run.progress=false", "--set", "train.steps=20"]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(plait_train, *common, out_dir=tmp_path, env=env) for env in nodes]
        results = [f.result() for f in futures]
    for r, done in enumerate(results):
        assert done.returncode == 0, f"node {r}: {done.stderr}"
    _, summary = read_run(tmp_path, "linreg")
    assert summary["world_size"] == 2 and summary["steps"] == 20


def test_cluster_environment_is_read_as_documented():
    from plait.cluster import first_host, launch_defaults
    from plait.errors import PlaitError

    assert first_host("gpu[07-09,12],cpu1") == "gpu07" and first_host("node3,node4") == "node3"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_NODES": "4", "SLURM_NODEID": "2",
             "SLURM_STEP_NODELIST": "n[003-006]"}
    assert launch_defaults(slurm) == {"nnodes": 4, "node_rank": 2, "rdzv_endpoint": "n003:29400", "run_id": "slurm-7"}
    assert launch_defaults({"SLURM_JOB_ID": "7", "SLURM_NNODES": "4"}) == {}  # a batch script's shell: one node
    kube = {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "8", "PET_RDZV_ENDPOINT": "job-master-0:23456"}
    assert launch_defaults(kube) == {"nnodes": 3, "nproc": 8, "rdzv_endpoint": "job-master-0:23456"}
    assert launch_defaults({"PET_NNODES": "2:2"}) == {"nnodes": 2}  # an elastic policy with min = max
    with pytest.raises(PlaitError, match=r"PET_NNODES='1:4' is not an integer; plait train runs a fixed number"):
        launch_defaults({"PET_NNODES": "1:4"})
    with pytest.raises(PlaitError, match="PET_RDZV_BACKEND='etcd': plait train uses torch's c10d"):
        launch_defaults({"PET_RDZV_BACKEND": "etcd"})


def test_shipped_cluster_examples_run_plait_train_alone():
    """The Slurm script is valid bash and runs one plait train per node from srun; the
    PyTorchJob's container runs the same plain command (its variables do the rest)."""
    sbatch = EXAMPLES / "cluster" / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(sbatch)], check=True)
    assert re.search(r"^srun plait train ", sbatch.read_text(), re.M)
    assert re.search(r'command: \["plait", "train", "examples/\w+\.toml"\]',
                     (EXAMPLES / "cluster" / "pytorchjob.yaml").read_text())


def torchrun_example(script: str, nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    """A shipped script under plain torchrun, as the README shows it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(EXAMPLES / script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done


def test_plain_torchrun_runs_a_script_that_imports_plait(tmp_path):
    done = torchrun_example("library_dp.py", 2, tmp_path)
    assert "2 replicas hold bitwise identical parameters" in done.stdout
    losses = [float(line.split("loss ")[1].split()[0]) for line in done.stdout.splitlines() if "loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_plain_torchrun_runs_the_hybrid_library_example(tmp_path):
    """examples/library_hybrid.py as the README shows it: pp=2 x tp=2, ZeRO-1, clipping by the
    global norm, on 4 processes; the GPT learns the repeating sequence."""
    done = torchrun_example("library_hybrid.py", 4, tmp_path)
    assert "done: dp=1 x pp=2 x tp=2, ZeRO-1 on 4 processes" in done.stdout
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in done.stdout.splitlines() if "loss" in line]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("args, message", [
    (["--set", "train.lrate=0.1"], "plait: error: train.lrate: unknown key"),
    (["--nproc", "2", "--set", "parallel.dp=4"], "plait: error: mesh: dp=4 x pp=1 x tp=1 = 4 processes, but the world size is 2"),
    (["--set", "data.path=missing.npz"], "plait: error: data.path: dataset file not found: missing.npz"),
    (["--nproc", "0"], "plait: error: argument --nproc/--nproc-per-node: must be at least 1, got 0"),
    (["--nnodes", "2"], "plait: error: --rdzv-endpoint HOST:PORT is required when --nnodes > 1"),
    (["--set", "parallel.strategy=ps"], "plait: error: ps.servers: 1 server(s) in a world of 1 leaves no worker"),
    (["--set", "train.lr_schedule=step"], "plait: error: train.lr_schedule: 'step' is not one of constant, cosine, linear"),
    (["--set", "train.lr_schedule=cosine", "--set", "train.warmup_steps=200"],
     "plait: error: train.warmup_steps: 200 leaves none of the 200 steps to the cosine decay"),
    (["--nproc", "2", "--set", "train.straggler=2"], "plait: error: train.straggler: rank 2 does not exist in a world of 2"),
], ids=["unknown-key", "mesh", "missing-dataset", "nproc-0", "nnodes-no-endpoint", "ps-no-worker", "lr-schedule",
        "warmup-too-long", "straggler-rank"])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    done = plait_train(str(EXAMPLES / "linreg.toml"), *args, out_dir=tmp_path, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert not (tmp_path / "linreg").exists(), "nothing may start before the input is checked"


def test_worker_side_error_names_the_rank(tmp_path):
    done = plait_train(str(EXAMPLES / "linreg.toml"), "--nproc", "2", "--set", "data.args.features=0",
                       out_dir=tmp_path, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    # Both ranks fail on the same input at once; whichever exits first is named (the agent may
    # stop the other before it prints).
    assert any(re.fullmatch(r"plait: error: rank [01]: data.args: need samples >= 2 and features >= 1, got 1024, 0", line)
               for line in lines), done.stderr
    assert re.fullmatch(r"plait: error: worker rank [01] failed \(exit code 1\); its message is above", lines[-1])
    assert "Traceback" not in done.stderr


def _loading_torch(pid: int | None) -> bool:
    try:
        return pid is not None and "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


PS_ASYNC = ["--nproc", "3", "--set", "parallel.strategy=ps", "--set", "ps.mode=async"]


@pytest.mark.parametrize("strategy, when", [([], "training"), (PS_ASYNC, "training"), (PS_ASYNC, "start-up")],
                         ids=["allreduce-training", "ps-async-training", "ps-async-start-up"])
def test_ctrl_c_stops_every_process_with_one_line(tmp_path, strategy, when):
    """Ctrl-C reaches the whole process group (launcher, guards, workers), at any moment (here
    while training, or while the workers still load torch): one line, exit 130."""
    cmd = [sys.executable, "-m", "plait.cli", "train", str(EXAMPLES / "linreg.toml"), "--nproc", "2", *strategy,
           "--set", "train.steps=100000", "--set", "train.batch_size=128", "--set", "run.log_every=10",
           "--set", "run.progress=false", "--set", f"run.out_dir={tmp_path}"]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # its own process group, as a terminal gives it
    metrics = tmp_path / "linreg" / "metrics.jsonl"
    if when == "training":
        wait_until(run, lambda: metrics.is_file() and metrics.read_text() != "", "training did not start")
    else:  # every rank past Python's own start-up (which no program can make quiet), loading torch
        wait_until(run, lambda: all(_loading_torch(worker_pid(str(tmp_path), rank=r)) for r in range(3)),
                   "not every rank loads torch")
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    assert stderr.rstrip().endswith("plait: interrupted") and "Traceback" not in stderr, stderr


def test_killed_worker_is_restarted_and_resumes(world2, tmp_path):
    """SIGKILL rank 1 mid-run: the elastic agent restarts the group, which resumes by itself."""
    from conftest import train_example

    steps, name = 150, f"elastic-{os.getpid()}"
    cmd = [*PLAIT, "train", str(EXAMPLES / "digits_cnn.toml"), "--nproc", "2", "--max-restarts", "3",
           "--set", f"train.steps={steps}", "--set", "checkpoint.every=10", "--set", f"run.name={name}",
           "--set", f"run.out_dir={tmp_path}", "--set", "run.log_every=1", "--set", "run.progress=false"]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step20 = tmp_path / name / "checkpoints" / "step_00000020"
    stdout, stderr = kill_worker_when(run, step20.is_dir, name, rank=1, what="no checkpoint appeared")
    assert run.returncode == 0, stderr
    assert "plait: resumed from" in stdout
    metrics, summary = read_run(tmp_path, name)
    assert summary["steps"] == steps and 20 <= summary["resumed_from_step"] < steps
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    _, expected = world2.run(train_example, "digits_cnn", [], str(tmp_path / "reference"), steps)[0]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in metrics]), torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_resume_flag_checks_the_checkpoint_first(tmp_path):
    done = plait_train(str(EXAMPLES / "linreg.toml"), "--resume", str(tmp_path / "nope"), out_dir=tmp_path, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"plait: error: checkpoint not found: {tmp_path / 'nope'}"


def test_pipeline_from_the_command_line_with_trace(tmp_path):
    done = plait_train(str(EXAMPLES / "digits_cnn.toml"), "--nproc", "2", "--set", "parallel.pp=2",
                       "--set", "pipeline.microbatches=4", "--set", "pipeline.schedule=zbh1",
                       "--set", "pipeline.trace=true", "--set", "train.steps=40", "--set", "run.progress=false",
                       out_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    _, summary = read_run(tmp_path, "digits_cnn")
    assert summary["layout"] == "dp=1 x pp=2 x tp=1" and summary["bubble_theory"] == pytest.approx(1 / 13)
    assert 0 < summary["bubble_ideal"] < 1 and 0 < summary["bubble_measured"] < 1
    # each pass started no earlier than its input was made, in the schedule's order: run again with
    # the same times and nothing between passes, the step cannot be longer (the stages share a clock)
    assert 0 < summary["bubble_replayed"] <= summary["bubble_measured"] + 1e-9
    trace = json.loads((tmp_path / "digits_cnn" / "pipeline_trace.json").read_text())
    boxes = [e["name"] for e in trace["traceEvents"] if e["ph"] == "X"]
    assert sorted(boxes) == sorted(f"{k}{i}" for k in "FIW" for i in range(4) for _ in range(2))
    assert (tmp_path / "digits_cnn" / "pipeline_timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_gpt_tensor_parallel_from_the_command_line(tmp_path):
    done = plait_train(str(EXAMPLES / "gpt_tp.toml"), "--nproc", "2", "--set", "parallel.tp=2",
                       "--set", "train.steps=20", "--set", "data.args.max_chars=30000", "--set", "run.progress=false",
                       out_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    _, summary = read_run(tmp_path, "gpt_tp")
    assert summary["layout"] == "dp=1 x pp=1 x tp=2" and summary["tokens_per_s"] > 0
    assert "tokens/s" in done.stdout and "unigram entropy" in done.stdout


def test_single_node_run_listens_on_loopback_only(tmp_path):
    """Through the launcher: the agent (file rendezvous), and every worker's store and gloo
    sockets, listen on loopback addresses only."""
    from conftest import LOOPBACK, listening_addresses

    name = f"loopback-{os.getpid()}"
    cmd = [*PLAIT, "train", str(EXAMPLES / "linreg.toml"), "--nproc", "2", "--set", "train.steps=1000000",
           "--set", "run.log_every=10", "--set", "run.progress=false", "--set", f"run.name={name}",
           "--set", f"run.out_dir={tmp_path}"]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        metrics = tmp_path / name / "metrics.jsonl"
        wait_until(run, lambda: metrics.is_file() and metrics.read_text() != "", "training did not start")
        pids = {"launcher": run.pid, **{f"rank {r}": worker_pid(name, r) for r in (0, 1)}}
        found = {who: listening_addresses(pid) for who, pid in pids.items()}
    finally:
        os.killpg(run.pid, signal.SIGINT)
        run.communicate(timeout=60)
    assert found["rank 0"], "rank 0 hosts the workers' store: it must listen somewhere"
    for who, addresses in found.items():
        assert set(addresses) <= LOOPBACK, f"{who} listens beyond loopback: {addresses}"


def test_zero3_workers_put_large_tensors_on_huge_pages_unless_the_user_says(tmp_path, monkeypatch):
    """ZeRO-3's ranks fault a unit's memory in again at every gather (its memory goes back to the
    system after each use): THP_MEM_ALLOC_ENABLE for them, read at a process's start; other
    layouts are left as they are, and a value the user set wins; the launcher's own environment
    is as it was afterwards."""
    from plait import cli, launch

    seen = []
    monkeypatch.setattr(launch, "_run", lambda spec: seen.append(os.environ.get("THP_MEM_ALLOC_ENABLE")))
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    for zero in (3, 1):
        cli.main(["train", str(EXAMPLES / "mlp_10m.toml"), "--nproc", "2", "--set", f"parallel.zero={zero}",
                  "--set", f"run.out_dir={tmp_path}"])
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    cli.main(["train", str(EXAMPLES / "mlp_10m.toml"), "--nproc", "2", "--set", "parallel.zero=3",
              "--set", f"run.out_dir={tmp_path}"])
    assert seen == ["1", None, "0"]
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert launch.worker_env(launch.LaunchSpec(nproc=2, huge_pages=True), {}) == {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2)), "THP_MEM_ALLOC_ENABLE": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
