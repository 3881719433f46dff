"""Subcommands beyond calibrate/export (``main.py``): build, bundle verify, doctor, generate, compare, bench.
Each is a few lines over library calls; the library does the work."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sd35trt.build import BuildConfig
from sd35trt.cli.app import app, bundle_app, echo, emit
from sd35trt.pipeline import GenerateRequest

_REQ = GenerateRequest(prompt="")  # generate's defaults are the request's own


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
    force: bool = typer.Option(False, "--force", help="rebuild even when inputs are unchanged"),
    json_out: bool = typer.Option(False, "--json", help="print the results as JSON instead of a table"),
) -> None:
    """Build one engine bundle for a GPU target (FP8 where the GPU has it, FP16 fallback where not)."""
    from sd35trt.artifacts import ensure_writable_dir
    from sd35trt.build import BuildConfig, build_bundle, parse_parts
    from sd35trt.errors import check_choice
    from sd35trt.specs import Precision, parse_components
    from sd35trt.targets import parse_backend, parse_target

    check_choice("--precision", precision, ("auto", *(p.value for p in Precision)))
    config = BuildConfig(target=parse_target(gpu), backend=parse_backend(backend), components=parse_components(components),
                         precision=None if precision == "auto" else Precision(precision), workspace_gib=workspace_gib,
                         portable=portable, hardware_compat=hardware_compat, memory_check=memory_check,
                         parts=parse_parts(parts), max_build_memory_gib=max_build_memory)
    ensure_writable_dir(out)
    result = build_bundle(onnx, out, config, force=force)
    m = result.manifest
    rows = {k: {"precision": e.precision, "bytes": e.bytes, "parts": len(e.plans), "gemm_fp8": e.layers["gemm_fp8"],
                "gemm": e.layers["gemm"],
                "fp32_islands": [i["module"] for i in e.fp32_islands], "reused": k not in result.rebuilt}
            for k, e in m.components.items()}
    if json_out:
        emit({"bundle": str(result.folder), "skipped": result.skipped, "rebuilt": result.rebuilt,
              "target": m.target, "compute_capabilities": m.compute_capabilities, "backend": m.backend,
              "components": rows})
        return
    lines = [f"bundle {result.folder} ({m.target}, SM {', '.join(m.compute_capabilities)}, "
             f"{m.backend} {m.backend_version}){' unchanged' if result.skipped else ''}",
             f"{'component':<12} {'precision':<9} {'size':>10} {'parts':>5} {'FP8 GEMMs':>10}  islands"]
    for name, row in rows.items():
        lines.append(f"{name:<12} {row['precision']:<9} {row['bytes'] / 1e6:>8.1f}MB {row['parts']:>5} "
                     f"{row['gemm_fp8']:>4}/{row['gemm']:<5}  {', '.join(row['fp32_islands']) or '-'}")
    echo("\n".join(lines))


@bundle_app.command("verify")
def bundle_verify(folder: Path = typer.Argument(..., help="engines/<model>/<target>-<backend>/")) -> None:
    """Check the bundle manifest and the sha256 of every engine."""
    from sd35trt.build import verify_bundle

    manifest = verify_bundle(folder)
    emit({"bundle": str(folder), "ok": True, "engines": len(manifest.components),
          "target": manifest.target, "backend": f"{manifest.backend} {manifest.backend_version}"})


@app.command()
def doctor(bundle: Optional[Path] = typer.Argument(None, help="a bundle folder, or a model folder holding several")) -> None:
    """Report this host's GPU, driver and runtimes, and which engines of a bundle can run here."""
    from sd35trt.doctor import diagnose

    report = diagnose(bundle)
    emit(report)
    if bundle is not None and not report.get("runnable_bundles"):
        raise typer.Exit(code=3)


def _check_model_matches(source, manifest_model: dict, where: Path) -> None:
    from sd35trt.manifests import require_model

    require_model(manifest_model, source.fingerprint(), source.id, where)


