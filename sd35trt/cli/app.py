"""The typer application and what every command shares (options, result output); no command lives here."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
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
ModelRunOpt = typer.Option(None, "--model", "-m", help="tiny | sd3.5-medium | sd3.5-large | sd3.5-large-turbo | a local diffusers directory; with --bundle/--onnx only a check (they carry their tokenizers and configs) [default: tiny with --torch]")
T5Opt = typer.Option(True, "--t5/--no-t5", help="--no-t5: CLIP-only, T5 embeddings are zeros (as diffusers with text_encoder_3=None); a bundle built without T5 is CLIP-only anyway")
TurboOpt = typer.Option(None, "--turbo/--no-turbo", help="the model is (not) a Turbo distillation: 4 steps, guidance 0 by default [default: what the model or bundle says]")
VramOpt = typer.Option(None, "--vram", help="GiB of GPU memory this run may use [default: the GPU's free memory]")
VramPlanOpt = typer.Option("auto", "--vram-plan", help="auto | resident | sequential | streaming (doctor BUNDLE shows what each needs)")
TilingOpt = typer.Option("auto", "--vae-tiling", help="auto (tiles only past what the VAE decoder takes whole) | on | off")
LoraOpt = typer.Option(None, "--lora", help="LoRA adapters fused into the model first: adapter.safetensors[:scale][,more] (diffusers' SD3 LoRA loader; part of every cache key)")
DeviceOpt = typer.Option("auto", "--device", help="torch device for export/calibration: auto, cpu or cuda")
Int8Opt = typer.Option("", "--int8", help="components whose weights are stored in INT8 (weight-only, one scale per output channel; no calibration), e.g. clip_l,clip_g: half their FP16 size, on every GPU target (make's INT8=)")


_results: Any = None  # stdout while a command runs; sys.stdout is then stderr (see results_on_stdout)


@contextlib.contextmanager
def results_on_stdout() -> Iterator[None]:
    """While a command runs, library prints go to stderr and only ``echo``/``emit`` reach stdout: ModelOpt
    prints "Loading extension modelopt_cuda_ext_fp8..." when its CUDA kernels first load (seen on the GPU
    machine in the middle of `selftest --json`'s output)."""
    global _results
    _results, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stdout, _results = _results, None


def echo(text: str) -> None:
    """A result line on stdout (tables, paths); logs go to stderr."""
    stream = _results if _results is not None else sys.stdout
    stream.write(text + "\n")
    stream.flush()  # a library's exit handler on a GPU host can end the process before the buffer is flushed


def emit(result: Any) -> None:
    """Results go to stdout (JSON), logs to stderr."""
    echo(json.dumps(result, indent=2, default=str))


def version_callback(value: bool) -> None:
    if value:
        echo(f"sd35trt {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Set SD35TRT_DEBUG=1 to see tracebacks for user errors too."""


def ranges_from_options(batch: str, height: str, width: str, t5_tokens: str, *, cfg: bool = True, vae_max: int = 0,
                        vae_batch: int = 1):
    from sd35trt.core.shapes import Range, ShapeRanges

    return ShapeRanges(batch=Range.parse(batch, "--batch"), height=Range.parse(height, "--height"),
                       width=Range.parse(width, "--width"), t5_tokens=Range.parse(t5_tokens, "--t5-tokens"), cfg=cfg,
                       vae_max=vae_max, vae_batch=vae_batch)


def click_command() -> Any:
    """The click command typer builds from ``app``, with plain flags shown without a ``<bool>`` metavar
    (typer 0.29's vendored click prints one after every flag)."""
    import typer.main

    command = typer.main.get_command(app)

    def plain(node: Any) -> None:
        names = {n for param in getattr(node, "params", []) for n in (*getattr(param, "opts", ()),
                                                                     *getattr(param, "secondary_opts", ()))}
        for param in getattr(node, "params", []):
            if getattr(param, "is_flag", False):
                param.metavar = ""
            elif getattr(param, "opts", None) and param.param_type_name == "option":
                param.callback = _refuse_option_as_value(param.callback, names)
        for sub in getattr(node, "commands", {}).values():
            plain(sub)

    plain(command)
    return command


def _refuse_option_as_value(callback: Any, names: set[str]) -> Any:
    """An option whose value is another option of the command (``--vae-tiling --out x.png``: ``--out`` taken as
    the value, then "unexpected extra argument x.png") is refused naming the option that lacks its value."""

    def check(ctx: Any, param: Any, value: Any) -> Any:
        if value is not None and str(value) in names:
            from typer import BadParameter

            raise BadParameter(f"needs a value, but the next word is the option {value}", ctx=ctx, param=param)
        return callback(ctx, param, value) if callback is not None else value

    return check
