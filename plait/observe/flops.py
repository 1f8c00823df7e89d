"""FLOPs of a training step and the device's peak, for achieved FLOP/s and MFU.

FLOPs are counted, not estimated: torch's ``FlopCounterMode`` runs the model's forward and
backward on one small batch on the meta device (no memory, no arithmetic) and adds up the
matrix products and convolutions it dispatches (2 FLOPs per multiply-add; element-wise work is
not counted, as in every MFU figure). For the GPT that is 6 x parameters x tokens plus the
attention scores, the count of the PaLM paper's appendix B; for a model whose input needs no
gradient the first layer's input gradient is rightly absent.

The peak: on a GPU the datasheet's dense figure for the precision in use; on a CPU, and on a GPU
not in the table, measured here by timing large matrix products on every rank at once (so that
ranks sharing a host share its cores, as they do while training).
"""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from plait.distributed.comm import all_reduce, barrier

# Dense (no sparsity) peak FLOP/s per GPU from the vendors' datasheets: (bf16 tensor cores, fp32).
# NVIDIA A100 datasheet (SXM and PCIe 80GB): 312 TFLOP/s bf16, 19.5 fp32.
# NVIDIA H100 datasheet, SXM: 989 TFLOP/s bf16 (1,979 is with sparsity), 67 fp32; PCIe: 756, 51.
# NVIDIA H200 datasheet (SXM): as the H100 SXM, 989 and 67.
GPU_PEAKS = {"A100": (312e12, 19.5e12), "H100 PCIe": (756e12, 51e12), "H100": (989e12, 67e12),
             "H200": (989e12, 67e12)}


def count_flops(model: torch.nn.Module, sample) -> float | None:
    """FLOPs of one forward and backward of ``model`` on ``sample`` (a batch, any size), per
    sample; None when the model cannot run on the meta device."""
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(sample.to("meta"))
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
    except Exception:  # a model whose forward does something the meta device cannot
        return None
    return counter.get_total_flops() / len(sample)


def datasheet_peak(device: torch.device, bf16: bool) -> tuple[float, str] | None:
    """(FLOP/s, source) of a known GPU, or None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(GPU_PEAKS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return GPU_PEAKS[key][0 if bf16 else 1], f"datasheet ({name}, {'bf16' if bf16 else 'fp32'})"
    return None


def find_peak(device: torch.device, bf16: bool, configured: float = 0.0, world_size: int = 1) -> tuple[float, str]:
    """(FLOP/s, source) of one device: ``configured`` if set, else the datasheet's, else measured
    on every rank at once (a collective then), every rank taking the best any saw."""
    if configured:
        return configured, "run.peak_flops"
    known = datasheet_peak(device, bf16)
    if known:
        return known
    if world_size > 1:
        barrier("peak FLOP/s measurement")  # ranks that share a host share its cores, as in training
    flops, source = measured_peak(device, bf16, torch.get_num_threads())
    if world_size > 1:
        flops = all_reduce(torch.tensor([flops], dtype=torch.float64, device=device), "peak FLOP/s",
                           op=dist.ReduceOp.MAX).item()
    return flops, source


@functools.cache
def measured_peak(device: torch.device, bf16: bool, threads: int, seconds: float = 0.3, n: int = 1024) -> tuple[float, str]:
    """(FLOP/s, source): the best of timed ``n x n`` matrix products over about ``seconds`` on
    ``threads`` intra-op threads. Measured once per process and setting."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best, f"measured ({n}x{n} {str(dtype).removeprefix('torch.')} matmul, {threads} thread{'s' if threads > 1 else ''})"
