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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt import __version__
from sd35trt.core import log
from sd35trt.core.artifacts import (
    atomic_dir,
    check_disk,
    exclusive,
    file_entries,
    hash_json,
    recover_interrupted,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from sd35trt.core.assets import ASSETS_FILE, PipelineAssets
from sd35trt.core.errors import ArtifactError, BuildError, InvalidInputError
from sd35trt.core.host import resolve_target
from sd35trt.core.manifests import (
    BUNDLE_ASSETS,
    BUNDLE_MANIFEST,
    MANIFEST,
    STATIC_ACTIVATIONS,
    VARIANT_DIRS,
    BundleManifest,
    EngineEntry,
    OnnxManifest,
    PlanFile,
    RuntimeRecord,
    WorkDir,
)
from sd35trt.core.models import model_slug
from sd35trt.core.portability import check_portability
from sd35trt.core.specs import COMPONENTS, Precision
from sd35trt.core.targets import Backend, GpuTarget, PrecisionChoice, TargetInfo, narrow_for_format, plan_precisions
from sd35trt.producers.layer_report import summarize_layers
from sd35trt.producers.parts import (
    BUILDER_BASE_GIB,
    MAX_PARTS,
    PEAK_RSS_FACTOR,
    PartsChoice,
    available_memory,
    builder_need,
    check_memory,
    plan_part_counts,
)
from sd35trt.producers.refit import describe_refit
from sd35trt.producers.trt_builder import (
    TrtBackend,
    build_engine_isolated,
    choose_backend,
    local_compute_capability,
)

if TYPE_CHECKING:
    from sd35trt.producers.parts import PartPlan


@dataclass(frozen=True)
class BuildConfig:
    target: GpuTarget = GpuTarget.ADA
    backend: Backend = Backend.AUTO
    components: tuple[str, ...] = COMPONENTS
    precision: Precision | None = None  # None = the table in targets.plan_precisions decides
    workspace_gib: float | None = None
    portable: bool = False  # full TensorRT: version-compatible plans for the lean runtime (sd35trt.core.portability)
    hardware_compat: str = "none"  # "ampere+": one engine for every GPU from Ampere on (full TensorRT)
    memory_check: bool = True  # refuse a build this host's memory cannot hold (check_memory)
    parts: tuple[tuple[str, int], ...] = ()  # (component, count): build it in parts (producers.parts)
    max_build_memory_gib: float | None = None  # build in as many parts as keep each builder's peak RSS under this
    weight_streaming: bool = False  # the transformer with BuilderFlag.WEIGHT_STREAMING (the VRAM plan's streaming mode)
    refit: str = "none"  # "refit": refittable engines (LoRA on the deploy host, producers.refit); "stripped": and weightless
    int8: tuple[str, ...] = ()  # --int8: components built from their INT8-weight ONNX (export --int8 made it)

    def __post_init__(self):
        from sd35trt.core.errors import check_choice
        from sd35trt.producers.refit import REFIT_MODES

        check_choice("--refit", self.refit, REFIT_MODES)
        for name, count in self.parts:
            if name not in self.components or not 1 <= count <= MAX_PARTS:
                raise InvalidInputError(f"--parts {name}={count}: expected a component being built "
                                        f"({', '.join(self.components)}) and a count from 1 to {MAX_PARTS}",
                                        hint="for example --parts transformer=2")
        if self.max_build_memory_gib is not None and self.max_build_memory_gib <= BUILDER_BASE_GIB:
            raise InvalidInputError(f"--max-build-memory {self.max_build_memory_gib:g} GiB: a builder process needs "
                                    f"more than {BUILDER_BASE_GIB:g} GiB before any weights",
                                    hint="give the memory of the build box in GiB, for example --max-build-memory 16")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.value, "backend": self.backend.value, "components": list(self.components),
                "precision": self.precision.value if self.precision else "auto", "workspace_gib": self.workspace_gib,
                "portable": self.portable, "hardware_compat": self.hardware_compat, "memory_check": self.memory_check,
                "parts": dict(self.parts), "max_build_memory_gib": self.max_build_memory_gib,
                "weight_streaming": self.weight_streaming, "t5": "t5" in self.components, "refit": self.refit}

    @property
    def folder_suffix(self) -> str:
        """Suffix of the bundle folder: portable bundles sit beside the plain ones, never over them."""
        return ("-portable" if self.portable else "") + ("-ampereplus" if self.hardware_compat == "ampere+" else "")


