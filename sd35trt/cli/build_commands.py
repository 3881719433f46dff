"""The build machine's subcommands besides calibrate/export (``main.py``): ``build`` (one engine bundle per GPU
target) and ``preflight`` (what ``make engines`` will do, checked before any step). A few lines over library calls."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from sd35trt.cli.app import Int8Opt, LoraOpt, T5Opt, app, echo, emit
from sd35trt.core.shapes import ShapeRanges
from sd35trt.producers.bundle import BuildConfig

if TYPE_CHECKING:
    from sd35trt.producers.recipe import Recipe

_RANGES = ShapeRanges()  # export's default shape ranges (preflight checks what export will use)


@app.command()
def build(
    gpu: str = typer.Option(BuildConfig.target.value, "--gpu", help="target: hopper | ada | blackwell | ampere | turing | auto"),
    backend: str = typer.Option(BuildConfig.backend.value, "--backend", help="auto | tensorrt | tensorrt-rtx"),
    onnx: Path = typer.Option(Path("build/tiny"), "--onnx", help="the --out of export/calibrate"),
    out: Path = typer.Option(Path("engines"), "--out", "-o", help="engines root; bundle goes to OUT/<model>/<target>-<backend>/"),
    components: Optional[str] = typer.Option(None, "--components", help="subset of transformer,clip_l,clip_g,t5,vae_decoder"),
    precision: str = typer.Option("auto", "--precision", help="auto (table per target) | fp8 | fp16 | fp32"),
    workspace_gib: Optional[float] = typer.Option(None, "--workspace-gib", help="builder workspace limit"),
    portable: bool = typer.Option(False, "--portable", help="full TensorRT: version-compatible plans that run on the lean runtime (tensorrt-lean) of the same version"),
    hardware_compat: str = typer.Option("none", "--hardware-compat", help="none | ampere+ (full TensorRT: one engine for every GPU from Ampere on; FP16 only)"),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check", help="refuse a build this host's memory cannot hold (the builder needs ~2x the engine's weights besides the mapped ONNX, measured); where a whole build would not fit, build it in parts that do"),
    parts: Optional[str] = typer.Option(None, "--parts", help="build components in parts, one builder at a time, e.g. transformer=2,t5=2 (the parts run back to back)"),
    max_build_memory: Optional[float] = typer.Option(None, "--max-build-memory", help="GiB: build each component in as many parts as keep every builder's peak RSS under this (estimated 2.8x its weights + 1 GiB)"),
    t5: bool = typer.Option(True, "--t5/--no-t5", help="--no-t5: a CLIP-only bundle without T5-XXL (zero T5 embeddings at run time, as diffusers without text_encoder_3)"),
    weight_streaming: bool = typer.Option(False, "--weight-streaming", help="build the transformer for weight streaming (the VRAM plan's streaming mode on small GPUs)"),
    refittable: bool = typer.Option(False, "--refittable", help="refittable engines (BuilderFlag.REFIT): `sd35trt refit` puts a LoRA's weights in on the deploy host"),
    strip_weights: bool = typer.Option(False, "--strip-weights", help="refittable and weight-stripped plans (STRIP_PLAN): smaller bundles, weights from the ONNX at refit"),
    int8: str = Int8Opt,
    force: bool = typer.Option(False, "--force", help="rebuild even when inputs are unchanged"),
    json_out: bool = typer.Option(False, "--json", help="print the results as JSON instead of a table"),
) -> None:
    """Build one engine bundle for a GPU target (FP8 where the GPU has it, FP16 fallback where not)."""
    from sd35trt.core.artifacts import ensure_writable_dir
    from sd35trt.core.errors import check_choice
    from sd35trt.core.specs import ARTIFACT_PRECISIONS, Precision, parse_components, parse_int8, with_t5
    from sd35trt.core.targets import parse_backend, parse_target
    from sd35trt.producers.bundle import BuildConfig, build_bundle, parse_parts

    check_choice("--precision", precision, ("auto", *(p.value for p in ARTIFACT_PRECISIONS)))
    names = with_t5(parse_components(components), t5)
    config = BuildConfig(target=parse_target(gpu), backend=parse_backend(backend), components=names,
                         weight_streaming=weight_streaming,
                         refit="stripped" if strip_weights else "refit" if refittable else "none",
                         precision=None if precision == "auto" else Precision(precision), workspace_gib=workspace_gib,
                         portable=portable, hardware_compat=hardware_compat, memory_check=memory_check,
                         parts=parse_parts(parts), max_build_memory_gib=max_build_memory, int8=parse_int8(int8))
    ensure_writable_dir(out)
    result = build_bundle(onnx, out, config, force=force)
    m = result.manifest
    rows = {k: {"precision": e.precision, "bytes": e.bytes, "parts": len(e.plans), "gemm_fp8": e.layers["gemm_fp8"],
                "gemm": e.layers["gemm"], "int4_weights": e.layers.get("int4_weights", 0),
                "fp4_weights": e.layers.get("fp4_weights", 0), "int8_weights": e.layers.get("int8_weights", 0),
                "fp32_islands": [i["module"] for i in e.fp32_islands], "reused": k not in result.rebuilt}
            for k, e in m.components.items()}
    if json_out:
        emit({"bundle": str(result.folder), "skipped": result.skipped, "rebuilt": result.rebuilt,
              "target": m.target, "compute_capabilities": m.compute_capabilities, "backend": m.backend,
              "components": rows})
        return
    echo(_bundle_table(result, rows))


def _bundle_table(result: Any, rows: dict[str, dict[str, Any]]) -> str:
    """The table ``build`` prints: per component its precision, size, parts, quantized GEMMs and islands."""
    m = result.manifest
    lines = [f"bundle {result.folder} ({m.target}, SM {', '.join(m.compute_capabilities)}, "
             f"{m.backend} {m.backend_version}){' unchanged' if result.skipped else ''}",
             f"{'component':<12} {'precision':<9} {'size':>10} {'parts':>5} {'quantized':>10}  islands"]
    for name, row in rows.items():
        # FP8: GEMMs running FP8 of all GEMMs; 4-bit: weight tensors the plan holds as INT4 / FP4 (dequantized in
        # generated kernels before FP16 GEMMs, so the layer report counts those GEMMs as FP16)
        # (mixed: FP8 GEMMs + INT4 weight tensors)
        done = row["int4_weights"] or row["fp4_weights"] or row["int8_weights"] or row["gemm_fp8"]
        if row["precision"] == "mixed":
            done = f"{row['gemm_fp8']}+{row['int4_weights']}"
        lines.append(f"{name:<12} {row['precision']:<9} {row['bytes'] / 1e6:>8.1f}MB {row['parts']:>5} "
                     f"{done:>4}/{row['gemm']:<5}  {', '.join(row['fp32_islands']) or '-'}")
    return "\n".join(lines)


@app.command()
def preflight(
    model: str = typer.Option("tiny", "--model", "-m", help="the MODEL of make engines"),
    gpu: str = typer.Option("ada", "--gpu", help="the GPU of make engines"),
    backend: str = typer.Option("auto", "--backend", help="auto | tensorrt | tensorrt-rtx"),
    fp8: str = typer.Option("transformer", "--quantize", "--fp8",
                            help="components quantized to --format (make's QUANTIZE=; --fp8 and FP8= are older names)"),
    fmt: str = typer.Option("fp8", "--format", help="the calibration format: fp8 | int4 | nvfp4 | mixed (make's QUANT=)"),
    t5: bool = T5Opt,
    lora: Optional[str] = LoraOpt,
    work: Optional[Path] = typer.Option(None, "--work", help="the work dir make uses"),
    engines: Path = typer.Option(Path("engines"), "--engines", help="the engines root make uses"),
    height: str = typer.Option(str(_RANGES.height), "--height", help="the pixel height range export will use (make's HEIGHT=)"),
    width: str = typer.Option(str(_RANGES.width), "--width", help="the pixel width range export will use (make's WIDTH=)"),
    batch: str = typer.Option(str(_RANGES.batch), "--batch", help="the images-per-prompt range export will use (make's BATCH=)"),
    device: str = typer.Option("auto", "--device", help="where calibrate and export will run torch (make's DEVICE=)"),
    int8: str = Int8Opt,
    recipe_toml: Optional[Path] = typer.Option(None, "--config", help="the recipe calibrate and export will read (make's RECIPE=) [default: calibration/fp8.toml]"),
) -> None:
    """What `make engines` will do, checked in seconds before any step: model, target, backend, precisions."""
    from sd35trt.cli.app import ranges_from_options
    from sd35trt.core.artifacts import ensure_writable_dir
    from sd35trt.core.errors import check_choice
    from sd35trt.core.host import DEVICES, resolve_target
    from sd35trt.core.models import resolve_model
    from sd35trt.core.shapes import check_model_side
    from sd35trt.core.specs import (
        CALIBRATABLE,
        COMPONENTS,
        Precision,
        parse_components,
        parse_format,
        parse_int8,
        with_t5,
    )
    from sd35trt.core.targets import narrow_for_format, parse_backend, parse_target, plan_precisions
    from sd35trt.producers.bundle import bundle_suffix
    from sd35trt.producers.recipe import DEFAULT_RECIPE, Recipe
    from sd35trt.producers.trt_builder import choose_backend

    check_choice("--device", device, DEVICES)
    recipe = Recipe.load(recipe_toml or DEFAULT_RECIPE)
    source = resolve_model(model, lora=lora)
    check_model_side(ranges_from_options(batch, height, width, str(_RANGES.t5_tokens.max)),
                     source.largest_side(), source.id)
    target = resolve_target(parse_target(gpu))
    calibrated = parse_components(fp8, CALIBRATABLE, option="--quantize")
    quant = parse_format(fmt)
    if quant is not Precision.FP8 and set(calibrated) != {"transformer"}:
        from sd35trt.core.errors import InvalidInputError

        raise InvalidInputError(f"QUANT={quant.value} quantizes the transformer only, but QUANTIZE={','.join(calibrated)}",
                                hint="leave QUANTIZE= at its default (transformer) with QUANT=int4, nvfp4 or mixed; "
                                     "INT8=clip_l,clip_g stores the text encoders' weights in 8 bits")
    if work is not None:
        ensure_writable_dir(work, "--work")
    ensure_writable_dir(engines, "--engines")
    int8_names = parse_int8(int8)
    for knob, named in (("QUANTIZE", calibrated), ("INT8", int8_names)):
        if not t5 and "t5" in named:
            from sd35trt.core.errors import InvalidInputError

            raise InvalidInputError(f"{knob}=... names t5 but T5=0 leaves T5 out", hint=f"drop t5 from {knob}= or set T5=1")
    chosen = choose_backend(parse_backend(backend), target)
    names = with_t5(COMPONENTS, t5 and source.has_t5)
    have = {c: {Precision.FP16} | ({quant} if c in calibrated else set()) | ({Precision.INT8} if c in int8_names else set())
            for c in names}
    ccs = chosen.buildable_ccs(target)
    if quant is not Precision.FP8:
        ccs, dropped = narrow_for_format(target, chosen.kind, quant, ccs)
        if dropped:
            echo(f"note: {dropped}")
    plan = plan_precisions(target, names, have, backend=chosen.kind, ccs=ccs, int8=int8_names)
    _check_fp32_gemms(source, chosen, ccs, recipe)
    where = f"{engines}/{source.slug}/{target.target.value}-{chosen.kind.value}{bundle_suffix(plan)}"
    echo(f"make engines: {source.id} ({'random weights' if source.random_weights else 'local weights'}"
         f"{', Turbo' if source.turbo else ''}), {target.target.value} ({', '.join(f'SM{a}{b}' for a, b in ccs)}) with "
         f"{chosen.kind.value} {chosen.version}: " + ", ".join(f"{n} {c.precision.value}" for n, c in plan.items())

         + ("" if "t5" in names else "; CLIP-only (no T5)") + (f"; LoRA {lora}" if lora else "")
         + (f"; work dir {work}" if work else "") + f" -> {where}")


def _check_fp32_gemms(source: Any, chosen: Any, ccs: tuple[tuple[int, int], ...], recipe: Recipe) -> None:
    """TensorRT-RTX 1.7 builds no FP32 GEMM for SM75 ("Cannot compile operation ... for Turing (SM75): FP32 GEMM is
    not supported", measured), and FP32 islands are FP32 GEMMs in every precision: a model with a recipe island
    (SD3.5-Large's block 35) is refused now, not after calibrate and export; one whose census may find islands gets a
    note."""
    import fnmatch

    from sd35trt.core.targets import Backend

    if (7, 5) not in ccs or chosen.kind is not Backend.TENSORRT_RTX:
        return
    blocks = [f"transformer_blocks.{i}" for i in range(int(source.transformer_config().get("num_layers", 0)))]
    sites = [b for b in blocks if any(fnmatch.fnmatchcase(b, p) for p in recipe.upcast["transformer"])]
    if sites:
        from sd35trt.core.errors import InvalidInputError

        raise InvalidInputError(f"GPU=turing: {chosen.kind.value} {chosen.version} builds no FP32 GEMM for SM75, and "
                                f"{source.id} runs {sites[0]} as an FP32 island in every precision",
                                hint="target ampere or newer, or build on a Turing host with full TensorRT "
                                     "(BACKEND=tensorrt)")
    echo(f"note: SM75: {chosen.kind.value} {chosen.version} builds no FP32 GEMM, so if calibrate finds FP32 islands "
         "(real T5-XXL's feed-forward needs them) the build stops there; T5=0 avoids T5's")
