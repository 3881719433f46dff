"""The deploy host's subcommands: bundle verify, doctor, generate, compare, bench, selftest, refit (the build
machine's calibrate/export are in ``main.py``, build/preflight in ``build_commands.py``). Each is a few lines over
library calls; the library does the work."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from sd35trt.cli.app import (
    LoraOpt,
    ModelRunOpt,
    T5Opt,
    TilingOpt,
    TurboOpt,
    VramOpt,
    VramPlanOpt,
    app,
    bundle_app,
    echo,
    emit,
)
from sd35trt.runtime.request import GenerateRequest

if TYPE_CHECKING:
    from sd35trt.checks.compare import CompareConfig
    from sd35trt.core.models import ModelSource
    from sd35trt.runtime.launch import LoopOptions

_DEFAULT_REQUEST = GenerateRequest(prompt="")  # generate's defaults are the request's own


@bundle_app.command("verify")
def bundle_verify(folder: Path = typer.Argument(..., help="engines/<model>/<target>-<backend>/")) -> None:
    """Check the bundle manifest and the sha256 of every engine."""
    from sd35trt.producers.bundle import verify_bundle

    manifest = verify_bundle(folder)
    emit({"bundle": str(folder), "ok": True, "engines": len(manifest.components),
          "target": manifest.target, "backend": f"{manifest.backend} {manifest.backend_version}"})


@app.command()
def doctor(
    bundle: Optional[Path] = typer.Argument(None, help="a bundle folder, or a model folder holding several"),
    vram: Optional[float] = typer.Option(None, "--vram", help="GiB of GPU memory to plan for [default: this GPU's free memory]"),
    height: int = typer.Option(1024, "--height", help="image height the VRAM plan is made for"),
    width: int = typer.Option(1024, "--width", help="image width the VRAM plan is made for"),
    t5: bool = T5Opt,
) -> None:
    """This host's GPU, driver and runtimes; which engines of a bundle can run here and why not; what each VRAM
    plan (resident / sequential / streaming) needs for the bundle. Exit 3 when no engine of the bundle can run on
    this host (the report says why, and which ONNX to run instead)."""
    from sd35trt.checks.doctor import diagnose, vram_report
    from sd35trt.core.manifests import BUNDLE_MANIFEST
    from sd35trt.runtime.vram import check_vram

    check_vram(vram)
    report = diagnose(bundle)
    if bundle is not None and (bundle / BUNDLE_MANIFEST).is_file():
        report["vram"] = vram_report(bundle, vram, height=height, width=width, t5=t5)
    emit(report)
    if bundle is not None and not report.get("runnable_bundles"):
        raise typer.Exit(code=3)


def _loop_options(model, bundle, onnx, torch_, precision="auto", provider="auto", device="auto", dtype="auto",
                  cuda_graph=False, t5=True, turbo=None, vram=None, vram_plan="auto", vae_tiling="auto", lora=None):
    from sd35trt.runtime.launch import LoopOptions

    return LoopOptions(model=model if model is not None or not torch_ else "tiny", bundle=bundle, onnx=onnx,
                       torch=torch_, precision=precision, provider=provider, device=device, dtype=dtype,
                       cuda_graph=cuda_graph, t5=t5, turbo=turbo, vram_gib=vram, vram_plan=vram_plan,
                       vae_tiling=vae_tiling, lora=lora)




@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="text prompt (or --prompts FILE)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="a prompt file, one prompt a line: every image into the --out folder, with OUT/index.jsonl; re-running skips finished images"),
    images_per_prompt: int = typer.Option(1, "--images-per-prompt", help="with --prompts: images of each prompt"),
    shard: Optional[str] = typer.Option(None, "--shard", help="with --prompts: K/N, this host's slice (prompts whose index is K mod N; K = 0..N-1)"),
    max_temp: Optional[float] = typer.Option(None, "--max-temp", help="with --prompts: °C; above it the batch steps down, then batches pause (NVML)"),
    max_power: Optional[float] = typer.Option(None, "--max-power", help="with --prompts: W of board power, as --max-temp (NVML)"),
    model: Optional[str] = ModelRunOpt,
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="run TensorRT / TensorRT-RTX engines of this bundle"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="run onnxruntime on this work dir's ONNX"),
    torch_: bool = typer.Option(False, "--torch", help="run the PyTorch modules"),
    precision: str = typer.Option("auto", "--precision", help="with --onnx: auto | fp32 | fp16 | fp8 | int4 | mixed (NVFP4 has no onnxruntime kernel)"),
    provider: str = typer.Option("auto", "--provider", help="with --onnx: onnxruntime on auto | cpu | cuda (CUDA needs onnxruntime-gpu)"),
    negative_prompt: str = typer.Option(_DEFAULT_REQUEST.negative_prompt, "--negative-prompt", "-n"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps [default: 28; Turbo 4]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale, > 1 for CFG [default: 4.5; Turbo 0]"),
    seed: int = typer.Option(_DEFAULT_REQUEST.seed, "--seed"),
    height: int = typer.Option(_DEFAULT_REQUEST.height, "--height"),
    width: int = typer.Option(_DEFAULT_REQUEST.width, "--width"),
    batch: str = typer.Option(str(_DEFAULT_REQUEST.batch), "--batch", help="images per call; with --prompts also auto (the largest the engine profiles and VRAM plan take)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG path (batch > 1: NAME-<i>.png) [default: image.png]; with --prompts a folder [default: images]"),
    device: str = typer.Option("auto", "--device", help="with --torch: auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="with --torch: auto (fp32 on CPU, bf16 on CUDA) | fp32 | fp16 | bf16"),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="with --bundle: CUDA graphs (TensorRT-RTX: its runtime strategy; TensorRT: a guarded capture)"),
    t5: bool = T5Opt,
    turbo: Optional[bool] = TurboOpt,
    vram: Optional[float] = VramOpt,
    vram_plan: str = VramPlanOpt,
    vae_tiling: str = TilingOpt,
    lora: Optional[str] = LoraOpt,
    json_out: bool = typer.Option(False, "--json", help="print timings and paths as JSON"),
) -> None:
    """Prompt → PNG: CLIP-L/G (+ T5) → MMDiT loop (CFG, flow matching) → VAE, on engines, ONNX or torch."""
    from sd35trt.core.artifacts import check_output_file
    from sd35trt.core.errors import InvalidInputError
    from sd35trt.runtime.launch import open_loop
    from sd35trt.runtime.request import GenerateRequest

    if (prompt is None) == (prompts is None):
        raise InvalidInputError("give one of --prompt and --prompts", hint="--prompt 'a koi pond', or --prompts prompts.txt")
    options = _loop_options(model, bundle, onnx, torch_, precision, provider, device, dtype, cuda_graph, t5, turbo,
                            vram, vram_plan, vae_tiling, lora)
    if prompts is not None:
        from sd35trt.cli.batch import generate_many

        request = GenerateRequest(prompt="", negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                  seed=seed, height=height, width=width)
        generate_many(options, request, prompts, out or Path("images"), batch=batch, images_per_prompt=images_per_prompt,
                      shard=shard, max_temp=max_temp, max_power=max_power, json_out=json_out)
        return
    if images_per_prompt != 1 or shard or max_temp is not None or max_power is not None:
        raise InvalidInputError("--images-per-prompt, --shard, --max-temp and --max-power go with --prompts",
                                hint="--prompts FILE for a batch run; --batch N for N images of one --prompt")
    if not batch.isdigit():
        raise InvalidInputError(f"--batch {batch} is not a number" + (" (auto goes with --prompts)" if batch == "auto" else ""),
                                hint="e.g. --batch 2")
    out = out or Path("image.png")
    if out.suffix.lower() != ".png":
        raise InvalidInputError("--out must end in .png", path=out, hint="e.g. --out image.png")
    request = GenerateRequest(prompt=prompt or "", negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                              seed=seed, height=height, width=width, batch=int(batch))
    targets = [out] if request.batch == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(request.batch)]

    for target in targets:  # before any work: a bad --out is found now, not after the whole denoising loop
        check_output_file(target, "--out")
    loop = open_loop(options, request)
    result = loop(request)
    paths = [str(save_png(image, target)) for image, target in zip(result.pil, targets)]
    info = {"images": paths, "timings": result.timings, "request": request.resolved(loop.assets.defaults).__dict__,
            "t5": loop.has_t5, "vram_plan": result.plan}
    if json_out:
        emit(info)
    else:
        echo("\n".join(paths))


def save_png(image, path: Path) -> Path:
    """A PIL image written atomically (temp file, fsync, rename; nothing left behind on failure)."""
    import io

    from sd35trt.core.artifacts import write_bytes_atomic

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _compare_runners(options: LoopOptions, source: ModelSource,
                     cfg: CompareConfig) -> tuple[dict[str, dict[str, Any]], Any, str, dict[str, str]]:
    """compare's candidates: the bundle's engines (with polygraphy's TrtRunner twin), or each ONNX variant; checked
    to be built from ``source``."""
    from sd35trt.checks.compare import onnx_variants
    from sd35trt.checks.polygraphy_runners import twin_refusal
    from sd35trt.core.manifests import BundleManifest
    from sd35trt.runtime.launch import open_runners

    if options.bundle is None:
        by_variant, ranges, missing = onnx_variants(options, cfg.variants, source)
        return by_variant, ranges, str(options.onnx), missing
    # refuses with the reason and the --onnx to use instead; where the runtime must say, both engine loaders ask it
    backend = BundleManifest.load(options.bundle).backend
    found = open_runners(options, built_from=source, loaders=[("polygraphy TrtRunner", lambda path, plan: twin_refusal(
        path, backend, plan.sha256, plan.bytes))])
    return {"engine": found.runners}, found.ranges, str(options.bundle), {}


@app.command()
def compare(
    model: str = typer.Option("tiny", "--model", "-m", help="the model the artifacts were built from (its PyTorch modules are the reference)"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="work dir with onnx/, onnx-fp16/, onnx-fp8/"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="compare an engine bundle (needs its GPU)"),
    variants: Optional[str] = typer.Option(None, "--variants", help="ONNX variants to compare, e.g. fp16,fp8 [default: every variant the work dir has]"),
    components: Optional[str] = typer.Option(None, "--components"),
    provider: str = typer.Option("auto", "--provider", help="onnxruntime on auto | cpu | cuda (CUDA needs onnxruntime-gpu)"),
    prompts: int = typer.Option(2, "--prompts", help="K prompts of real pipeline traffic (held-out end of calibration/prompts.txt)"),
    steps: int = typer.Option(4, "--steps"),
    height: int = typer.Option(512, "--height"),
    width: int = typer.Option(512, "--width"),
    seed: int = typer.Option(0, "--seed"),
    t5: bool = T5Opt,
    lora: Optional[str] = LoraOpt,
    out: Path = typer.Option(Path("compare"), "--out", "-o", help="folder for compare.json and compare.png"),
    device: str = typer.Option("auto", "--device", help="where the FP32 reference (diffusers, TF32 off) runs: auto (the GPU when there is one) | cpu | cuda"),
    verbose: bool = typer.Option(False, "--verbose", help="polygraphy's per-iteration log (on stderr)"),
    json_out: bool = typer.Option(False, "--json", help="print compare.json instead of the table"),
) -> None:
    """Per-component (polygraphy) and end-to-end comparison against PyTorch/diffusers; exit 1 on a failed tolerance."""
    import sd35trt.checks.polygraphy_runners as polygraphy_runners
    from sd35trt.checks.compare import CompareConfig, format_compare, run_compare
    from sd35trt.core.artifacts import ensure_writable_dir
    from sd35trt.core.errors import InvalidInputError
    from sd35trt.core.models import resolve_model
    from sd35trt.core.prompts import DEFAULT_PROMPTS, read_prompts
    from sd35trt.core.specs import parse_components
    from sd35trt.runtime.launch import LoopOptions

    if (onnx is None) == (bundle is None):
        raise InvalidInputError("choose exactly one of --onnx and --bundle", hint="e.g. --onnx build/tiny")
    ensure_writable_dir(out)  # before any work
    cfg = CompareConfig(variants=tuple(v.strip() for v in (variants or "").split(",") if v.strip()),
                        components=parse_components(components), prompts=prompts, steps=steps, height=height,
                        width=width, seed=seed, t5=t5, device=device)
    source = resolve_model(model, lora=lora)
    # the runners open as generate opens them: one LoopOptions, one open_runners
    options = LoopOptions(model=model, bundle=bundle, onnx=onnx, provider=provider, t5=t5, lora=lora)
    by_variant, ranges, label, missing = _compare_runners(options, source, cfg)
    polygraphy_runners.VERBOSE = verbose
    texts = read_prompts(DEFAULT_PROMPTS, prompts)[-prompts:]
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
    model: Optional[str] = ModelRunOpt,
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="time the engines of this bundle (on its GPU)"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="time onnxruntime on this work dir's ONNX"),
    torch_: bool = typer.Option(False, "--torch", help="time the PyTorch modules"),
    against: Optional[str] = typer.Option(None, "--against", help="peers timed in the same run, after the runner above: torch, compile, torchao-fp8 (comma-separated; torchao from '.[peers]')"),
    precision: str = typer.Option("auto", "--precision", help="with --onnx: auto | fp32 | fp16 | fp8 | int4 | mixed (NVFP4 has no onnxruntime kernel)"),
    provider: str = typer.Option("auto", "--provider", help="with --onnx: onnxruntime on auto | cpu | cuda (CUDA needs onnxruntime-gpu)"),
    steps: int = typer.Option(20, "--steps", help="timed transformer steps (after warm-up)"),
    loop_steps: Optional[int] = typer.Option(None, "--loop-steps", help="denoising steps of each end-to-end image [default: 28; Turbo 4]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale [default: 4.5; Turbo 0]"),
    images: int = typer.Option(2, "--images", help="end-to-end images timed per row"),
    height: int = typer.Option(1024, "--height"),
    width: int = typer.Option(1024, "--width"),
    batch: str = typer.Option("1", "--batch", help="images per call, one row each: e.g. 1,4 (throughput from the largest)"),
    device: str = typer.Option("auto", "--device", help="torch runners and peers: auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="torch runners and peers: auto (fp32 on CPU, bf16 on CUDA) | fp32 | fp16 | bf16"),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="with --bundle: CUDA graphs (TensorRT-RTX: its runtime strategy; TensorRT: a guarded capture)"),
    t5: bool = T5Opt,
    turbo: Optional[bool] = TurboOpt,
    vram: Optional[float] = VramOpt,
    vram_plan: str = VramPlanOpt,
    lora: Optional[str] = LoraOpt,
    sample: bool = typer.Option(True, "--sample/--no-sample", help="NVML power/memory/temperature/energy sampling at 20 Hz"),
    csv: Optional[Path] = typer.Option(None, "--csv", help="append the table's rows to this CSV file (header on a new file)"),
    save: Optional[Path] = typer.Option(None, "--save", help="write the JSON report to this file after every row (a long run that is cut off keeps its finished rows)"),
    json_out: bool = typer.Option(False, "--json", help="print the full report as JSON instead of the table"),
) -> None:
    """The table users compare on: step latency, s/image, images/s, peak GPU memory, power, energy, temperature —
    for one runner and its peers, one after another in this process, on the same requests."""
    from sd35trt.core.errors import InvalidInputError, check_choice
    from sd35trt.runtime.launch import TorchPeers, open_loop
    from sd35trt.runtime.request import GenerateRequest
    from sd35trt.runtime.timing import CSV_HEADER, PEERS, Peer, bench_peers, check_report_outputs, csv_lines

    peers_named = [p.strip() for p in (against or "").split(",") if p.strip()]
    for name in peers_named:
        check_choice("--against", name, tuple(PEERS))
    check_report_outputs(save, csv)  # before any work; a file of another kind is never overwritten
    subject = bundle is not None or onnx is not None or torch_
    options = _loop_options(model, bundle, onnx, torch_ or not subject, precision, provider, device, dtype, cuda_graph,
                            t5, turbo, vram, vram_plan, lora=lora)
    if steps < 1 or images < 1:
        raise InvalidInputError("--steps and --images must be ≥ 1", hint="e.g. --steps 20 --images 2")
    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise InvalidInputError(f"--batch '{batch}' is not a list of integers", hint="e.g. --batch 1,4") from None
    request = GenerateRequest(prompt="a lighthouse on a basalt cliff at golden hour, 35mm film photograph",
                              steps=loop_steps, guidance=guidance, height=height, width=width, batch=batches[0])
    torch_peers = TorchPeers(options)
    rows: list[Peer] = []
    if subject:
        name = "engine" if bundle else "onnx" if onnx else "torch"
        rows.append(Peer(name, (torch_peers.torch if name == "torch" else lambda r: open_loop(options, r)),
                         str(bundle or onnx or "diffusers modules")))
    for name in peers_named:
        if not (name == "torch" and rows and rows[0].name == "torch"):  # --torch --against torch: one row
            rows.append(Peer(name, torch_peers.opener(name), PEERS[name]))
    if not rows:
        rows.append(Peer("torch", torch_peers.torch, PEERS["torch"]))

    def saved(_row):
        if save is not None:
            from sd35trt.core.artifacts import write_json_atomic
            from sd35trt.runtime.timing import environment

            write_json_atomic(save, {"kind": "bench", "rows": done_rows, "environment": environment(), "partial": True})

    done_rows: list = []
    report = bench_peers(rows, request, batches, steps=steps, images=images, sample=sample,
                         on_row=lambda row: (done_rows.append(row), saved(row)))
    if save is not None:
        from sd35trt.core.artifacts import write_json_atomic

        write_json_atomic(save, report)
    if csv is not None:
        new = not csv.exists()
        with open(csv, "a", encoding="utf-8") as handle:
            handle.write(("" if not new else CSV_HEADER + "\n") + "\n".join(csv_lines(report)) + "\n")
    failed = [f"{r['peer']} (batch {r['batch']})" for r in report["rows"] if "error" in r]
    if json_out:
        emit(report)
    else:
        _print_bench(report, height, width)
    if failed:
        import sys

        sys.stderr.write(f"bench: {len(failed)} row(s) failed: {', '.join(failed)} (their errors are in the report)\n")
        raise typer.Exit(code=1)


def _print_bench(report, height: int, width: int) -> None:
    """The table as rich draws it (plain characters, no colour: it is a result on stdout)."""
    import io

    from rich.console import Console
    from rich.table import Table

    from sd35trt.runtime.timing import COLUMNS, table_rows

    env = report["environment"]
    gpu = env["gpu"].get("name") or env["gpu"].get("why", "no GPU")
    done = next((r["request"] for r in report["rows"] if "request" in r), None)
    table = Table(*COLUMNS, title=f"{height}x{width}" + (f", {done['steps']} steps, guidance {done['guidance']:g}"
                                                           if done else "") + f"; GPU: {gpu}",
                  caption="×: speed-up over the first row at that batch; GPU GiB: NVML's device-wide peak")
    for cells in table_rows(report):
        table.add_row(*cells)
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None, highlight=False).print(table)
    echo(buffer.getvalue().rstrip())


@app.command()
def selftest(out: Path = typer.Option(Path("selftest"), "--out", "-o", help="folder for selftest.json, the image, compare/"),
             json_out: bool = typer.Option(False, "--json", help="print selftest.json instead of the table")) -> None:
    """On a GPU host: tiny model → calibrate → export → engines for this GPU → generate → compare; PASS/FAIL per step."""
    from sd35trt.checks.selftest import run_selftest
    from sd35trt.core.artifacts import ensure_writable_dir

    ensure_writable_dir(out)
    report = run_selftest(out)
    if json_out:
        emit(report.to_dict())
    else:
        echo(report.table())
        echo(f"wrote {out / 'selftest.json'}")
    if not report:
        raise typer.Exit(code=1)


@app.command()
def refit(
    bundle: Path = typer.Argument(..., help="a bundle built with --refittable or --strip-weights"),
    onnx: Path = typer.Option(..., "--onnx", help="a work dir exported from the same model (with the adapter: sd35trt export --lora ...)"),
    lora: Optional[str] = typer.Option(None, "--lora", help="the adapters that work dir was exported with: adapter.safetensors[:scale][,more] [default: none: the base weights, which a --strip-weights bundle needs before it runs]"),
    out: Path = typer.Option(Path("engines"), "--out", "-o", help="engines root; the refit bundle goes to OUT/<model>[-lora-<hash>]/<target>-<backend>/"),
) -> None:
    """On the deploy host: the bundle's refittable engines with the weights of an ONNX export (a LoRA's, or the
    base's for a weight-stripped bundle) through TensorRT's Refitter and OnnxParserRefitter, written as a new
    bundle; no engine build."""
    from sd35trt.core.artifacts import ensure_writable_dir
    from sd35trt.core.lora import parse_adapters
    from sd35trt.producers.refit import refit_bundle
    from sd35trt.runtime.runners import check_bundle_host

    adapters = parse_adapters(lora)
    ensure_writable_dir(out)
    folder = refit_bundle(bundle, onnx, out, [a.sha256 for a in adapters], runtime_for=check_bundle_host)
    echo(str(folder))
