"""Progress and log lines go to stderr (rich); stdout carries results only."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


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


@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar with ETA on stderr (transient); yields ``advance(n=1)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True)
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


@contextmanager
def working(label: str) -> Iterator[None]:
    """A spinner with elapsed time on stderr (transient) around one long native call (ONNX tracing, an engine
    build) whose progress cannot be observed, so it has no ETA; loops use ``progress``, which has one."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(SpinnerColumn(), TextColumn(f"  {label}"), TimeElapsedColumn(), console=console, transient=True)
    with bar:
        bar.add_task(label, total=None)
        yield
