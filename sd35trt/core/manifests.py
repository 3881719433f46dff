"""The work-dir layout, the ONNX and bundle manifests runners read, typed: consumers never read raw keys.

``W/calibration/`` is written by ``calibrate`` alone (its record: ``producers.calibration_state``) and
``W/onnx*/<component>/`` by ``export`` alone, each with a ``manifest.json`` holding the hash of its inputs;
``load_current`` is the one "is this artifact still current?" check."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sd35trt.core.artifacts import inside, read_json, verify_files
from sd35trt.core.errors import ArtifactError
from sd35trt.core.shapes import ShapeRanges
from sd35trt.core.specs import ARTIFACT_PRECISIONS, SPECS, Precision
from sd35trt.core.trt_api import MODULES

MANIFEST = "manifest.json"
VARIANT_DIRS = {Precision.FP32: "onnx", Precision.FP16: "onnx-fp16", Precision.FP8: "onnx-fp8",
                Precision.INT4: "onnx-int4", Precision.NVFP4: "onnx-nvfp4", Precision.MIXED: "onnx-mixed",
                Precision.INT8: "onnx-int8"}


@dataclass(frozen=True)
class WorkDir:
    """``--out`` of calibrate/export, ``--onnx`` of build/compare/generate."""

    root: Path

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    def variant(self, precision: Precision) -> Path:
        return self.root / VARIANT_DIRS[precision]

    def onnx_folder(self, precision: Precision, component: str) -> Path:
        return self.variant(precision) / component

    def onnx_path(self, precision: Precision, component: str) -> Path:
        return self.onnx_folder(precision, component) / "model.onnx"

    @property
    def assets(self) -> Path:
        """The loop's tokenizers and configs (``core.assets.PipelineAssets``), written by export."""
        return self.root / "assets"

    def clip_only(self) -> bool:
        """Exported from a model without T5-XXL (a CLIP-only download): no T5 ONNX, and assets without its
        tokenizer. Build and the runners then leave T5 out without being told."""
        import json

        if any((self.onnx_folder(p, "t5") / MANIFEST).is_file() for p in VARIANT_DIRS):
            return False
        try:
            tokenizers = json.loads((self.assets / "assets.json").read_text()).get("tokenizers", [])
        except (OSError, ValueError, AttributeError):
            return False
        return isinstance(tokenizers, list) and "t5" not in tokenizers and "clip_l" in tokenizers

    @staticmethod
    def of_onnx(onnx_path: Path) -> WorkDir:
        """The work dir an ``onnx*/<component>/model.onnx`` lives in."""
        return WorkDir(onnx_path.parents[2])


