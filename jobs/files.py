"""Files the project creates: atomic writes (readers see the old file or the new one, never half of
one) and opens that never follow a symbolic link (a link planted in a shared folder can't make us
truncate or write some other file)."""
from __future__ import annotations

import os
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
    """Call `write(tmp)` to fill a temporary file, then rename it over `path`.

    The temporary file lives in a private folder (mode 0700, made for this call) beside `path`, so
    `write` may reopen it by name without anyone being able to plant a link there; the rename
    replaces a link at `path` itself, never its target. Two writers never share a temporary file; the
    last rename wins whole. On failure the temporary folder is removed and `path` is untouched."""
    import shutil
    import tempfile
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    private = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    tmp = os.path.join(private, "new")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return path
