"""Run-time helpers shared by the engine, evaluation and strategies: the device, seeding,
per-epoch shuffle seeds, autocast for the run's precision, and evaluation mode."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from cl import distributed
from cl.errors import UserError


def resolve_device(name: str) -> torch.device:
    """The device of this process (under torchrun, a CUDA device is the rank's own GPU)."""
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"trainer.device={name} is not a device; use auto, cpu, cuda or cuda:<index>.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but this machine has no CUDA GPU; use trainer.device=cpu or auto.")
    return distributed.local_device(device)


def seed_everything(seed: int, deterministic: bool = True, device: torch.device | None = None) -> None:
    """Seed every generator; `deterministic` asks CUDA for deterministic kernels (CPU kernels
    are deterministic already, and the switch costs an import of torch's compiler stack)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and (device is None or device.type == "cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_seed(seed: int, experience: int, epoch: int) -> int:
    return (seed * 1_000_003 + experience * 10_007 + epoch) % 2**62


def autocast(device: torch.device, precision: str):
    """`torch.autocast` for bf16/16 precision (training and evaluation), else nothing."""
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, training in states:
            m.training = training


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak memory of a run: CUDA's allocator peak, and on Linux the
    process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then counts from the process's start
        pass


def peak_memory(device: torch.device) -> dict:
    """{"peak_memory_mb", "peak_memory_of"}: CUDA memory allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_of": "CUDA allocated"}
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return {"peak_memory_mb": hwm / 1024, "peak_memory_of": "process RSS (VmHWM)"}
    except (OSError, StopIteration):
        import resource

        return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_memory_of": "process RSS since start (ru_maxrss)"}