def load_current(folder: Path, inputs_hash: str, what: str) -> dict[str, Any] | None:
    """The manifest of a finished artifact whose inputs hash matches and whose files are all there with
    their recorded sizes (a cheap check; consumers that build from the bytes run ``verify_files``)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path, what)
    except ArtifactError:
        return None
    if manifest.get("inputs_hash") != inputs_hash:
        return None
    files = manifest.get("files", {})
    try:
        if not isinstance(files, dict) or any(not inside(folder, rel, path).is_file() or not isinstance(e, dict) or
                                              inside(folder, rel, path).stat().st_size != e.get("bytes")
                                              for rel, e in files.items()):
            return None
    except ArtifactError:
        return None  # a manifest naming files outside its folder is not current: the step runs again
    return manifest


def require_model(described: dict[str, Any], fingerprint: str, model_id: str, where: Path) -> None:
    """Refuse artifacts built from another model than ``--model`` names."""
    if described.get("fingerprint") != fingerprint:
        raise ArtifactError(f"artifacts were built from model '{described.get('id')}', not '{model_id}' "
                            "(fingerprints differ)", path=where, hint=f"pass --model {described.get('id')}")


@dataclass(frozen=True)
class OnnxManifest:
    """``W/onnx*/<component>/manifest.json``: one exported ONNX variant, as build and the runners read it."""

    folder: Path
    component: str
    precision: Precision
    model: dict[str, Any]
    inputs_hash: str
    files: dict[str, dict[str, Any]]
    profile: dict[str, list[list[int]]]
    ranges: dict[str, str] | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    weights_precision: str
    fp32_islands: list[dict[str, Any]]
    calibration_hash: str | None
    data: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)  # everything else, as written

    @property
    def onnx_path(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def shape_ranges(self) -> ShapeRanges | None:
        """The ranges it was exported for (None in manifests from before ranges were recorded)."""
        return ShapeRanges.from_dict(self.ranges) if self.ranges else None

    def to_dict(self) -> dict[str, Any]:
        return {**self.data, "component": self.component, "precision": self.precision.value, "model": self.model,
                "inputs_hash": self.inputs_hash, "files": self.files, "profile": self.profile, "ranges": self.ranges,
                "inputs": self.inputs, "outputs": self.outputs, "weights_precision": self.weights_precision,
                "fp32_islands": self.fp32_islands, "calibration_hash": self.calibration_hash}

    @classmethod
    def from_dict(cls, data: dict[str, Any], folder: Path) -> OnnxManifest:
        try:
            return cls(folder=folder, component=data["component"], precision=Precision(data["precision"]),
                       model=data["model"], inputs_hash=data["inputs_hash"], files=data["files"],
                       profile=data["profile"], ranges=data.get("ranges"), inputs=data["inputs"],
                       outputs=data["outputs"], weights_precision=data.get("weights_precision", data["precision"]),
                       fp32_islands=data.get("fp32_islands", []), calibration_hash=data.get("calibration_hash"),
                       data=data)
        except (KeyError, ValueError) as exc:
            raise ArtifactError(f"ONNX manifest is malformed or of an older layout ({exc.__class__.__name__}: {exc})",
                                path=folder / MANIFEST, hint="re-run `sd35trt export --force` with this --out") from None

    @classmethod
    def load(cls, folder: Path, component: str, precision: Precision) -> OnnxManifest:
        manifest = cls.from_dict(read_json(folder / MANIFEST, f"{precision.value} ONNX manifest of {component}"), folder)
        if manifest.component != component or manifest.precision is not precision:
            raise ArtifactError(f"manifest describes {manifest.component}/{manifest.precision.value}, "
                                f"expected {component}/{precision.value}", path=folder / MANIFEST,
                                hint="the folder was moved or edited; re-run export")
        return manifest

    def verify(self) -> None:
        verify_files(self.folder, self.files, self.folder / MANIFEST)


BUNDLE_MANIFEST = "manifest.json"
# How a bundle's engines hold activation memory (the manifest's runtime.activation_memory; doctor and the VRAM plan
# read it): TensorRT's static allocation, the largest size over the profile, one block shared by the engines.
STATIC_ACTIVATIONS = ("static: each engine's context needs device_memory_size_v2, its profile's largest shapes; "
                      "the bundle's engines share one block that size")


@dataclass(frozen=True)
class PlanFile:
    """One plan file of an engine: the whole component, or one of its parts (``sd35trt.producers.parts``), with the
    tensors it takes and gives (None: the component spec's own inputs and outputs)."""

    file: str
    sha256: str
    bytes: int
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    profile: dict[str, list[list[int]]] | None = None  # a part's own optimisation profile
    weight_bytes: int | None = None  # a part's share of the component's weights
    builder_memory: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}
        if self.inputs is not None:
            data |= {"inputs": list(self.inputs), "outputs": list(self.outputs or ()), "weight_bytes": self.weight_bytes,
                     "profile": self.profile}
        return data | {"builder_memory": self.builder_memory}


