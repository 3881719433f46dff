"""``sd35trt`` entry point: the export and calibrate commands, the other commands' registration
(``sd35trt.cli.commands``), and the mapping of user errors to one line + exit code 2."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

# Library notices (transformers/diffusers print some at import) would break "one line on stderr per error".
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sd35trt.cli import build_commands, commands  # noqa: E402, F401  (register their subcommands)
from sd35trt.cli.app import (  # noqa: E402
    DeviceOpt,
    Int8Opt,
    LoraOpt,
    ModelOpt,
    app,
    click_command,
    echo,
    emit,
    ranges_from_options,
    results_on_stdout,
)
from sd35trt.core.errors import Sd35TrtError  # noqa: E402
from sd35trt.core.shapes import ShapeRanges  # noqa: E402
from sd35trt.producers.calibrate import CalibrationConfig as Calib  # noqa: E402  (defaults live in the configs)
from sd35trt.producers.export import DEFAULT_OPSET  # noqa: E402

_RANGES = ShapeRanges()  # the CLI shows the library's default shape ranges


@app.command()
def export(
    model: str = ModelOpt,
    out: Path = typer.Option(Path("build"), "--out", "-o", help="work directory: OUT/onnx-fp16/, OUT/onnx-fp8/, OUT/onnx/ per component"),
    components: Optional[str] = typer.Option(None, "--components", help="comma-separated subset of transformer,clip_l,clip_g,t5,vae_decoder"),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset (17-21)"),
    height: str = typer.Option(str(_RANGES.height), "--height", help="pixel height range MIN:OPT:MAX (multiples of 16)"),
    width: str = typer.Option(str(_RANGES.width), "--width", help="pixel width range MIN:OPT:MAX (multiples of 16)"),
    batch: str = typer.Option(str(_RANGES.batch), "--batch", help="images per prompt MIN:OPT:MAX"),
    t5_tokens: str = typer.Option(str(_RANGES.t5_tokens.max), "--t5-tokens", help="T5 sequence length range"),
    vae_max: int = typer.Option(0, "--vae-max", help="largest image side (px) the VAE decoder takes whole; larger images are decoded in tiles [default: 1024 within the --height/--width range: an engine holds activation memory for its largest shape]"),
    vae_batch: int = typer.Option(1, "--vae-batch", help="images per VAE decoder call (more images are decoded one call after another)"),
    t5: bool = typer.Option(True, "--t5/--no-t5", help="--no-t5: leave T5-XXL out (CLIP-only bundles)"),
    turbo: Optional[bool] = typer.Option(None, "--turbo/--no-turbo", help="a Turbo model: engine profiles optimised for batch 1 (no guidance) [default: what the model says]"),
    lora: Optional[str] = LoraOpt,
    precision: str = typer.Option("auto", "--precision", help="auto (what engines use: FP16 for every component, FP8 for the calibrated ones, INT8 for --int8's) | fp16 | int8 | fp8 | fp32, comma-separated"),
    int8: str = Int8Opt,
    validate: bool = typer.Option(True, "--validate/--no-validate", help="compare every output with PyTorch in onnxruntime (and on calibrate's held-out traffic)"),
    provider: str = typer.Option("auto", "--provider", help="onnxruntime for validation: auto (CUDA when onnxruntime-gpu sees a GPU) | cpu | cuda"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="only what this target's engines use (FP8 target: no FP16 twin of an FP8 component; FP16 target: no FP8 ONNX): ada|hopper|blackwell|ampere|turing|auto [default: every variant]"),
    device: str = DeviceOpt,
    recipe_toml: Optional[Path] = typer.Option(None, "--config", help="recipe TOML INT8 takes its layers from (with --int8: the one calibrate used) [default: calibration/fp8.toml]"),
    force: bool = typer.Option(False, "--force", help="re-export even when inputs are unchanged"),
    json_out: bool = typer.Option(False, "--json", help="print the results as JSON instead of a table"),
) -> None:
    """ONNX for the engines: FP16 (FP32 islands where the census needs them) and FP8 from calibrate, each
    validated against PyTorch in onnxruntime at another shape and on held-out traffic."""
    from sd35trt.core.artifacts import ensure_writable_dir
    from sd35trt.core.host import resolve_target
    from sd35trt.core.models import resolve_model
    from sd35trt.core.onnx_utils import resolve_provider
    from sd35trt.core.shapes import check_model_side
    from sd35trt.core.specs import parse_components, parse_int8, with_t5
    from sd35trt.core.targets import parse_target
    from sd35trt.producers.export import ExportConfig, export_model, plan_variants
    from sd35trt.producers.recipe import DEFAULT_RECIPE

    int8_names = parse_int8(int8)
    plan_variants(precision, (), None, {}, int8=int8_names)  # a bad --precision fails before any work
    if validate:
        resolve_provider(provider)  # an explicit --provider cuda that cannot run fails before any export
    target = resolve_target(parse_target(gpu)) if gpu else None
    source = resolve_model(model, turbo=turbo, lora=lora)
    names = with_t5(parse_components(components), t5 and source.has_t5)
    ranges = ranges_from_options(batch, height, width, t5_tokens, cfg=not source.turbo, vae_max=vae_max,
                                 vae_batch=vae_batch)
    config = ExportConfig(components=names, opset=opset, validate=validate, provider=provider, target=target,
                          int8=int8_names, recipe_file=recipe_toml or DEFAULT_RECIPE, ranges=ranges)
    check_model_side(config.ranges, source.largest_side(), source.id)
    ensure_writable_dir(out)
    results = export_model(source, out, config, device=device, force=force, precision=precision)
    rows = {f"{r.component}/{r.precision}": {
        "path": str(r.path), "skipped": r.skipped, "seconds": round(r.seconds, 2),
        "weights": r.manifest.get("weights_precision", r.precision),
        "fp32_islands": [i["module"] for i in r.manifest.get("fp32_islands", [])],
        "validation": {k: {m: v[m] for m in ("rel_l2", "max_abs")}
                       for k, v in (r.manifest.get("validation") or {}).get("outputs", {}).items()},
        "traffic_check": {k: v["rel_l2_max"] for k, v in (r.manifest.get("traffic_check") or {}).items()
                          if isinstance(v, dict) and "rel_l2_max" in v}} for r in results}
    if json_out:
        emit(rows)
        return
    lines = [f"{'component':<12} {'variant':<7} {'weights':<7} {'status':<8} {'check rel-L2':>12} {'traffic':>9}  islands"]
    for key, row in rows.items():
        name, variant = key.split("/")
        check = max((v["rel_l2"] for v in row["validation"].values()), default=None)
        traffic = max(row["traffic_check"].values(), default=None)
        lines.append(f"{name:<12} {variant:<7} {row['weights']:<7} {'skipped' if row['skipped'] else 'exported':<8} "
                     f"{'-' if check is None else f'{check:.2e}':>12} {'-' if traffic is None else f'{traffic:.2e}':>9}  "
                     f"{', '.join(row['fp32_islands']) or '-'}")
    echo("\n".join(lines))


@app.command()
def calibrate(
    model: str = ModelOpt,
    out: Path = typer.Option(Path("build"), "--out", "-o", help="work directory; the state goes to OUT/calibration/"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="UTF-8 file, one prompt per line [default: calibration/prompts.txt]"),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="prompts used to calibrate [default: 8 for tiny, 32 for real models]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps per prompt [default: 4 for tiny, 20 for real models]"),
    seed: int = typer.Option(Calib.seed, "--seed", help="seed of the calibration loop"),
    components: str = typer.Option(",".join(Calib.components), "--components", help="calibrated components: transformer[,clip_l,clip_g,t5] (4-bit formats: transformer)"),
    fmt: str = typer.Option(Calib.format.value, "--format", help="fp8 (E4M3 weights and activations) | int4 (weight-only, AWQ: Ampere SM86/Ada/Blackwell, the 8-12 GB cards) | nvfp4 (weight-only FP4: Blackwell SM120) | mixed (FP8, and INT4 in the layers that cost least, to fit --max-transformer-gib: Ada/Hopper/Blackwell)"),
    max_transformer_gib: Optional[float] = typer.Option(None, "--max-transformer-gib", help="--format mixed: the transformer's weights budget in GiB [default: midway between all FP8 and all INT4]"),
    awq_calls: int = typer.Option(Calib.awq_calls, "--awq-calls", help="int4/mixed: transformer calls of the calibration loop that AWQ's scale search runs on, spread over steps and prompts (the search costs ~12 forwards per call)"),
    config: Optional[Path] = typer.Option(None, "--config", help="FP8 recipe TOML [default: calibration/fp8.toml]"),
    height: Optional[int] = typer.Option(None, "--height", help="calibration image height (px) [default: 512 for tiny, 1024 for real models]"),
    width: Optional[int] = typer.Option(None, "--width", help="calibration image width (px) [default: as --height's]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance scale [default: 4.5; Turbo 0]"),
    t5: bool = typer.Option(True, "--t5/--no-t5", help="--no-t5: calibrate on CLIP-only traffic (zero T5 embeddings), for bundles without T5"),
    turbo: Optional[bool] = typer.Option(None, "--turbo/--no-turbo", help="a Turbo model: 4 steps, no guidance by default [default: what the model says]"),
    lora: Optional[str] = LoraOpt,
    calib_batch: int = typer.Option(Calib.batch, "--calib-batch", help="prompts per pipeline call"),
    holdout: int = typer.Option(Calib.holdout, "--holdout", help="held-out prompts for the report"),
    dtype: str = typer.Option(Calib.dtype, "--dtype", help="compute dtype of the loops (weights stay FP32): auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16"),
    device: str = DeviceOpt,
    shards: int = typer.Option(1, "--shards", help="calibration workers sharing the prompt batches (torch.distributed: one per GPU with NCCL, gloo on CPU); same scales as 1. Under torchrun, its processes are the workers"),
    force: bool = typer.Option(False, "--force", help="recalibrate even when inputs are unchanged"),
    json_out: bool = typer.Option(False, "--json", help="print the full report as JSON instead of a table"),
) -> None:
    """FP8 (E4M3), 4-bit (INT4 AWQ, NVFP4) or mixed FP8/INT4 calibration with ModelOpt on real denoising traffic, an activation
    census and FP32 islands (state in OUT/calibration/; `sd35trt export` builds the quantized and FP16 ONNX from it)."""
    from sd35trt.core.artifacts import ensure_writable_dir
    from sd35trt.core.models import resolve_model
    from sd35trt.core.specs import CALIBRATABLE, parse_components, parse_format
    from sd35trt.producers.calibrate import (
        DEFAULT_PROMPTS,
        CalibrationConfig,
        calibrate_model,
        calibration_size,
    )
    from sd35trt.producers.recipe import DEFAULT_RECIPE

    source = resolve_model(model, turbo=turbo, lora=lora)
    default_prompts, default_steps, default_size = calibration_size(source)
    cfg = CalibrationConfig(
        prompts_file=prompts or DEFAULT_PROMPTS, num_prompts=default_prompts if num_prompts is None else num_prompts,
        steps=default_steps if steps is None else steps, seed=seed, components=parse_components(components, CALIBRATABLE),
        recipe_file=config or DEFAULT_RECIPE, height=default_size if height is None else height,
        width=default_size if width is None else width,
        guidance=source.defaults.guidance if guidance is None else guidance, batch=calib_batch,
        holdout=holdout, dtype=dtype, t5=t5 and source.has_t5, format=parse_format(fmt),
        max_transformer_gib=max_transformer_gib, awq_calls=awq_calls)
    ensure_writable_dir(out)
    result = calibrate_model(source, out, cfg, device=device, force=force, shards=shards)
    if result is None:  # a torchrun worker other than rank 0: rank 0 prints the report
        return
    if json_out:
        emit(result.report)
    else:
        echo(calibration_table(result.report))


def calibration_table(report: dict[str, Any]) -> str:
    """The readable table ``calibrate`` prints on stdout (torch-level, vs the FP32 reference)."""
    lines = [f"{'component':<12} {'variant':<14} {'output':<18} {'rel-L2 mean':>11} {'rel-L2 max':>10} "
             f"{'max-abs':>9} {'ok':>3}"]

    def rows(name: str, variant: str, checks: dict[str, Any]) -> None:
        for out, s in checks.items():
            if isinstance(s, dict) and "rel_l2_mean" in s:
                lines.append(f"{name:<12} {variant:<14} {out:<18} {s['rel_l2_mean']:>11.4%} {s['rel_l2_max']:>10.4%} "
                             f"{s['max_abs']:>9.3g} {'yes' if s['passed'] else 'NO':>3}")

    for name, entry in report["components"].items():
        fmt = report.get("format", "fp8")
        rows(name, f"{fmt} fake-quant", entry[fmt])

    for name, entry in report["fp16"].items():
        rows(name, f"{entry['precision']} islands" if report["fp32_islands"][name] else entry["precision"],
             entry["with_islands"])
    for name, found in report["fp32_islands"].items():
        for island in found:
            lines.append(f"FP32 island  {name}: {island['module']} (max |x| {island['max_abs']:.4g}; {island['why']})")
    e2e = report["end_to_end"]
    if "latents" in e2e:
        lines.append(f"end to end ({len(e2e['prompts'])} held-out prompts, {e2e['steps']} steps): latents rel-L2 "
                     f"{e2e['latents']['rel_l2']:.4%}, image PSNR {', '.join(f'{p:.1f}' for p in e2e['image_psnr_db'])} dB")
    else:
        lines.append(f"end to end: {e2e['candidate']}")
    lines.append(f"reference: {report['reference']}")
    return "\n".join(lines)


# What to do about an operating-system error on a path the user gave, by errno.
OS_HINTS = {
    errno.ENOSPC: "free disk space or choose another --out",
    errno.EDQUOT: "free disk space (the disk quota is reached) or choose another --out",
    errno.EROFS: "the file system is read-only: choose a writable --out",
    errno.EFBIG: "the file system or the process's file-size limit (ulimit -f) is too small; raise it or choose another --out",
    errno.EACCES: "permission denied: choose a path you may read and write, or fix its permissions",
    errno.EPERM: "the operation is not permitted there: choose another path",
    errno.ELOOP: "the path runs into a loop of symbolic links: fix the link",
    errno.ENAMETOOLONG: "a name in the path is too long for the file system: choose a shorter one",
    errno.EISDIR: "a folder is where a file was expected: give a file path",
    errno.ENOTDIR: "a file is where a folder was expected: fix the path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EEXIST: "something is already there: remove it or choose another path",
    errno.ENXIO: "not a regular file (a device or socket): give a file path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def gpu_oom_line(message: str) -> str | None:
    """One line for torch's CUDA out-of-memory message: what was asked, what was free, what this process and the
    others hold, and what to do; None for a message that is not torch's."""
    import re

    text = " ".join(message.split())
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
    card = re.search(r"total capacity of ([\d.]+ \w+) of which ([\d.]+ \w+) is free", text)
    if asked is None or card is None:
        return None
    gib = {"KiB": 2.0**-20, "MiB": 2.0**-10, "GiB": 1.0}
    others = sum(float(n) * gib.get(u, 1.0) for n, u in re.findall(r"Process \d+ has ([\d.]+) (\w+) memory in use", text))
    mine = re.search(r"this process has ([\d.]+ \w+) memory in use", text)
    held = (f"; this process holds {mine.group(1)}" if mine else "") + (f", other processes {others:.1f} GiB" if others else "")
    hint = (f"free the GPU of the other processes ({others:.1f} GiB)" if others >= 1 else "use a GPU with more memory") + \
        " or run the step on the CPU (--device cpu; make engines DEVICE=cpu; slower)"
    return f"CUDA out of memory: {asked.group(1)} asked with {card.group(2)} free of {card.group(1)}{held}: {hint}"


