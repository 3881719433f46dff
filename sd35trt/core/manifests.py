"""The work-dir layout and the typed artifacts in it, in one place.

``W/calibration/`` is written by ``calibrate`` alone and ``W/onnx*/<component>/`` by ``export`` alone; each
folder carries a ``manifest.json`` with the hash of its inputs. Consumers read these through the classes
here, never by raw keys, and ``load_current`` is the one "is this artifact still current?" check. The engine
bundle's manifest, what a deploy host reads, is ``core.bundle_manifest``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35trt.core.artifacts import inside, read_json, verify_files
from sd35trt.core.errors import ArtifactError
from sd35trt.core.numerics import Island
from sd35trt.core.specs import Precision

MANIFEST = "manifest.json"
VARIANT_DIRS = {Precision.FP32: "onnx", Precision.FP16: "onnx-fp16", Precision.FP8: "onnx-fp8",
                Precision.INT4: "onnx-int4", Precision.NVFP4: "onnx-nvfp4", Precision.MIXED: "onnx-mixed"}
CALIBRATION_LAYOUT = 2  # bump when the calibration folder's files change meaning


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
class Fp16Decision:
    """How a component's FP16 variant is built: FP16 with its FP32 islands, or whole FP32 (last resort)."""

    precision: Precision  # FP16 or FP32
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"precision": self.precision.value, "reason": self.reason}


@dataclass(frozen=True)
class CalibrationManifest:
    """``W/calibration/manifest.json``: what calibrate decided, for export to build from."""

    inputs_hash: str
    model: dict[str, Any]
    components: tuple[str, ...]  # calibrated to FP8
    islands: dict[str, list[Island]]  # every component, empty lists included
    fp16: dict[str, Fp16Decision]
    files: dict[str, dict[str, Any]]
    reference: str
    margin: float
    format: Precision = Precision.FP8  # the calibrated format: fp8 | int4 | nvfp4 | mixed
    layout: int = CALIBRATION_LAYOUT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "calibration", "layout": self.layout, "inputs_hash": self.inputs_hash, "model": self.model,
                "components": list(self.components), "format": self.format.value, "reference": self.reference,
                "margin": self.margin,
                "fp32_islands": {c: [i.to_dict() for i in v] for c, v in self.islands.items()},
                "fp16": {c: d.to_dict() for c, d in self.fp16.items()}, "files": self.files, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> CalibrationManifest:
        if data.get("kind") != "calibration" or data.get("layout") != CALIBRATION_LAYOUT:
            raise ArtifactError("calibration state is of an older sd35trt layout", path=path,
                                hint="re-run `sd35trt calibrate --force` with this --out")
        try:
            return cls(
                inputs_hash=data["inputs_hash"], model=data["model"], components=tuple(data["components"]),
                islands={c: [Island.from_dict(i) for i in v] for c, v in data["fp32_islands"].items()},
                fp16={c: Fp16Decision(Precision(d["precision"]), d["reason"]) for c, d in data["fp16"].items()},
                files=data["files"], reference=data["reference"], margin=float(data["margin"]),
                format=Precision(data.get("format", "fp8")),
                extra={k: v for k, v in data.items() if k not in {
                    "kind", "layout", "inputs_hash", "model", "components", "reference", "margin", "fp32_islands",
                    "fp16", "files", "format"}})
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"calibration manifest is malformed ({exc.__class__.__name__}: {exc})", path=path,
                                hint="re-run `sd35trt calibrate --force` with this --out") from None


def load_calibration(work: WorkDir, *, verify: bool = True) -> CalibrationManifest | None:
    """The calibration state of a work dir, or None when there is none; files checked against the manifest."""
    path = work.calibration / MANIFEST
    if not path.is_file():
        return None
    manifest = CalibrationManifest.from_dict(read_json(path, "calibration manifest"), path)
    if verify:
        verify_files(work.calibration, manifest.files, path)
    return manifest


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
