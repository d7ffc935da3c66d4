"""The user-facing errors every layer raises; the command line and the job entry points turn each
into one line and an exit code (2: a mistake in the input, 3: data that fails its checks)."""
from __future__ import annotations


class SpecError(ValueError):
    """A spec that can't be loaded; the message names the file and the offending key."""
