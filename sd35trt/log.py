"""Progress and log lines go to stderr (rich); stdout carries results only."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console

console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


@contextmanager
def step(message: str) -> Iterator[dict[str, float]]:
    """Log ``message``, time the block, and log how long it took; yields a dict that receives ``seconds``."""
    timing: dict[str, float] = {}
    console.print(f"[bold]→[/bold] {message}")
    start = time.perf_counter()
    try:
        yield timing
    finally:
        timing["seconds"] = time.perf_counter() - start
    console.print(f"  [green]✓[/green] {message} ({timing['seconds']:.1f} s)")
