"""``W/calibration/manifest.json``: what ``sd35trt calibrate`` decided (the calibrated components and format, FP32
islands, each component's FP16 decision, the files holding the scales), for export and build to start from. A
producer's record: deploy hosts never read it (they read ``core.manifests``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35trt.core.artifacts import read_json, verify_files
from sd35trt.core.errors import ArtifactError
from sd35trt.core.manifests import MANIFEST, WorkDir
from sd35trt.core.numerics import Island
from sd35trt.core.specs import Precision

CALIBRATION_LAYOUT = 2  # bump when the calibration folder's files change meaning


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
