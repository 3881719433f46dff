"""Build an engine bundle for one GPU target: ``engines/<model>/<target>-<backend>/``.

The bundle holds ``<component>.plan`` per component, ``layers/<component>.txt`` (per-layer precision
summary) and ``manifest.json`` (what built it, from which ONNX, for which GPUs, with every hash). The
bundle is assembled in a temporary folder and swapped in at the end, so a failed or interrupted build
leaves the previous bundle intact; engines whose inputs are unchanged are carried over, not rebuilt.
"""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35trt import __version__, log
from sd35trt.artifacts import (
    atomic_dir,
    exclusive,
    hash_json,
    recover_interrupted,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from sd35trt.backends import TrtBackend, build_engine_isolated, choose_backend, local_compute_capability, summarize_layers
from sd35trt.errors import ArtifactError, BuildError, InvalidInputError
from sd35trt.export import check_disk
from sd35trt.manifests import BUNDLE_MANIFEST, MANIFEST, VARIANT_DIRS, BundleManifest, EngineEntry, OnnxManifest, WorkDir
from sd35trt.models import model_slug
from sd35trt.portability import RuntimeRecord, check_portability
from sd35trt.specs import COMPONENTS, Precision
from sd35trt.targets import TARGETS, Backend, GpuTarget, TargetInfo, plan_precisions, target_for_cc


@dataclass(frozen=True)
class BuildConfig:
    target: GpuTarget = GpuTarget.ADA
    backend: Backend = Backend.AUTO
    components: tuple[str, ...] = COMPONENTS
    precision: Precision | None = None  # None = the table in targets.plan_precisions decides
    workspace_gib: float | None = None
    portable: bool = False  # full TensorRT: version-compatible plans for the lean runtime (sd35trt.portability)
    hardware_compat: str = "none"  # "ampere+": one engine for every GPU from Ampere on (full TensorRT)
    memory_check: bool = True  # refuse a build this host's memory cannot hold (check_memory)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.value, "backend": self.backend.value, "components": list(self.components),
                "precision": self.precision.value if self.precision else "auto", "workspace_gib": self.workspace_gib,
                "portable": self.portable, "hardware_compat": self.hardware_compat, "memory_check": self.memory_check}

    @property
    def flavour(self) -> str:
        """Suffix of the bundle folder: portable bundles sit beside the plain ones, never over them."""
        return ("-portable" if self.portable else "") + ("-ampereplus" if self.hardware_compat == "ampere+" else "")


@dataclass
class BundleResult:
    folder: Path
    manifest: BundleManifest
    skipped: bool
    rebuilt: list[str] = field(default_factory=list)


def resolve_target(target: GpuTarget) -> TargetInfo:
    if target is not GpuTarget.AUTO:
        return TARGETS[target]
    cc = local_compute_capability()
    if cc is None:
        raise InvalidInputError("--gpu auto needs a local CUDA GPU and none was found",
                                hint="name the target: --gpu ada|hopper|blackwell|ampere|turing")
    found = target_for_cc(cc)
    if found is None:
        raise InvalidInputError(f"local GPU SM{cc[0]}{cc[1]} is not a supported target",
                                hint="supported: SM75, SM80, SM86, SM89, SM90, SM100, SM120")
    return TargetInfo(found, (cc,), TARGETS[found].example_gpus)


def load_onnx_variants(onnx_root: Path, components: tuple[str, ...]) -> dict[str, dict[Precision, OnnxManifest]]:
    """Manifests of every ONNX variant present under ``onnx_root`` (the --out of calibrate/export)."""
    if not onnx_root.is_dir():
        raise InvalidInputError("ONNX directory not found", path=onnx_root,
                                hint="pass the --out of `sd35trt export` as --onnx")
    work = WorkDir(onnx_root)
    found: dict[str, dict[Precision, OnnxManifest]] = {c: {} for c in components}
    for precision in VARIANT_DIRS:
        for name in components:
            folder = work.onnx_folder(precision, name)
            if not (folder / "model.onnx").exists() and not (folder / MANIFEST).exists():
                continue
            found[name][precision] = OnnxManifest.load(folder, name, precision)
    if not any(found.values()):
        raise ArtifactError("no exported ONNX found", path=onnx_root,
                            hint="run `sd35trt calibrate` then `sd35trt export` with this --out first")
    return found