@dataclass(frozen=True)
class EngineEntry:
    """One engine of a bundle: its plan file(s), precision and what built it. A component built in parts has one
    plan per part, run back to back (``runtime.runners.ChainRunner``)."""

    name: str
    plans: tuple[PlanFile, ...]
    precision: Precision
    reason: str = ""
    weights_precision: str = ""
    inputs_hash: str = ""
    fp32_islands: list[dict[str, Any]] = field(default_factory=list)
    onnx: dict[str, Any] = field(default_factory=dict)  # path, files, inputs_hash, calibration_hash of the source
    profile: dict[str, list[list[int]]] | None = None
    ranges: dict[str, Any] | None = None
    io: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list, compare=False)
    parts_reason: str | None = None
    weight_streaming: bool = False  # built with BuilderFlag.WEIGHT_STREAMING (build --weight-streaming)
    refit: dict[str, Any] | None = None  # refittable / weight-stripped plans (build --refittable)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.plans)

    @property
    def parted(self) -> bool:
        return len(self.plans) > 1 or self.plans[0].inputs is not None

    @property
    def builder_memory(self) -> dict[str, Any]:
        """The builder's memory where it peaked (the largest part's)."""
        return max((p.builder_memory for p in self.plans), key=lambda m: m.get("peak_rss_gib", 0), default={})

    @property
    def work_dir(self) -> WorkDir | None:
        path = self.onnx.get("path")
        return WorkDir.of_onnx(Path(path)) if path else None

    def to_dict(self) -> dict[str, Any]:
        where = ({"file": self.plans[0].file, "sha256": self.plans[0].sha256} if not self.parted else
                 {"parts": [p.to_dict() for p in self.plans], "parts_reason": self.parts_reason})
        return {**self.extra, **where, "bytes": self.bytes, "precision": self.precision.value,
                "weights_precision": self.weights_precision, "reason": self.reason, "inputs_hash": self.inputs_hash,
                "fp32_islands": self.fp32_islands, "onnx": self.onnx, "profile": self.profile, "ranges": self.ranges,
                "io": self.io, "layers": self.layers, "build_seconds": self.build_seconds, "warnings": self.warnings,
                "builder_memory": self.builder_memory, "weight_streaming": self.weight_streaming,
                **({"refit": self.refit} if self.refit is not None else {})}

    @classmethod
    def from_dict(cls, name: str, entry: dict[str, Any], path: Path) -> EngineEntry:
        """One ``components`` entry, every field checked for its type (a wrong one is one line naming it)."""
        where = f"components.{name}"
        _need(entry, where, dict, path)
        parted = "parts" in entry
        plans = _need(entry["parts"], f"{where}.parts", list, path) if parted else [entry]
        if not plans:
            raise ArtifactError(f"bundle manifest {where}.parts is empty", path=path, hint="rebuild the bundle")
        files = []
        for index, plan in enumerate(plans):
            at = f"{where}.parts[{index}]" if parted else where
            _need(plan, at, dict, path)
            files.append(PlanFile(
                file=_field(plan, "file", str, path, at), sha256=_sha256(_field(plan, "sha256", str, path, at), at, path),
                bytes=_count(_field(plan, "bytes", int, path, at), f"{at}.bytes", path),
                inputs=tuple(_strings(plan, "inputs", path, at)) if parted else None,
                outputs=tuple(_strings(plan, "outputs", path, at)) if parted else None,
                profile=_field(plan, "profile", dict, path, at, None) if parted else None,
                weight_bytes=_field(plan, "weight_bytes", int, path, at, None) if parted else None,
                builder_memory=_field(plan, "builder_memory", dict, path, at, {}) or
                (_field(entry, "builder_memory", dict, path, where, {}) if not parted else {})))
        precision = _field(entry, "precision", str, path, where)
        if precision not in {p.value for p in ARTIFACT_PRECISIONS}:
            raise ArtifactError(f"bundle manifest {where}.precision {precision!r} is not one of "
                                f"{', '.join(p.value for p in ARTIFACT_PRECISIONS)}", path=path,
                                hint="rebuild the bundle")
        known = {f.name for f in fields(cls)} | {"file", "sha256", "bytes", "parts", "builder_memory"}
        return cls(
            name=name, plans=tuple(files), precision=Precision(precision), reason=_field(entry, "reason", str, path, where, ""),
            weights_precision=_field(entry, "weights_precision", str, path, where, ""),
            inputs_hash=_field(entry, "inputs_hash", str, path, where, ""),
            fp32_islands=_field(entry, "fp32_islands", list, path, where, []),
            onnx=_field(entry, "onnx", dict, path, where, {}), profile=_field(entry, "profile", dict, path, where, None),
            ranges=_field(entry, "ranges", dict, path, where, None), io=_field(entry, "io", dict, path, where, {}),
            layers=_field(entry, "layers", dict, path, where, {}),
            build_seconds=float(_field(entry, "build_seconds", (int, float), path, where, 0.0)),
            warnings=_field(entry, "warnings", list, path, where, []),
            parts_reason=_field(entry, "parts_reason", str, path, where, None),
            weight_streaming=_field(entry, "weight_streaming", bool, path, where, False),
            refit=_field(entry, "refit", dict, path, where, None),
            extra={k: v for k, v in entry.items() if k not in known})


_MISSING = object()


def _need(value: Any, where: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ArtifactError(f"bundle manifest {where} is {type(value).__name__}, expected {names}", path=path,
                            hint="the manifest was edited or damaged: rebuild the bundle")
    return value


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, where: str = "",
           default: Any = _MISSING) -> Any:
    """``data[key]`` checked to be a ``kind`` (``default`` where absent or null; required without one)."""
    at = f"{where}.{key}" if where else key
    if key not in data or data[key] is None:
        if default is _MISSING:
            raise ArtifactError(f"bundle manifest lacks '{at}'", path=path, hint="rebuild the bundle")
        return default
    return _need(data[key], at, kind, path)


def _strings(data: dict[str, Any], key: str, path: Path, where: str) -> list[str]:
    return [_need(value, f"{where}.{key}[]", str, path) for value in _field(data, key, list, path, where)]