def _one_source(bundle, onnx, torch_) -> None:
    from sd35trt.errors import InvalidInputError

    chosen = [name for name, value in (("--bundle", bundle), ("--onnx", onnx), ("--torch", torch_)) if value]
    if len(chosen) != 1:
        raise InvalidInputError("choose exactly one of --bundle, --onnx, --torch",
                                hint="e.g. --onnx build/tiny (onnxruntime) or --torch")


def _make_loop(model: str, bundle: Optional[Path], onnx: Optional[Path], precision: str, device: str,
               provider: str = "auto", dtype: str = "auto", cuda_graph: bool = False):
    """The denoising loop over the runners the options name, after checking artifacts match the model."""
    from sd35trt.artifacts import read_json
    from sd35trt.models import build_pipeline, resolve_model
    from sd35trt.pipeline import Sd35Loop
    from sd35trt.runners import ranges_of_bundle, runners_from_bundle, runners_from_onnx, runners_from_torch

    source = resolve_model(model)
    if bundle is not None:
        runners, manifest = runners_from_bundle(bundle, cuda_graph=cuda_graph)
        _check_model_matches(source, manifest.model, bundle)
        return Sd35Loop(build_pipeline(source, components=set()), runners, ranges_of_bundle(manifest))
    if onnx is not None:
        runners, ranges = runners_from_onnx(onnx, precision, provider=provider)
        first = next(iter(runners.values()))
        _check_model_matches(source, read_json(first.path.parent / "manifest.json", "ONNX manifest")["model"], onnx)
        return Sd35Loop(build_pipeline(source, components=set()), runners, ranges)
    from sd35trt.runtime_env import pick_device, pick_dtype

    torch_device = pick_device(device)
    pipe = build_pipeline(source, device=torch_device, dtype=pick_dtype(dtype, torch_device, on_gpu="bf16"))
    return Sd35Loop(pipe, runners_from_torch(pipe))


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="text prompt"),
    model: str = typer.Option("tiny", "--model", "-m", help="model whose tokenizers/scheduler to use (must match the artifacts)"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="run TensorRT / TensorRT-RTX engines of this bundle"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="run onnxruntime on this work dir's ONNX"),
    torch_: bool = typer.Option(False, "--torch", help="run the PyTorch modules"),
    precision: str = typer.Option("auto", "--precision", help="with --onnx: auto | fp32 | fp16 | fp8"),
    provider: str = typer.Option("auto", "--provider", help="with --onnx: onnxruntime on auto | cpu | cuda (CUDA needs onnxruntime-gpu)"),
    negative_prompt: str = typer.Option(_REQ.negative_prompt, "--negative-prompt", "-n"),
    steps: int = typer.Option(_REQ.steps, "--steps"),
    guidance: float = typer.Option(_REQ.guidance, "--guidance"),
    seed: int = typer.Option(_REQ.seed, "--seed"),
    height: int = typer.Option(_REQ.height, "--height"),
    width: int = typer.Option(_REQ.width, "--width"),
    batch: int = typer.Option(_REQ.batch, "--batch"),
    out: Path = typer.Option(Path("image.png"), "--out", "-o", help="PNG path (batch > 1: NAME-<i>.png)"),
    device: str = typer.Option("auto", "--device", help="with --torch: auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="with --torch: auto (fp32 on CPU, bf16 on CUDA) | fp32 | fp16 | bf16"),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="with --bundle: CUDA graphs (TensorRT-RTX: its runtime strategy; TensorRT: a guarded capture)"),
    json_out: bool = typer.Option(False, "--json", help="print timings and paths as JSON"),
) -> None:
    """Prompt → PNG: CLIP-L/G + T5 → MMDiT loop (CFG, flow matching) → VAE, on engines, ONNX or torch."""
    from sd35trt.errors import InvalidInputError
    from sd35trt.pipeline import GenerateRequest

    _one_source(bundle, onnx, torch_)
    if out.suffix.lower() != ".png":
        raise InvalidInputError("--out must end in .png", path=out, hint="e.g. --out image.png")
    from sd35trt.artifacts import ensure_writable_dir

    ensure_writable_dir(out.parent if str(out.parent) else Path("."))
    request = GenerateRequest(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                              seed=seed, height=height, width=width, batch=batch)
    result = _make_loop(model, bundle, onnx, precision, device, provider, dtype, cuda_graph)(request)
    paths = []
    for i, image in enumerate(result.pil):
        path = out if len(result.pil) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        tmp = path.with_name(f".{path.name}.tmp.png")
        image.save(tmp)
        tmp.replace(path)
        paths.append(str(path))
    info = {"images": paths, "timings": result.timings, "request": request.__dict__}
    if json_out:
        emit(info)
    else:
        echo("\n".join(paths))