def parse_parts(text: str | None) -> tuple[tuple[str, int], ...]:
    """``--parts transformer=2,t5=2`` → ((transformer, 2), (t5, 2)); BuildConfig checks names and counts."""
    found = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, count = item.partition("=")
        if not count.strip().isdigit():
            raise InvalidInputError(f"--parts: '{item.strip()}' is not COMPONENT=COUNT", hint="for example --parts transformer=2,t5=2")
        found.append((name.strip(), int(count)))
    return tuple(found)


@dataclass
class BundleResult:
    folder: Path
    manifest: BundleManifest
    skipped: bool
    rebuilt: list[str] = field(default_factory=list)


def load_onnx_variants(onnx_root: Path, components: tuple[str, ...]) -> dict[str, dict[Precision, OnnxManifest]]:
    """Manifests of every ONNX variant present under ``onnx_root`` (the --out of calibrate/export)."""
    if not onnx_root.is_dir():
        raise InvalidInputError("ONNX directory not found", path=onnx_root,
                                hint="pass the --out of `sd35trt export` as --onnx")
    from sd35trt.producers.calibration_state import load_calibration

    work = WorkDir(onnx_root)
    calibration = load_calibration(work, verify=False)
    found: dict[str, dict[Precision, OnnxManifest]] = {c: {} for c in components}
    for precision in VARIANT_DIRS:
        for name in components:
            folder = work.onnx_folder(precision, name)
            if not (folder / "model.onnx").exists() and not (folder / MANIFEST).exists():
                continue
            manifest = OnnxManifest.load(folder, name, precision)
            if precision.quantized and calibration is not None and manifest.calibration_hash != calibration.inputs_hash:
                continue  # a quantized ONNX of an earlier calibration (another --format): not this work dir's now
            found[name][precision] = manifest
    if not any(found.values()):
        raise ArtifactError("no exported ONNX found", path=onnx_root,
                            hint=f"run `sd35trt calibrate --out {onnx_root}` and `sd35trt export --out {onnx_root}` first "
                                 "(build's --onnx is their --out), or `make engines`")
    return found


def component_hash(backend: TrtBackend, ccs: tuple[tuple[int, int], ...], onnx_manifest: OnnxManifest,
                   config: BuildConfig, parts: int = 1) -> str:
    streams = config.weight_streaming and onnx_manifest.component == "transformer"
    return hash_json({"toolkit": __version__, "backend": backend.kind.value, "backend_version": backend.version,
                      "ccs": ccs, "onnx_files": onnx_manifest.files, "profile": onnx_manifest.profile,
                      "workspace_gib": config.workspace_gib, "portable": config.portable,
                      "hardware_compat": config.hardware_compat, **({"parts": parts} if parts > 1 else {}),
                      **({"weight_streaming": True} if streams else {}),
                      **({"refit": config.refit} if config.refit != "none" else {})})


def bundle_suffix(plan: Mapping[str, Any], base: str = "") -> str:
    """The suffix that sets a bundle's folder apart from the plain FP8/FP16 bundle of its target, so that no build
    replaces a different kind of bundle: ``base`` (-portable, -ampereplus), then -int4/-nvfp4/-mixed for a 4-bit
    transformer (-int8: INT8 weights, ``--int8``), then -clip for a whole bundle but T5-XXL (``make engines T5=0`` beside the full one; a build of
    some components, ``--components clip_l``, is not CLIP-only)."""
    low_bit = sorted({c.precision.value for c in plan.values() if c.precision.low_bit and c.precision is not Precision.FP8})
    clip_only = set(plan) == set(COMPONENTS) - {"t5"}
    return base + "".join(f"-{f}" for f in low_bit) + ("-clip" if clip_only else "")


def bundle_folder(engines_root: Path, model_slug: str, target: TargetInfo, backend: TrtBackend, suffix: str = "") -> Path:
    return engines_root / model_slug / f"{target.target.value}-{backend.kind.value}{suffix}"


