"""How much memory a density grid may take, checked before allocating it (every field backend).

A grid too large for the machine should be a clear error naming the resolution, not an OOM kill or
an allocator traceback from deep inside torch.
"""
from __future__ import annotations

import os
from typing import Optional

from ..errors import ResourceError


def available_host_memory() -> Optional[int]:
    """Bytes the process can still allocate: MemAvailable, capped by a cgroup v2 limit when there is one."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check_grid_memory(resolution: int, extra_bytes: int, available: Optional[int], where: str) -> None:
    need = resolution ** 3 * 4 + extra_bytes
    if available is not None and need > available:
        raise ResourceError(
            f"a {resolution}^3 density grid needs {need} bytes ({need / 2**30:.2f} GiB) of {where} memory, "
            f"only {available} bytes ({available / 2**30:.2f} GiB) are available; lower the resolution")
