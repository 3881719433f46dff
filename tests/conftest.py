"""Shared fixtures: one tiny calibration + export per session (the expensive part), reused by every test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
# Calibration settings for tests: real pipeline, small image, few prompts/steps (seconds on 2 CPU cores).
CALIB = dict(num_prompts=4, steps=2, height=512, width=512, batch=2, holdout=2)


def rtx_available() -> bool:
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError:
        return False
    return True


needs_rtx = pytest.mark.skipif(not rtx_available(), reason="TensorRT-RTX (tensorrt-rtx-cu13-*) is not installed")


@pytest.fixture(scope="session")
def tiny_source():
    from sd35trt.core.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def chain(tmp_path_factory, tiny_source):
    """`make engines`' chain on the tiny model: calibrate (small), then export every variant (FP32 too)."""
    from sd35trt.producers.calibrate import CalibrationConfig, calibrate_model
    from sd35trt.producers.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("work")
    calibration = calibrate_model(tiny_source, out, CalibrationConfig(**CALIB), device="cpu")
    exports = export_model(tiny_source, out, ExportConfig(), device="cpu", precision="fp32,fp16,fp8")
    return out, calibration, exports


@pytest.fixture(scope="session")
def exported(chain):
    """The work dir and its FP32 export results (all five components, validated)."""
    out, _, exports = chain
    return out, [r for r in exports if r.precision == "fp32"]


@pytest.fixture(scope="session")
def calibrated(chain):
    """The work dir (calibration state + FP32/FP16/FP8 ONNX) and the calibration result."""
    out, calibration, _ = chain
    return out, calibration


@pytest.fixture()
def work_copy(calibrated, tmp_path):
    """A private copy of the calibrated work dir for tests that modify or break files."""
    out, _ = calibrated
    dest = tmp_path / "work"
    shutil.copytree(out, dest)
    return dest
