"""Free memory of a device, as the memory plans and the server's /system_stats read it."""
from __future__ import annotations

import os
from typing import Optional

import torch


def available_memory(device) -> Optional[int]:
    """Bytes that can still be allocated on `device`: CUDA free memory, or MemAvailable on CPU (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None
