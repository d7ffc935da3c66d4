"""Atomic file writes: readers see the old file or the new one, never half of one."""
from __future__ import annotations

import os
import uuid
from typing import Callable


def write_atomic(path: str, write: Callable[[str], None]) -> str:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it over `path`.

    The temporary name is unique per call, so two writers of the same file never share one; the
    last rename wins whole. On failure the temporary file is removed and `path` is untouched."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
