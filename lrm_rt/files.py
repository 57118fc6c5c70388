"""Small file-system helpers shared by the writers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def chmod_as_open(path: Union[str, Path]) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666 & ~umask): mkstemp and safetensors create 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
