"""Progress display for long steps: a spinner with elapsed time per step, and the timings kept."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console


class Steps:
    """`with steps.step("read source"):` shows a live spinner on a terminal and records seconds."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        live = self.enabled and self.console.is_terminal
        status = self.console.status(f"{name} ...") if live else None
        if status:
            status.start()
        try:
            yield
        finally:
            if status:
                status.stop()
            elapsed = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            if self.enabled:
                ok = sys.exc_info()[0] is None
                mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
                self.console.print(f"{mark} {name} [dim]({elapsed:.2f} s)[/dim]", highlight=False)


QUIET = Steps(enabled=False)
