"""Small file-system helpers shared by the writers."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Union


def cache_dir() -> Path:
    """The per-user cache (kernel builds, the bf16 probe's decisions): LRM_RT_CACHE, else ~/.cache/lrm_rt."""
    return Path(os.environ.get("LRM_RT_CACHE", Path.home() / ".cache" / "lrm_rt"))


def chmod_as_open(path: Union[str, Path]) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666 & ~umask): mkstemp and safetensors create 0600.

    The mode comes from a new file created beside it with 0666 (the kernel applies the umask), not from
    ``os.umask(0); os.umask(m)``, which leaves the whole process at umask 0 for a moment and races with other
    threads (a server writing meshes from several)."""
    path = Path(path)
    for attempt in range(100):
        probe = path.with_name(f"{path.name}.mode{os.getpid()}.{threading.get_ident()}.{attempt}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
            os.unlink(probe)
        os.chmod(path, mode)
        return
    raise FileExistsError(f"cannot create a file beside {path} to read the default permissions")
