"""Memory options: autocast dtype, the per-process CUDA cap, cache release, the memory
line in the log, and the CPU check for 8-/4-bit loading."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from .errors import TrainError


def cpu_threads() -> int:
    """Cores this process may run on (its affinity on Linux; elsewhere, e.g. macOS, all cores)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def release_parallel_threads() -> bool:
    """Free the calling thread's OpenMP worker threads (torch runs its CPU ops on them), so that another thread can
    run the model at full speed. Each thread that runs a parallel op gets its own team of workers; once the process
    holds more of them than there are CPUs, the OpenMP runtime stops spinning between ops and puts its workers to sleep
    after every op: a decode step then takes a third longer or more (bench/decode_threads.py). The server loads the
    model in one thread and decodes in another, so the loading thread gives its team back (`omp_pause_resource_all`,
    OpenMP 5.0; the team is recreated if that thread runs an op again). Returns whether a runtime took the call."""
    import ctypes
    import glob

    import torch

    # torch's own runtime first (the one its ops use), then any OpenMP library this process has loaded
    paths = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "lib*omp*.so*")))
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths += sorted({line.split()[-1] for line in f if "omp" in line.rsplit("/", 1)[-1] and ".so" in line})
    except OSError:
        pass
    for path in paths:
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause(1) == 0  # omp_pause_soft
    return False


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_bf16() -> bool:
    """Native bf16 on the current CUDA GPU (Ampere or later). `torch.cuda.is_bf16_supported()` alone also says
    True on a T4 or V100, where bf16 is only emulated (it can create the tensors): there `auto` must choose fp16."""
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the flag: native bf16 is compute capability 8.0 (Ampere) or later
        return bool(torch.version.hip) or torch.cuda.get_device_capability() >= (8, 0)


def choose_precision(setting: str, device: str) -> str | None:
    """The autocast dtype name, or None for plain fp32."""
    if setting == "no":
        return None
    if device.startswith("cuda"):
        if setting == "fp16":
            return "float16"
        if setting == "bf16" or cuda_has_bf16():
            return "bfloat16"
        return "float16"
    if setting == "fp16":
        raise TrainError("fp16 autocast is for CUDA GPUs; on CPU use `memory.mixed_precision: bf16` or `no`.")
    if setting == "bf16" or cpu_has_bf16():
        return "bfloat16"
    return None


def quantization_problem(quantization: str, cuda_available: bool) -> str | None:
    """Why `model.quantization` cannot be used here, with the fix; None when it can."""
    if quantization == "none":
        return None
    if not cuda_available:
        return (
            f"`model.quantization: {quantization}` loads weights through bitsandbytes, which needs a CUDA GPU; "
            "none is available here. On CPU set `model.quantization: none` (LoRA on full-precision weights), "
            "and `model.dtype: bfloat16` to halve the memory of the frozen weights."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return f"`model.quantization: {quantization}` needs bitsandbytes: pip install 'kotune[quantization]'"
    return None


def apply_cap(fraction: float | None, device: str) -> bool:
    """Cap this process's CUDA memory; allocations past it raise OOM. True when applied."""
    if not fraction or not device.startswith("cuda"):
        return False
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
    return True


def release_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        gc.collect()
        torch.cuda.empty_cache()


def rss_mb() -> float:
    """Resident memory of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, in KiB on Linux


def memory_stats(device: str) -> dict:
    """Figures for the memory line and metrics.jsonl (MiB)."""
    out = {"rss_mb": round(rss_mb(), 1)}
    if device.startswith("cuda"):
        import torch

        d = torch.device(device)
        out.update(
            gpu_allocated_mb=round(torch.cuda.memory_allocated(d) / 2**20, 1),
            gpu_reserved_mb=round(torch.cuda.memory_reserved(d) / 2**20, 1),
            gpu_peak_mb=round(torch.cuda.max_memory_allocated(d) / 2**20, 1),
        )
    return out


def memory_line(stats: dict) -> str:
    if "gpu_allocated_mb" in stats:
        return (
            f"GPU allocated {stats['gpu_allocated_mb']:.0f} MiB, reserved {stats['gpu_reserved_mb']:.0f} MiB, "
            f"peak {stats['gpu_peak_mb']:.0f} MiB; process RSS {stats['rss_mb']:.0f} MiB"
        )
    return f"process RSS {stats['rss_mb']:.0f} MiB (CPU)"