def _count(value: int, where: str, path: Path) -> int:
    if value < 0:
        raise ArtifactError(f"bundle manifest {where} is negative", path=path, hint="rebuild the bundle")
    return value


def _sha256(value: str, where: str, path: Path) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ArtifactError(f"bundle manifest {where}.sha256 is not a sha256 digest", path=path, hint="rebuild the bundle")
    return value


BUNDLE_ASSETS = "assets"  # the loop's tokenizers and configs (core.assets.PipelineAssets), shipped in every bundle


# Python modules of the runtimes a bundle may name, by backend.
RUNTIME_MODULES = {"tensorrt": (MODULES["tensorrt"], "tensorrt_lean"), "tensorrt-rtx": (MODULES["tensorrt-rtx"],)}


@dataclass(frozen=True)
class RuntimeRecord:
    """The manifest's ``runtime``: which runtime (module and version) and which GPUs can run the engines."""

    backend: str
    version: str
    version_compatible: bool
    hardware_compatibility: str
    compute_capabilities: tuple[str, ...]

    @property
    def modules(self) -> tuple[str, ...]:
        """Runtime modules that can deserialize the plans: the lean runtime only for version-compatible plans."""
        if self.backend == "tensorrt":
            return ("tensorrt", "tensorrt_lean") if self.version_compatible else ("tensorrt",)
        return RUNTIME_MODULES[self.backend]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "version": self.version, "version_compatible": self.version_compatible,
                "lean_runtime_in_plan": False if self.version_compatible else None,
                "hardware_compatibility": self.hardware_compatibility,
                "compute_capabilities": list(self.compute_capabilities),
                "runs_on": [f"{m} {self.version}" for m in self.modules],
                "gpus": ("compute capability 8.0 or newer" if self.hardware_compatibility == "ampere+"
                         else f"compute capability {' or '.join(self.compute_capabilities)}")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeRecord:
        return cls(str(data["backend"]), str(data["version"]), bool(data.get("version_compatible", False)),
                   str(data.get("hardware_compatibility", "none")), tuple(data.get("compute_capabilities", ())))

    @classmethod
    def recorded(cls, runtime: dict[str, Any], backend: str, version: str, ccs: list[str]) -> RuntimeRecord:
        """``runtime`` as recorded, or for an empty one (bundles from before it existed) plain engines of ``backend``."""
        return cls.from_dict(runtime) if runtime else cls(backend, version, False, "none", tuple(ccs))