def component_hash(backend: TrtBackend, ccs: tuple[tuple[int, int], ...], onnx_manifest: OnnxManifest,
                   config: BuildConfig) -> str:
    return hash_json({"toolkit": __version__, "backend": backend.kind.value, "backend_version": backend.version,
                      "ccs": ccs, "onnx_files": onnx_manifest.files, "profile": onnx_manifest.profile,
                      "workspace_gib": config.workspace_gib, "portable": config.portable,
                      "hardware_compat": config.hardware_compat})


def bundle_folder(engines_root: Path, model_slug: str, target: TargetInfo, backend: TrtBackend, flavour: str = "") -> Path:
    return engines_root / model_slug / f"{target.target.value}-{backend.kind.value}{flavour}"


# Memory a build needs per byte of engine weights. Peak RSS is ~2.7-2.8x (TensorRT-RTX 1.7, child process, SD3.5-Large
# FP8/FP16 transformer and FP16 T5 on the H100 host; SD3.5-Medium FP16 transformer 2.81x on the CPU box), but about
# 1x of that is file-backed: the ONNX weights the parser maps, clean page cache the kernel can drop and re-read,
# which MemAvailable already counts as available. The anonymous part measured 1.80x (Medium FP16 transformer,
# bench/results/2026-11-22-cpu-run7). The check asks for 2.0x plus 1 GiB for the libraries.
BUILDER_MEMORY_FACTOR = 2.0


