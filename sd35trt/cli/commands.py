"""Subcommands beyond export/calibrate: build, bundle verify, doctor (generate/compare live in their modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sd35trt.cli.main import app, bundle_app, emit


@app.command()
def build(
    gpu: str = typer.Option("ada", "--gpu", help="target: hopper | ada | blackwell | ampere | turing | auto"),
    backend: str = typer.Option("auto", "--backend", help="auto | tensorrt | tensorrt-rtx"),
    onnx: Path = typer.Option(Path("build/tiny"), "--onnx", help="the --out of export/calibrate"),
    out: Path = typer.Option(Path("engines"), "--out", "-o", help="engines root; bundle goes to OUT/<model>/<target>-<backend>/"),
    components: Optional[str] = typer.Option(None, "--components", help="subset of transformer,clip_l,clip_g,t5,vae_decoder"),
    precision: str = typer.Option("auto", "--precision", help="auto (table per target) | fp8 | fp16 | fp32"),
    workspace_gib: Optional[float] = typer.Option(None, "--workspace-gib", help="builder workspace limit"),
    force: bool = typer.Option(False, "--force", help="rebuild even when inputs are unchanged"),
) -> None:
    """Build one engine bundle for a GPU target (FP8 where the GPU has it, FP16 fallback where not)."""
    from sd35trt.artifacts import ensure_writable_dir
    from sd35trt.build import BuildConfig, build_bundle
    from sd35trt.errors import InvalidInputError
    from sd35trt.specs import Precision, parse_components
    from sd35trt.targets import parse_backend, parse_target

    if precision not in ("auto", *(p.value for p in Precision)):
        raise InvalidInputError(f"--precision '{precision}' is not one of auto, fp8, fp16, fp32", hint="use --precision auto")
    config = BuildConfig(target=parse_target(gpu), backend=parse_backend(backend), components=parse_components(components),
                         precision=None if precision == "auto" else Precision(precision), workspace_gib=workspace_gib)
    ensure_writable_dir(out)
    result = build_bundle(onnx, out, config, force=force)
    m = result.manifest
    emit({"bundle": str(result.folder), "skipped": result.skipped, "rebuilt": result.rebuilt,
          "target": m["target"], "compute_capabilities": m["compute_capabilities"], "backend": m["backend"],
          "components": {k: {"precision": v["precision"], "bytes": v["bytes"],
                             "gemm_fp8": v["layers"]["gemm_fp8"], "gemm": v["layers"]["gemm"]}
                         for k, v in m["components"].items()}})


@bundle_app.command("verify")
def bundle_verify(folder: Path = typer.Argument(..., help="engines/<model>/<target>-<backend>/")) -> None:
    """Check the bundle manifest and the sha256 of every engine."""
    from sd35trt.build import verify_bundle

    manifest = verify_bundle(folder)
    emit({"bundle": str(folder), "ok": True, "engines": len(manifest["components"]),
          "target": manifest["target"], "backend": f"{manifest['backend']} {manifest['backend_version']}"})


@app.command()
def doctor(bundle: Optional[Path] = typer.Argument(None, help="a bundle folder, or a model folder holding several")) -> None:
    """Report this host's GPU, driver and runtimes, and which engines of a bundle can run here."""
    from sd35trt.doctor import diagnose

    report = diagnose(bundle)
    emit(report)
    if bundle is not None and not report.get("runnable_bundles"):
        raise typer.Exit(code=3)