@dataclass(frozen=True)
class BundleManifest:
    """``engines/<model>/<target>-<backend>/manifest.json``: what a deploy host needs to know about a bundle."""

    folder: Path
    target: str
    compute_capabilities: list[str]
    backend: str
    backend_version: str
    model: dict[str, Any]
    inputs_hash: str
    components: dict[str, EngineEntry]
    runtime: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    assets: dict[str, dict[str, Any]] = field(default_factory=dict)  # assets/ files: sha256 and bytes
    toolkit: str = ""
    timing_cache: str = ""
    build_seconds: float = 0.0
    host: str = ""
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    MANIFEST_VERSION = 2
    READS = (1, 2)  # version 1 (before the runtime record and assets) reads the same; anything else is refused

    @property
    def has_t5(self) -> bool:
        return "t5" in self.components

    @property
    def turbo(self) -> bool:
        return bool(self.model.get("turbo", False))

    @property
    def data(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def runtime_record(self) -> RuntimeRecord:
        """Which runtime (module, version) and GPUs run the engines; bundles from before ``runtime`` existed were
        plain engines of their backend."""
        return RuntimeRecord.recorded(self.runtime, self.backend, self.backend_version, self.compute_capabilities)

    @property
    def shape_ranges(self) -> ShapeRanges:
        """The shape ranges every engine accepts: the exported ranges recorded per component, which must agree."""
        recorded = [e.ranges for e in self.components.values()]
        first = recorded[0] if recorded else None
        if first is None or any(r != first for r in recorded):
            raise ArtifactError("bundle manifest lacks consistent shape ranges for its engines", path=self.folder / BUNDLE_MANIFEST,
                                hint="rebuild the bundle from one export (sd35trt build --force)")
        return ShapeRanges.from_dict(first)

    def to_dict(self) -> dict[str, Any]:
        runs_on = self.runtime.get("runs_on", [])
        return {**self.extra, "kind": "engine-bundle", "manifest_version": self.MANIFEST_VERSION,
                "toolkit": self.toolkit, "model": self.model, "random_weights": self.model.get("random_weights", False),
                "target": self.target, "compute_capabilities": self.compute_capabilities, "backend": self.backend,
                "backend_version": self.backend_version, "runtime": self.runtime,
                "runtime_requirement": f"{' or '.join(runs_on)} on a GPU with {self.runtime.get('gpus', '')}",
                "t5": self.has_t5, "timing_cache": self.timing_cache, "config": self.config,
                "inputs_hash": self.inputs_hash, "components": {n: e.to_dict() for n, e in self.components.items()},
                "assets": self.assets, "build_seconds": self.build_seconds, "host": self.host, "created": self.created}

    @classmethod
    def from_dict(cls, data: dict[str, Any], folder: Path) -> BundleManifest:
        """The bundle manifest, validated once here: known version, every field of its type, every file it names
        inside ``folder`` (``artifacts.inside``). Whatever is wrong is one line naming the field."""
        path = folder / BUNDLE_MANIFEST
        if data.get("kind") != "engine-bundle":
            raise ArtifactError("not an engine bundle manifest (kind is missing or wrong)", path=path,
                                hint="point at engines/<model>/<target>-<backend>/")
        version = data.get("manifest_version")
        if version not in cls.READS or isinstance(version, bool):
            raise ArtifactError(f"bundle manifest_version {version!r} is not one this sd35trt reads "
                                f"({', '.join(map(str, cls.READS))})", path=path,
                                hint="rebuild the bundle with this sd35trt, or run it with the sd35trt that built it")
        components = _field(data, "components", dict, path)
        if not components:
            raise ArtifactError("bundle manifest lists no components", path=path, hint="rebuild the bundle")
        unknown = [n for n in components if n not in SPECS]
        if unknown:
            raise ArtifactError(f"bundle manifest names unknown component {unknown[0]!r}", path=path,
                                hint=f"a bundle holds {', '.join(SPECS)}: rebuild it")
        entries = {name: EngineEntry.from_dict(name, entry, path) for name, entry in components.items()}
        ccs = _field(data, "compute_capabilities", list, path)
        import re

        if not ccs or not all(isinstance(c, str) and re.fullmatch(r"\d{1,2}\.\d", c) for c in ccs):
            raise ArtifactError("bundle manifest compute_capabilities must be a list like [\"8.9\"]", path=path,
                                hint="the manifest was edited or damaged: rebuild the bundle")
        assets = _field(data, "assets", dict, path, "", {})
        for name, entry in assets.items():
            _need(entry, f"assets.{name}", dict, path)
            _sha256(_field(entry, "sha256", str, path, f"assets.{name}"), f"assets.{name}", path)
            _count(_field(entry, "bytes", int, path, f"assets.{name}"), f"assets.{name}.bytes", path)
        known = {f.name for f in fields(cls)} | {"kind", "manifest_version", "random_weights", "runtime_requirement", "t5"}
        manifest = cls(
            folder=folder, target=_field(data, "target", str, path), compute_capabilities=list(ccs),
            backend=_field(data, "backend", str, path), backend_version=_field(data, "backend_version", str, path),
            model=_field(data, "model", dict, path), inputs_hash=_field(data, "inputs_hash", str, path),
            components=entries, runtime=_field(data, "runtime", dict, path, "", {}),
            config=_field(data, "config", dict, path, "", {}), assets=assets,
            toolkit=_field(data, "toolkit", str, path, "", ""), timing_cache=_field(data, "timing_cache", str, path, "", ""),
            build_seconds=float(_field(data, "build_seconds", (int, float), path, "", 0.0)),
            host=_field(data, "host", str, path, "", ""), created=_field(data, "created", str, path, "", ""),
            extra={k: v for k, v in data.items() if k not in known})
        for plan in manifest.plans():
            inside(folder, plan.file, path)
        for name in assets:
            inside(folder, f"{BUNDLE_ASSETS}/{name}", path)
        return manifest

    @classmethod
    def load(cls, folder: Path) -> BundleManifest:
        return cls.from_dict(read_json(folder / BUNDLE_MANIFEST, "bundle manifest"), folder)

    def verify(self) -> None:
        """Every engine (and the shipped assets) is there with its recorded size and sha256."""
        files = {p.file: {"sha256": p.sha256, "bytes": p.bytes} for p in self.plans()}
        files |= {f"{BUNDLE_ASSETS}/{name}": entry for name, entry in self.assets.items()}
        verify_files(self.folder, files, self.folder / BUNDLE_MANIFEST)

    def plans(self) -> list[PlanFile]:
        return [p for e in self.components.values() for p in e.plans]

    def intact(self) -> bool:
        """The cheap check for skip decisions (sizes only)."""
        return all((self.folder / p.file).is_file() and (self.folder / p.file).stat().st_size == p.bytes
                   for p in self.plans())