@app.command()
def compare(
    model: str = typer.Option("tiny", "--model", "-m"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="work dir with onnx/, onnx-fp16/, onnx-fp8/"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="compare an engine bundle (needs its GPU)"),
    variants: str = typer.Option("fp32,fp16,fp8", "--variants", help="precision variants to compare (those the work dir has; the others are listed as missing)"),
    components: Optional[str] = typer.Option(None, "--components"),
    provider: str = typer.Option("auto", "--provider", help="onnxruntime on auto | cpu | cuda (CUDA needs onnxruntime-gpu)"),
    prompts: int = typer.Option(2, "--prompts", help="K prompts of real pipeline traffic (held-out end of calibration/prompts.txt)"),
    steps: int = typer.Option(4, "--steps"),
    height: int = typer.Option(512, "--height"),
    width: int = typer.Option(512, "--width"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("compare"), "--out", "-o", help="folder for compare.json and compare.png"),
    verbose: bool = typer.Option(False, "--verbose", help="polygraphy's per-iteration log (on stderr)"),
    json_out: bool = typer.Option(False, "--json", help="print compare.json instead of the table"),
) -> None:
    """Per-component (polygraphy) and end-to-end comparison against PyTorch/diffusers; exit 1 on a failed tolerance."""
    import sd35trt.compare as compare_mod
    from sd35trt.artifacts import ensure_writable_dir
    from sd35trt.calibrate import DEFAULT_PROMPTS, read_prompts
    from sd35trt.compare import CompareConfig, format_compare, onnx_variants, run_compare
    from sd35trt.errors import InvalidInputError
    from sd35trt.models import resolve_model
    from sd35trt.specs import parse_components

    if (onnx is None) == (bundle is None):
        raise InvalidInputError("choose exactly one of --onnx and --bundle", hint="e.g. --onnx build/tiny")
    cfg = CompareConfig(variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
                        components=parse_components(components), prompts=prompts, steps=steps, height=height,
                        width=width, seed=seed)
    source = resolve_model(model)
    if bundle is not None:
        from sd35trt.runners import ranges_of_bundle, runners_from_bundle

        runners, manifest = runners_from_bundle(bundle)  # refuses with the reason and the --onnx to use instead
        _check_model_matches(source, manifest.model, bundle)
        by_variant, ranges, label, missing = {"engine": runners}, ranges_of_bundle(manifest), str(bundle), {}
    else:
        by_variant, ranges, missing = onnx_variants(onnx, cfg.variants, provider)
        label = str(onnx)
    compare_mod.VERBOSE = verbose
    texts = read_prompts(DEFAULT_PROMPTS, prompts)[-prompts:]
    ensure_writable_dir(out)
    report = run_compare(source, out, cfg, texts, by_variant, ranges, label, missing)
    if json_out:
        emit(report.data)
    else:
        echo(format_compare(report.data))
        echo(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    if not report:
        raise typer.Exit(code=1)


@app.command()
def bench(
    model: str = typer.Option("tiny", "--model", "-m"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="time the engines of this bundle (on its GPU)"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="time onnxruntime on this work dir's ONNX"),
    torch_: bool = typer.Option(False, "--torch", help="time the PyTorch modules"),
    precision: str = typer.Option("auto", "--precision", help="with --onnx: auto | fp32 | fp16 | fp8"),
    provider: str = typer.Option("auto", "--provider", help="with --onnx: onnxruntime on auto | cpu | cuda (CUDA needs onnxruntime-gpu)"),
    steps: int = typer.Option(20, "--steps", help="timed transformer steps (after warm-up)"),
    loop_steps: int = typer.Option(28, "--loop-steps", help="denoising steps of each end-to-end image"),
    images: int = typer.Option(2, "--images", help="end-to-end images timed"),
    height: int = typer.Option(1024, "--height"),
    width: int = typer.Option(1024, "--width"),
    batch: int = typer.Option(1, "--batch"),
    device: str = typer.Option("auto", "--device", help="with --torch: auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="with --torch: auto (fp32 on CPU, bf16 on CUDA) | fp32 | fp16 | bf16"),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="with --bundle: CUDA graphs (TensorRT-RTX: its runtime strategy; TensorRT: a guarded capture)"),
    json_out: bool = typer.Option(False, "--json", help="print the full result as JSON instead of a summary"),
) -> None:
    """Latency: transformer step (median of --steps after warm-up), end to end per image, images/s, GPU memory."""
    from sd35trt.errors import InvalidInputError
    from sd35trt.latency import bench_loop
    from sd35trt.pipeline import GenerateRequest

    _one_source(bundle, onnx, torch_)
    if steps < 1 or images < 1:
        raise InvalidInputError("--steps and --images must be ≥ 1", hint="e.g. --steps 20 --images 2")
    request = GenerateRequest(prompt="a lighthouse on a basalt cliff at golden hour, 35mm film photograph",
                              steps=loop_steps, height=height, width=width, batch=batch)
    loop = _make_loop(model, bundle, onnx, precision, device, provider, dtype, cuda_graph)
    request.check(loop.ranges)
    result = bench_loop(loop, request, steps=steps, images=images)
    if json_out:
        emit(result)
        return
    step, e2e = result["transformer_step_ms"], result["end_to_end_s"]
    runners = ", ".join(f"{k} {v['kind']} {v['precision']}" for k, v in result["runners"].items())
    lines = [f"runners: {runners}",
             f"transformer step ({step['batch_with_cfg']} × {height}×{width}): median {step['median']:.1f} ms "
             f"(min {step['min']:.1f}, {step['timed_steps']} timed, {step['timer']})",
             f"end to end ({loop_steps} steps): {e2e['median']:.2f} s / image, {result['images_per_s']:.3f} images/s"]
    if "peak_gpu_gib" in result:
        lines.append(f"GPU memory: torch peak {result['peak_gpu_gib']['torch_allocator_peak']:.1f} GiB, "
                     f"device used at end {result['peak_gpu_gib']['device_used_at_end']:.1f} GiB")
    echo("\n".join(lines))


@app.command()
def selftest(out: Path = typer.Option(Path("selftest"), "--out", "-o", help="folder for selftest.json, the image, compare/"),
             json_out: bool = typer.Option(False, "--json", help="print selftest.json instead of the table")) -> None:
    """On a GPU host: tiny model → calibrate → export → engines for this GPU → generate → compare; PASS/FAIL per step."""
    from sd35trt.artifacts import ensure_writable_dir
    from sd35trt.selftest import run_selftest

    ensure_writable_dir(out)
    report = run_selftest(out)
    if json_out:
        emit(report.to_dict())
    else:
        echo(report.table())
        echo(f"wrote {out / 'selftest.json'}")
    if not report:
        raise typer.Exit(code=1)
