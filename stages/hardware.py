"""What this machine can compute natively: CPU instruction sets, usable cores, torch dtypes by name.

Shared by extract (choosing its compute path), finetune (choosing its precision), predict and the benchmark.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),  # x86 / aarch64 (/proc/cpuinfo)
                "float16": ("avx512_fp16", "amx_fp16", "fphp")}


def read_cpu_capability() -> dict[str, Any]:
    """What this CPU can do natively: ISA flags from /proc/cpuinfo (what `lscpu` shows) plus torch's view.

    Returns {"model", "cores", "torch_capability", "avx2", "avx512", "avx512_bf16", "amx_bf16",
    "avx512_fp16", "amx_fp16", "native_bfloat16", "native_float16"}.
    """
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features") and not flags:
                flags = set(value.split())
            elif key in ("model name", "cpu model") and value.strip():
                model = value.strip()
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return {
        "model": model,
        "cores": available_cores(),
        "torch_capability": capability,
        "avx2": "avx2" in flags or capability in ("AVX2", "AVX512"),
        "avx512": "avx512f" in flags or capability == "AVX512",
        **{flag: flag in flags for flag in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")},
        "native_bfloat16": any(f in flags for f in NATIVE_FLAGS["bfloat16"]),
        "native_float16": any(f in flags for f in NATIVE_FLAGS["float16"]),
    }


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroups affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