def os_error_line(exc: OSError) -> str | None:
    """One line for an operating-system error on a named path, or None (no path: treated as a bug)."""
    where = exc.filename or getattr(exc, "filename2", None)
    if not where and exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return None
    hint = OS_HINTS.get(exc.errno, "check the path and the file system")
    return f"{exc.strerror or exc}" + (f" ({where})" if where else "") + f": {hint}"


def main(argv: list[str] | None = None) -> int:
    """Run the app; a user error prints one line and exits 2, a bug keeps its traceback (exit 1)."""
    debug = os.environ.get("SD35TRT_DEBUG") == "1"
    args = sys.argv[1:] if argv is None else argv
    # help and usage stay on stdout as click prints them; a command's library prints go to stderr
    quiet = results_on_stdout() if args and not {"--help", "-h"} & set(args) else contextlib.nullcontext()
    try:
        with quiet:
            code = click_command().main(args=args, standalone_mode=False, prog_name="sd35trt")  # returns Exit's code
    except Sd35TrtError as err:
        if debug:
            raise
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except OSError as exc:
        # Environment problems the user fixes (the step's temp folder was already removed on the way out): one line
        # naming the file. An OSError without a file is not about a path the user gave: a bug, traceback kept.
        line = os_error_line(exc)
        if line is None or debug:
            raise
        sys.stderr.write(f"error: {line}\n")
        return 2
    except typer.Exit as exc:
        return exc.exit_code or 0
    except RuntimeError as exc:
        # CUDA out of memory is the GPU's state, not a bug: one line with what holds the card (traceback with
        # SD35TRT_DEBUG=1)
        line = gpu_oom_line(str(exc)) if type(exc).__name__ == "OutOfMemoryError" else None
        if line is None or debug:
            raise
        sys.stderr.write(f"error: {line}\n")
        return 2
    except Exception as exc:
        # Usage errors (bad option, missing argument) from typer's vendored click: print, exit 2.
        if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show(file=sys.stderr)
                return exc.exit_code
            ctx = getattr(exc, "ctx", None)
            where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
            sys.stderr.write(f"error: {exc.format_message()}{where}\n".replace("\n", " ").rstrip() + "\n")
            return exc.exit_code
        raise
    if code == 130:  # typer turns Ctrl-C into exit code 130; temp folders were already removed on the way out
        sys.stderr.write("interrupted: finished artifacts are kept, partial ones were discarded\n")
    return code if isinstance(code, int) else 0


def entry() -> None:
    code = main()
    sys.stdout.flush()  # results first, whatever a library's exit handler does after this
    if code == 130:
        # Ctrl-C leaves with exit code 130 once its cleanup is done. CPython re-raises SIGINT on itself at shutdown
        # when the KeyboardInterrupt ever crossed one of its PyRun_* frames (as inside torch's ONNX export), however
        # it was handled, so the interpreter's shutdown is skipped here.
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    entry()