def build_bundle(onnx_root: Path, engines_root: Path, config: BuildConfig, *, force: bool = False) -> BundleResult:
    """``sd35trt build``: choose precisions and backend, verify the ONNX, build what changed, swap in."""
    target = resolve_target(config.target)
    if "t5" in config.components and WorkDir(onnx_root).clip_only():
        log.info("t5: the work dir's model has no T5-XXL (a CLIP-only download): the bundle is CLIP-only")
        config = replace(config, components=tuple(c for c in config.components if c != "t5"))
    variants = load_onnx_variants(onnx_root, config.components)
    available = {c: set(v) for c, v in variants.items()}
    if config.portable or config.hardware_compat != "none":  # the options' own conflicts first (ampere+ with FP8)
        try:
            wanted = [n for n, c in plan_precisions(target, config.components, available, config.precision,
                                                    int8=config.int8).items() if c.precision.quantized]
        except (InvalidInputError, BuildError):  # a plan only the chosen backend's CCs make (NVFP4 on SM120)
            wanted = [n for n, v in available.items() if any(p.quantized for p in v)]

        check_portability(config.backend.value, config.portable, config.hardware_compat, fp8_components=wanted,
                          build_cc=None)

    backend = choose_backend(config.backend, target)

    quant = next((p for v in available.values() for p in v if p.quantized), None)
    ccs = backend.buildable_ccs(target)
    if quant is not None:  # an INT4/NVFP4 engine is built for the CCs whose GEMMs take it (ampere + int4: SM86)
        ccs, dropped = narrow_for_format(target, backend.kind, quant, ccs)
        if dropped:
            log.warn(dropped)
    plan = plan_precisions(target, config.components, available, config.precision, backend=backend.kind, ccs=ccs,
                           int8=config.int8)
    quantized = [name for name, choice in plan.items() if choice.precision.quantized]
    check_portability(backend.kind.value, config.portable, config.hardware_compat, fp8_components=quantized,
                      build_cc=local_compute_capability() if backend.kind is Backend.TENSORRT else None)
    model = next(m for v in variants.values() for m in v.values()).model
    folder = bundle_folder(engines_root, model_slug(model), target, backend, bundle_suffix(plan, config.folder_suffix))

    with exclusive(folder, "build"):  # a second `make engines` for this target waits, then finds it up to date
        return _build_into(folder, engines_root, config, target, backend, ccs, model, variants, plan, force, onnx_root)


