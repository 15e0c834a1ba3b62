"""Where networks run and in which precision: the ``device`` and ``precision`` params.

``device: auto | cpu | cuda | cuda:N`` (auto = the first CUDA device when PyTorch sees one,
else the CPU); ``precision: float32 | bfloat16`` (bfloat16 = autocast, on a CUDA device that
supports it or a CPU with bf16 instructions, AVX512-BF16 or AMX; elsewhere a one-line error
naming the key, never a silent emulation that is slower than float32).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from stages.errors import UserError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
DeviceName = Annotated[str, Field(pattern=DEVICE_PATTERN)]
Precision = Literal["float32", "bfloat16"]
# The Dask worker resource a unit that runs a network on CUDA asks for (one per GPU).
GPU_RESOURCE = "GPU"
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(spec: str, key: str) -> torch.device:
    """The ``torch.device`` of a ``device`` param; ``UserError`` naming ``key`` when it
    asks for a CUDA device PyTorch does not see."""
    if not re.match(DEVICE_PATTERN, spec):
        raise UserError(f"{key}: {spec!r} is not a device; expected auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            f"{key}: {spec} asked, but PyTorch sees no CUDA device here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use cpu or auto"
        )
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(
            f"{key}: {spec} asked, but PyTorch sees {torch.cuda.device_count()} CUDA "
            f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 instructions (Linux: the flags of /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: oneDNN's own check (true also where bf16 is emulated)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 kernels natively."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_bf16() and torch.backends.mkldnn.is_available()


def check_precision(precision: str, device: torch.device, key: str) -> None:
    """``UserError`` naming ``key`` when ``precision`` cannot run natively on ``device``."""
    if precision == "float32":
        return
    if precision != "bfloat16":
        raise UserError(f"{key}: {precision!r} is not a precision; expected float32 or bfloat16")
    if not bf16_supported(device):
        what = (
            "this CPU has no bf16 instructions (AVX512-BF16 or AMX)"
            if device.type == "cpu"
            else f"{device} does not support bfloat16"
        )
        raise UserError(f"{key}: bfloat16 asked, but {what}; use float32")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast to bfloat16 on ``device`` (a no-op for float32)."""
    if precision == "float32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def deterministic_cuda() -> None:
    """Same CUDA device, same bits: a fixed cuBLAS workspace (set before cuBLAS starts),
    deterministic cuDNN kernels and no autotuning. Call in the worker before its first
    CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
