"""Command line: a thin typer layer over the library (nothing outside this package imports typer)."""