def _build_into(folder: Path, engines_root: Path, config: BuildConfig, target: TargetInfo, backend: TrtBackend,
                ccs: tuple[tuple[int, int], ...], model: dict[str, Any], variants: dict[str, Any], plan: dict[str, Any],
                force: bool, onnx_root: Path) -> BundleResult:
    sources = {name: variants[name][choice.precision] for name, choice in plan.items()}
    weights = {name: sum(e["bytes"] for e in sources[name].files.values()) for name in plan}
    available = available_memory()
    parts = plan_part_counts(weights, dict(config.parts), config.max_build_memory_gib, available, config.memory_check)
    hashes = {name: component_hash(backend, ccs, sources[name], config, parts[name].count) for name in plan}
    assets = WorkDir(onnx_root).root / BUNDLE_ASSETS
    assets_hash = sha256_file(assets / ASSETS_FILE) if (assets / ASSETS_FILE).is_file() else None
    bundle_hash = hash_json({"components": hashes, "plan": {k: v.precision.value for k, v in plan.items()},
                             **({"assets": assets_hash} if assets_hash else {})})
    recover_interrupted(folder)
    previous = _read_previous(folder)
    if not force and previous and previous.inputs_hash == bundle_hash and previous.intact():
        log.info(f"bundle {folder} is up to date, skipped")
        return BundleResult(folder, previous, skipped=True)

    for source in sources.values():  # never build from an ONNX that doesn't match its manifest
        source.verify()

    _log_plan(target, backend, ccs, plan, parts)
    cache_path = engines_root / ".cache" / f"timing-{backend.kind.value}-{backend.version}-" \
        f"{'_'.join(f'sm{a}{b}' for a, b in ccs)}.cache"
    timing_cache = cache_path.read_bytes() if backend.has_timing_cache and cache_path.is_file() else None

    start = time.perf_counter()
    rebuilt: list[str] = []
    entries: dict[str, EngineEntry] = {}
    with atomic_dir(folder) as tmp:
        (tmp / "layers").mkdir()
        for name, choice in plan.items():
            old = previous.components.get(name) if previous else None
            if not force and old and _reuse_unchanged(folder, tmp, old, hashes[name]):
                entries[name] = old
                continue
            build = ComponentBuild(name, choice, sources[name], weights[name], parts[name], hashes[name])
            entries[name], timing_cache = _build_component(build, tmp, config, backend, ccs, available, timing_cache)
            rebuilt.append(name)
        entries |= _keep_others(folder, tmp, previous, plan, model, backend, ccs)
        entries = {name: entries[name] for name in COMPONENTS if name in entries}
        runtime = RuntimeRecord(backend.kind.value, backend.version, config.portable, config.hardware_compat,
                                tuple(f"{a}.{b}" for a, b in ccs)).to_dict() | {"activation_memory": STATIC_ACTIVATIONS}
        shipped = _ship_assets(assets, tmp / BUNDLE_ASSETS, t5="t5" in entries)
        manifest = BundleManifest(
            folder=folder, target=target.target.value, compute_capabilities=[f"{a}.{b}" for a, b in ccs],
            backend=backend.kind.value, backend_version=backend.version, model=model, inputs_hash=bundle_hash,
            components=entries, runtime=runtime, config=config.to_dict(), assets=shipped, toolkit=__version__,
            timing_cache=str(cache_path) if backend.has_timing_cache else "not supported by this backend",
            build_seconds=round(time.perf_counter() - start, 2), host=platform.node(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json_atomic(tmp / BUNDLE_MANIFEST, manifest.to_dict())
    if timing_cache and backend.has_timing_cache:
        write_bytes_atomic(cache_path, timing_cache)
    return BundleResult(folder, manifest, skipped=False, rebuilt=rebuilt)


def _log_plan(target: TargetInfo, backend: TrtBackend, ccs: tuple[tuple[int, int], ...], plan: dict[str, Any],
              parts: dict[str, Any]) -> None:
    log.info(f"target {target.target.value} ({', '.join(f'SM{a}{b}' for a, b in ccs)}), backend "
             f"{backend.kind.value} {backend.version}")
    for name, choice in plan.items():
        log.info(f"  {name}: {choice.precision.value} — {choice.reason}"
                 + (f"; in {parts[name].count} parts ({parts[name].reason})" if parts[name].count > 1 else ""))


def _reuse_unchanged(folder: Path, tmp: Path, old: EngineEntry, inputs_hash: str) -> bool:
    """Copy a component's engine and layer summary from the previous bundle into ``tmp`` when its inputs are
    unchanged and its plan files intact; False (nothing copied) when it must be built again."""
    if old.inputs_hash != inputs_hash or not _plans_intact(folder, old):
        return False
    _copy_engine(folder, tmp, old)
    log.info(f"  {old.name}: unchanged, reused")
    return True


def _plans_intact(folder: Path, entry: EngineEntry) -> bool:
    return all(_file_ok(folder / p.file, p.bytes) for p in entry.plans)


def _copy_engine(folder: Path, tmp: Path, entry: EngineEntry) -> None:
    """One engine of the previous bundle into the one being assembled: its plan file(s) and layer summary."""
    for p in entry.plans:
        shutil.copy2(folder / p.file, tmp / p.file)
    if (folder / "layers" / f"{entry.name}.txt").is_file():
        shutil.copy2(folder / "layers" / f"{entry.name}.txt", tmp / "layers" / f"{entry.name}.txt")


@dataclass(frozen=True)
class ComponentBuild:
    """What one component's engine is built from: its precision choice, ONNX, weight bytes, parts and input hash."""

    name: str
    choice: PrecisionChoice
    source: OnnxManifest
    weight_bytes: int
    parts: PartsChoice
    inputs_hash: str


def _build_component(build: ComponentBuild, tmp: Path, config: BuildConfig, backend: TrtBackend,
                     ccs: tuple[tuple[int, int], ...], available: int | None,
                     timing_cache: bytes | None) -> tuple[EngineEntry, bytes | None]:
    """Build one component's engine (in parts where planned) into ``tmp``, check its layer report, and write its
    layer summary; returns its manifest entry and the timing cache, updated."""
    name, choice, source = build.name, build.choice, build.source
    # an engine holds about its ONNX's weight bytes: refuse in one line before a build that cannot be written
    check_disk(tmp, int(build.weight_bytes * 1.1), f"the {name} engine")
    pieces = _pieces(name, source, build.weight_bytes, build.parts, config, available, tmp / ".parts" / name)
    streams = config.weight_streaming and name == "transformer"
    built_parts, layers, layer_source = [], [], "builder log"
    with log.step(f"build {name} ({choice.precision.value}) with {backend.kind.value}"
                  + (f" in {len(pieces)} parts" if len(pieces) > 1 else "")) as timing:
        for part_onnx, part in pieces:
            plan_name = f"{name}.plan" if part is None else f"{name}.part{part.index + 1}of{part.count}.plan"
            with log.working(f"{backend.kind.value} builder" + (f", part {part.index + 1}" if part else "")):
                built = build_engine_isolated(backend, part_onnx, part.profile if part else source.profile,
                                              ccs, tmp / plan_name, timing_cache=timing_cache,
                                              workspace_gib=config.workspace_gib,
                                              version_compatible=config.portable,
                                              hardware_compat=config.hardware_compat,
                                              weight_streaming=streams, refit=config.refit)
            if built.timing_cache:
                timing_cache = built.timing_cache
            layers += built.layers
            layer_source = built.layer_source
            built_parts.append((plan_name, part, built))
    shutil.rmtree(tmp / ".parts", ignore_errors=True)
    islands = source.fp32_islands
    summary = summarize_layers(layers, [i["module"] for i in islands])
    check_layer_report(name, choice.precision, summary, source.onnx_path, layer_source)
    if islands and summary["island_gemm"] and summary["island_gemm_fp32"] < summary["island_gemm"]:
        log.warn(f"{name}: {summary['island_gemm'] - summary['island_gemm_fp32']} GEMM(s) of its FP32 islands "
                 "did not run in FP32 in the engine (see layers/)")
    (tmp / "layers" / f"{name}.txt").write_text(format_layers(name, choice.precision, summary, layers, islands))
    files = tuple(PlanFile(plan_name, sha256_file(tmp / plan_name), built.plan_bytes,
                           None if part is None else tuple(part.inputs), None if part is None else tuple(part.outputs),
                           None if part is None else part.profile, None if part is None else part.weight_bytes,
                           built.memory) for plan_name, part, built in built_parts)
    entry = EngineEntry(
        name, files, choice.precision, reason=choice.reason, weights_precision=source.weights_precision,
        inputs_hash=build.inputs_hash, fp32_islands=islands,
        onnx={"path": str(source.onnx_path), "files": source.files, "inputs_hash": source.inputs_hash,
              "calibration_hash": source.calibration_hash},
        profile=source.profile, ranges=source.ranges, io={"inputs": source.inputs, "outputs": source.outputs},
        layers=summary, build_seconds=round(timing["seconds"], 2),
        warnings=[w for _, _, b in built_parts for w in b.warnings][-5:],
        parts_reason=build.parts.reason if len(files) > 1 else None, weight_streaming=streams,
        refit=describe_refit(config.refit, sum(f.bytes for f in files)))
    return entry, timing_cache


def _ship_assets(source: Path, dest: Path, *, t5: bool) -> dict[str, dict[str, Any]]:
    """The work dir's pipeline assets (tokenizers and configs, written by export) into the bundle, without T5's
    tokenizer in a CLIP-only bundle; their file entries for the manifest. A work dir from before assets existed
    gives none (the deploy host then needs --model)."""
    if not (source / ASSETS_FILE).is_file():
        log.warn(f"{source} has no pipeline assets (exported by an older sd35trt): the bundle needs --model to run")
        return {}
    assets = PipelineAssets.load(source)
    (assets if t5 else assets.without_t5()).save(dest)
    return file_entries(dest)


def _keep_others(folder: Path, tmp: Path, previous: BundleManifest | None, plan: dict[str, Any], model: dict[str, Any],
                 backend: TrtBackend, ccs: tuple[tuple[int, int], ...]) -> dict[str, EngineEntry]:
    """A build of some components (``--components``) into a bundle folder keeps that bundle's other engines, copied
    into ``tmp``, when they were built from the same model with the same backend version for the same compute
    capabilities and their files are intact; an engine that cannot be kept is named, never dropped silently."""
    if previous is None:
        return {}
    same = (previous.model.get("fingerprint") == model.get("fingerprint") and previous.backend_version == backend.version
            and list(previous.compute_capabilities) == [f"{a}.{b}" for a, b in ccs])
    kept = {}
    for name, entry in previous.components.items():
        if name in plan:
            continue
        if not same or not _plans_intact(folder, entry):
            log.warn(f"  {name}: in the previous bundle, not asked for, and not kept ("
                     + ("another model, backend version or GPU target" if not same else "its plan file is damaged")
                     + "): build it again to have it")
            continue
        _copy_engine(folder, tmp, entry)
        kept[name] = entry
        log.info(f"  {name}: not asked for, kept from the previous bundle")
    return kept


def _read_previous(folder: Path) -> BundleManifest | None:
    try:
        return BundleManifest.load(folder) if (folder / BUNDLE_MANIFEST).is_file() else None
    except ArtifactError:
        return None


def _file_ok(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _pieces(name: str, source: OnnxManifest, weights: int, choice: PartsChoice, config: BuildConfig,
            available: int | None, folder: Path) -> list[tuple[Path, PartPlan | None]]:
    """What the builder builds for one component: its ONNX whole, or cut into ``choice.count`` parts (one more
    at a time, up to MAX_PARTS, while the largest part's builder would not fit ``--max-build-memory``). The
    host memory check runs on the largest part."""
    if choice.count == 1:
        pieces: list[tuple[Path, PartPlan | None]] = [(source.onnx_path, None)]
        largest = weights
    else:
        from sd35trt.producers.parts import write_parts

        count = choice.count
        while True:
            shutil.rmtree(folder, ignore_errors=True)
            cut = write_parts(source.onnx_path, count, source.profile, folder)
            largest = max(p.weight_bytes for _, p in cut)
            over = config.max_build_memory_gib is not None and \
                builder_need(largest, PEAK_RSS_FACTOR) > config.max_build_memory_gib * 2**30
            if not over or count >= MAX_PARTS or (name, count) in config.parts:
                break
            count += 1
        pieces = [(path, part) for path, part in cut]
        log.info(f"  {name}: cut into {count} parts of {', '.join(f'{p.weight_bytes / 2**30:.2f}' for _, p in cut)} "
                 "GiB of weights")
    if config.memory_check:
        check_memory(largest, f"the {name} engine" + (f" (largest of {len(pieces)} parts)" if len(pieces) > 1 else ""),
                     available)
    return pieces


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
    fp8, int4, fp4 = ("gemm_fp8", "FP8 GEMM"), ("int4_weights", "INT4 weight"), ("fp4_weights", "FP4 weight")
    wanted = {Precision.FP8: [fp8], Precision.INT4: [int4], Precision.NVFP4: [fp4], Precision.MIXED: [fp8, int4],
              Precision.INT8: [("int8_weights", "INT8 weight")]}
    for key, what in wanted.get(precision, []):
        if summary.get(key, 0) == 0:
            raise BuildError(f"{name}: {precision.value} requested but the engine has no {what}", path=onnx_path,
                             hint="the Q/DQ placement was not fused; report this with layers/ and the ONNX manifest")


def format_layers(name: str, precision: Precision, summary: dict[str, int], layers: list[dict[str, Any]],
                  islands: list[dict[str, Any]] | None = None) -> str:
    lines = [f"# {name}: built as {precision.value}",
             f"# GEMM layers: {summary['gemm']} total, {summary['gemm_fp8']} FP8, {summary['gemm_fp16']} FP16, "
             f"{summary['gemm_other']} other; {summary['layers']} layers in all"
             + (f"; 4-bit weight tensors: {summary.get('int4_weights', 0)} INT4, {summary.get('fp4_weights', 0)} FP4"
                if summary.get("int4_weights") or summary.get("fp4_weights") else "")
             + (f"; INT8 weight tensors: {summary['int8_weights']}" if summary.get("int8_weights") else "")]
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
