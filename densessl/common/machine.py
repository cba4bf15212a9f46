"""One line saying which machine produced a number (benchmarks, study rows, golden losses)."""
from __future__ import annotations

import platform

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; elsewhere what `platform` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """CPU model, torch version and the threads torch uses now."""
    return f"{cpu_model()}; torch {torch.__version__}; {torch.get_num_threads()} threads"
