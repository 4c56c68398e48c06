"""Where am I running? Device, precision, Colab, threads and library versions.

Usage:
    from ftnb import env
    env.report()                 # prints a table, returns an EnvReport
    dtype = env.pick_dtype()     # bf16 on Ampere+, fp16 on a T4, fp32 on CPU
    env.seed_everything(0)
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import psutil
import torch

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate")


@dataclass
class EnvReport:
    device: str  # "cuda", "mps" or "cpu"
    device_name: str
    compute_capability: tuple[int, int] | None
    accelerator_total_gib: float | None
    accelerator_free_gib: float | None
    native_bf16: bool
    in_colab: bool
    cpu_cores: int
    torch_threads: int
    ram_total_gib: float
    ram_available_gib: float
    python: str
    versions: dict[str, str | None] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = {k: v for k, v in self.as_dict().items() if k != "versions"}
        rows.update({f"version.{k}": v or "not installed" for k, v in self.versions.items()})
        width = max(map(len, rows))
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())


def in_colab() -> bool:
    """True inside Google Colab (its kernel module is importable only there)."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def native_bf16() -> bool:
    """bf16 in hardware: CUDA compute capability >= 8 (Ampere). A T4 (7.5) only emulates it,
    although torch.cuda.is_bf16_supported() says True there, and runs it several times slower."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability() >= (8, 0)
    return False


def cpu_native_bf16() -> bool:
    """bf16 matrix instructions on this CPU (AVX512-BF16 or AMX: recent Xeon and EPYC). Where they
    exist a bf16 matmul runs several times faster than fp32 (5x measured on the 2-core EPYC of
    benchmarks/cpu_efficiency.json); where they do not, bf16 is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence looked up with a fallback
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def pick_dtype(cpu_bf16: bool = False) -> torch.dtype:
    """The training/compute dtype for this device: bf16 with native support, fp16 on older
    GPUs (T4, V100), fp32 on MPS and CPU; with `cpu_bf16`, bf16 on a CPU that has bf16
    instructions (cpu_native_bf16), fp32 on one without (emulated half precision is slow).

    Usage: load_model(name, quantization="nf4", dtype=pick_dtype(cpu_bf16=True))
    """
    if device_type() == "cuda":
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.bfloat16 if cpu_bf16 and device_type() == "cpu" and cpu_native_bf16() else torch.float32


def precision_flags(dtype: torch.dtype | None = None) -> dict[str, bool]:
    """The Trainer's mixed-precision switches for `dtype` (default pick_dtype()):
    TrainingArguments(**precision_flags()). bf16 on a CPU also needs use_cpu, or the Trainer refuses it.

    Usage: TrainingArguments(output_dir, **precision_flags(pick_dtype(cpu_bf16=True)))
    """
    dtype = dtype or pick_dtype()
    flags = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}
    if device_type() == "cpu" and flags["bf16"]:
        flags["use_cpu"] = True
    return flags


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def report(show: bool = True) -> EnvReport:
    """Collect (and by default print) what this machine offers for fine-tuning."""
    dev = device_type()
    name, capability, total, free = platform.processor() or platform.machine(), None, None, None
    if dev == "cuda":
        name = torch.cuda.get_device_name()
        capability = torch.cuda.get_device_capability()
        free_b, total_b = torch.cuda.mem_get_info()
        total, free = total_b / 2**30, free_b / 2**30
    elif dev == "mps":
        name = "Apple GPU (MPS)"
    vm = psutil.virtual_memory()
    result = EnvReport(
        device=dev,
        device_name=name,
        compute_capability=capability,
        accelerator_total_gib=None if total is None else round(total, 2),
        accelerator_free_gib=None if free is None else round(free, 2),
        native_bf16=native_bf16(),
        in_colab=in_colab(),
        cpu_cores=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        ram_total_gib=round(vm.total / 2**30, 2),
        ram_available_gib=round(vm.available / 2**30, 2),
        python=platform.python_version(),
        versions={lib: _version(lib) for lib in LIBRARIES},
    )
    if show:
        print(result)
    return result


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def setup(seed: int = 0, show: bool = True) -> EnvReport:
    """The first call of every recipe: all cores for torch, seeds set, library progress bars
    off (they clutter notebooks), and the environment report.

    Usage: report = env.setup(seed)
    """
    import datasets
    import transformers

    use_all_cores()
    seed_everything(seed)
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    return report(show)


def use_all_cores() -> int:
    """Give torch one thread per core. On a 2-core laptop or CI box the default can be
    lower or oversubscribed; this is worth up to 2x on CPU training. Returns the count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores
