"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import os
import platform


def cpu_description() -> str:
    """The CPU's model name from /proc/cpuinfo, with its family/model numbers (which name the
    generation when the model name is generic, e.g. AMD family 25 model 17 is Zen 4) and whether it
    has AVX-512 BF16."""
    info: dict[str, str] = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name", platform.processor() or "unknown")
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    if "avx512_bf16" in info.get("flags", "").split():
        cpu += ", AVX-512 BF16"
    return cpu
