"""The typer application and what every command shares (options, result output); no command lives here."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from sd35trt import __version__

app = typer.Typer(
    name="sd35trt",
    help="Stable Diffusion 3.5 → validated ONNX → FP8/FP16 TensorRT engines, with manifests and comparisons.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bundle_app = typer.Typer(help="Inspect and verify engine bundles.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")

ModelOpt = typer.Option("tiny", "--model", "-m", help="tiny | sd3.5-medium | sd3.5-large (random weights) | path to a local diffusers SD3.5 directory")
DeviceOpt = typer.Option("auto", "--device", help="torch device for export/calibration: auto, cpu or cuda")


def emit(result: Any) -> None:
    """Results go to stdout (JSON), logs to stderr."""
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    sys.stdout.flush()  # a library's exit handler on a GPU host can end the process before the buffer is flushed


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"sd35trt {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Set SD35TRT_DEBUG=1 to see tracebacks for user errors too."""


def ranges_from_options(batch: str, height: str, width: str, t5_tokens: str):
    from sd35trt.specs import Range, ShapeRanges

    return ShapeRanges(batch=Range.parse(batch, "--batch"), height=Range.parse(height, "--height"),
                       width=Range.parse(width, "--width"), t5_tokens=Range.parse(t5_tokens, "--t5-tokens"))
