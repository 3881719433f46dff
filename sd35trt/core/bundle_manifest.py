"""The engine bundle's manifest (``engines/<model>/<target>-<backend>/manifest.json``): what a deploy host reads —
each engine's plan files, precision and why, profile, islands, layer counts and parts — validated field by field
when loaded, so a hand-edited or truncated manifest is one line naming the field. The work dir's artifacts are in
``core.manifests``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sd35trt.core.artifacts import inside, read_json, verify_files
from sd35trt.core.errors import ArtifactError
from sd35trt.core.manifests import WorkDir
from sd35trt.core.specs import ARTIFACT_PRECISIONS, SPECS, Precision

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

    @property
    def data(self) -> dict[str, Any]:
        return self.to_dict()

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
    values = _field(data, key, list, path, where)
    for value in values:
        _need(value, f"{where}.{key}[]", str, path)
    return values


def _count(value: int, where: str, path: Path) -> int:
    if value < 0:
        raise ArtifactError(f"bundle manifest {where} is negative", path=path, hint="rebuild the bundle")
    return value


def _sha256(value: str, where: str, path: Path) -> str:
    import re

    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ArtifactError(f"bundle manifest {where}.sha256 is not a sha256 digest", path=path, hint="rebuild the bundle")
    return value


BUNDLE_ASSETS = "assets"  # the loop's tokenizers and configs (core.assets.PipelineAssets), shipped in every bundle


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
