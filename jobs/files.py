"""Files the project creates: atomic writes (readers see the old file or the new one, never half of
one) and opens that never follow a symbolic link (a link planted in a shared folder can't make us
truncate or write some other file)."""
from __future__ import annotations

import os
import uuid
from typing import Callable


class UnsafeFile(ValueError):
    """A path we were about to create, truncate or lock is a symbolic link; the message names it."""


def open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
    """`os.open` with O_NOFOLLOW | O_CLOEXEC: a symbolic link at `path` is refused with `UnsafeFile`."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError:
        if os.path.islink(path):
            raise UnsafeFile(f"{path} is a symbolic link; refusing to follow it (the project only creates plain "
                             "files there: remove the link)") from None
        raise


def write_atomic(path: str, write: Callable[[str], None]) -> str:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it over `path`.

    The temporary name is unique per call and created exclusively without following links, so two
    writers of the same file never share one and nothing planted under that name is written through;
    the rename replaces a link at `path` itself, never its target. The last rename wins whole. On
    failure the temporary file is removed and `path` is untouched."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    os.close(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    return path
