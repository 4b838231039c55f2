"""What the benchmark ran on: host, CPU and GPU names, versions, threads (recorded in every row)."""

from __future__ import annotations

import os
import platform
import socket

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return ""


def _load() -> str:
    """The 1-minute load average at the start (other processes competing for the CPU)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return ""


def machine_info(device: str) -> dict[str, str | int]:
    """A flat description of this machine for the run record and each row."""
    info: dict[str, str | int] = {
        "host": socket.gethostname(), "cpu": cpu_name(), "gpu": gpu_name(device),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count() or 0, "threads": torch.get_num_threads(), "device": device,
        "load_avg": _load(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda"] = torch.version.cuda or ""
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 1)
    return info