def available_memory() -> int | None:
    """MemAvailable + SwapFree from /proc/meminfo (bytes), or None where that cannot be read."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(onnx_bytes: int, what: str, available: int | None) -> None:
    """One line before a build whose builder would not fit in this host's memory (the OOM killer would end it
    minutes later, the previous bundle untouched, but with no time saved). ``available`` is MemAvailable +
    SwapFree; ``BUILDER_MEMORY_FACTOR`` says what is counted."""
    needed = int(onnx_bytes * BUILDER_MEMORY_FACTOR) + (1 << 30)
    if available is not None and needed > available:
        raise InvalidInputError(f"not enough memory to build {what}: the builder needs about {needed / 2**30:.1f} GiB "
                                f"({BUILDER_MEMORY_FACTOR}x its {onnx_bytes / 2**30:.1f} GiB of weights, measured, besides "
                                f"the mapped ONNX itself), "
                                f"{available / 2**30:.1f} GiB available",
                                hint="free memory or build on a larger machine; --no-memory-check tries anyway "
                                     "(for VMs whose memory grows on demand)")


def build_bundle(onnx_root: Path, engines_root: Path, config: BuildConfig, *, force: bool = False) -> BundleResult:
    """``sd35trt build``: choose precisions and backend, verify the ONNX, build what changed, swap in."""
    target = resolve_target(config.target)
    variants = load_onnx_variants(onnx_root, config.components)
    plan = plan_precisions(target, config.components, {c: set(v) for c, v in variants.items()}, config.precision)
    fp8 = [name for name, choice in plan.items() if choice.precision is Precision.FP8]
    check_portability(config.backend.value, config.portable, config.hardware_compat, fp8_components=fp8, build_cc=None)
    backend = choose_backend(config.backend, target)
    check_portability(backend.kind.value, config.portable, config.hardware_compat, fp8_components=fp8,
                      build_cc=local_compute_capability() if backend.kind is Backend.TENSORRT else None)
    ccs = backend.buildable_ccs(target)
    model = next(m for v in variants.values() for m in v.values()).model
    folder = bundle_folder(engines_root, model_slug(model), target, backend, config.flavour)
    with exclusive(folder, "build"):  # a second `make engines` for this target waits, then finds it up to date
        return _build_into(folder, engines_root, config, target, backend, ccs, model, variants, plan, force)


def _build_into(folder: Path, engines_root: Path, config: BuildConfig, target: TargetInfo, backend: TrtBackend,
                ccs: tuple[tuple[int, int], ...], model: dict[str, Any], variants: dict[str, Any], plan: dict[str, Any],
                force: bool) -> BundleResult:
    sources = {name: variants[name][choice.precision] for name, choice in plan.items()}
    hashes = {name: component_hash(backend, ccs, sources[name], config) for name in plan}
    bundle_hash = hash_json({"components": hashes, "plan": {k: v.precision.value for k, v in plan.items()}})
    recover_interrupted(folder)
    previous = _read_previous(folder)
    if not force and previous and previous.inputs_hash == bundle_hash and previous.intact():
        log.info(f"bundle {folder} is up to date, skipped")
        return BundleResult(folder, previous, skipped=True)

    for source in sources.values():  # never build from an ONNX that doesn't match its manifest
        source.verify()

    log.info(f"target {target.target.value} ({', '.join(f'SM{a}{b}' for a, b in ccs)}), backend "
             f"{backend.kind.value} {backend.version}")
    for name, choice in plan.items():
        log.info(f"  {name}: {choice.precision.value} — {choice.reason}")
    cache_path = engines_root / ".cache" / f"timing-{backend.kind.value}-{backend.version}-" \
        f"{'_'.join(f'sm{a}{b}' for a, b in ccs)}.cache"
    timing_cache = cache_path.read_bytes() if backend.has_timing_cache and cache_path.is_file() else None

    start = time.perf_counter()
    rebuilt, entries = [], {}
    with atomic_dir(folder) as tmp:
        (tmp / "layers").mkdir()
        for name, choice in plan.items():
            source = sources[name]
            plan_name = f"{name}.plan"
            old = previous.components.get(name) if previous else None
            if not force and old and old.data.get("inputs_hash") == hashes[name] and _file_ok(folder / plan_name, old):
                shutil.copy2(folder / plan_name, tmp / plan_name)
                if (folder / "layers" / f"{name}.txt").is_file():
                    shutil.copy2(folder / "layers" / f"{name}.txt", tmp / "layers" / f"{name}.txt")
                entries[name] = old.data
                log.info(f"  {name}: unchanged, reused")
                continue
            onnx_path = source.onnx_path
            # an engine holds about its ONNX's weight bytes: refuse in one line before a build that cannot be written
            onnx_bytes = sum(e["bytes"] for e in source.files.values())
            check_disk(tmp, int(onnx_bytes * 1.1), f"the {name} engine")
            if config.memory_check:
                check_memory(onnx_bytes, f"the {name} engine", available_memory())
            with log.step(f"build {name} ({choice.precision.value}) with {backend.kind.value}") as timing:
                with log.working(f"{backend.kind.value} builder"):
                    built = build_engine_isolated(backend, onnx_path, source.profile, ccs, tmp / plan_name,
                                                  timing_cache=timing_cache, workspace_gib=config.workspace_gib,
                                                  version_compatible=config.portable,
                                                  hardware_compat=config.hardware_compat)
            if built.timing_cache:
                timing_cache = built.timing_cache
            islands = source.fp32_islands
            summary = summarize_layers(built.layers, [i["module"] for i in islands])
            check_layer_report(name, choice.precision, summary, onnx_path, built.layer_source)
            if islands and summary["island_gemm"] and summary["island_gemm_fp32"] < summary["island_gemm"]:
                log.warn(f"{name}: {summary['island_gemm'] - summary['island_gemm_fp32']} GEMM(s) of its FP32 islands "
                         "did not run in FP32 in the engine (see layers/)")
            (tmp / "layers" / f"{name}.txt").write_text(
                format_layers(name, choice.precision, summary, built.layers, islands))
            entries[name] = {
                "file": plan_name, "sha256": sha256_file(tmp / plan_name), "bytes": built.plan_bytes,
                "precision": choice.precision.value, "weights_precision": source.weights_precision,
                "reason": choice.reason, "inputs_hash": hashes[name], "fp32_islands": islands,
                "onnx": {"path": str(onnx_path), "files": source.files, "inputs_hash": source.inputs_hash,
                         "calibration_hash": source.calibration_hash},
                "profile": source.profile, "ranges": source.ranges,
                "io": {"inputs": source.inputs, "outputs": source.outputs},
                "layers": summary, "build_seconds": round(timing["seconds"], 2), "warnings": built.warnings[-5:],
                "builder_memory": built.memory,
            }
            rebuilt.append(name)
        runtime = RuntimeRecord(backend.kind.value, backend.version, config.portable, config.hardware_compat,
                                tuple(f"{a}.{b}" for a, b in ccs)).to_dict()
        manifest = {
            "kind": "engine-bundle", "manifest_version": 1, "toolkit": __version__,
            "model": model, "random_weights": model.get("random_weights", False),
            "target": target.target.value, "compute_capabilities": [f"{a}.{b}" for a, b in ccs],
            "backend": backend.kind.value, "backend_version": backend.version,
            "runtime": runtime,
            "runtime_requirement": f"{' or '.join(runtime['runs_on'])} on a GPU with {runtime['gpus']}",
            "timing_cache": str(cache_path) if backend.has_timing_cache else "not supported by this backend",
            "config": config.to_dict(), "inputs_hash": bundle_hash, "components": entries,
            "build_seconds": round(time.perf_counter() - start, 2), "host": platform.node(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(tmp / BUNDLE_MANIFEST, manifest)
    if timing_cache and backend.has_timing_cache:
        write_bytes_atomic(cache_path, timing_cache)
    return BundleResult(folder, BundleManifest.from_dict(manifest, folder), skipped=False, rebuilt=rebuilt)


def _read_previous(folder: Path) -> BundleManifest | None:
    try:
        return BundleManifest.load(folder) if (folder / BUNDLE_MANIFEST).is_file() else None
    except ArtifactError:
        return None


def _file_ok(path: Path, entry: EngineEntry) -> bool:
    return path.is_file() and path.stat().st_size == entry.bytes


def check_layer_report(name: str, precision: Precision, summary: dict[str, Any], onnx_path: Path,
                       source: str = "builder log") -> None:
    """An FP8 engine must have FP8 GEMMs. A layer report that could not be read (the builder's verbose format
    changes between versions) is recorded as unknown with a warning: it never fails a valid build. ``source``
    says where a readable report came from (the builder log, or full TensorRT's engine inspector)."""
    if summary["layers"] == 0:
        summary["report"] = "unknown"
        log.warn(f"{name}: the builder's per-layer report could not be read; layer precisions are unknown")
        return
    summary["report"] = source
    if precision is Precision.FP8 and summary["gemm_fp8"] == 0:
        raise BuildError(f"{name}: FP8 requested but the engine has no FP8 GEMM", path=onnx_path,
                         hint="the Q/DQ placement was not fused; report this with layers/ and the ONNX manifest")


def format_layers(name: str, precision: Precision, summary: dict[str, int], layers: list[dict[str, Any]],
                  islands: list[dict[str, Any]] | None = None) -> str:
    lines = [f"# {name}: built as {precision.value}",
             f"# GEMM layers: {summary['gemm']} total, {summary['gemm_fp8']} FP8, {summary['gemm_fp16']} FP16, "
             f"{summary['gemm_other']} other; {summary['layers']} layers in all"]
    for island in islands or []:
        lines.append(f"# FP32 island: {island['module']} (max |x| {island['max_abs']:.4g}; {island['why']})")
    if islands:
        lines.append(f"# GEMMs inside FP32 islands: {summary['island_gemm']}, of which FP32: {summary['island_gemm_fp32']}")
    lines.append("")
    for layer in layers:
        lines.append(f"{layer['type']:<16} in={','.join(layer['input_dtypes']) or '-':<20} "
                     f"w={','.join(layer['weight_dtypes']) or '-':<24} {layer['name'][:160]}")
    return "\n".join(lines) + "\n"


# --- verification --------------------------------------------------------------------------------------


def verify_bundle(folder: Path) -> BundleManifest:
    """``sd35trt bundle verify``: the manifest is well-formed and every engine matches its sha256."""
    manifest = BundleManifest.load(folder)
    manifest.verify()
    return manifest
