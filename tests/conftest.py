"""Shared fixtures: one tiny export + calibration per session (the expensive part), reused by every test."""

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
    from sd35trt.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_source):
    """FP32 export of all five tiny components (validated)."""
    from sd35trt.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("work")
    results = export_model(tiny_source, out, ExportConfig(), device="cpu")
    return out, results


@pytest.fixture(scope="session")
def calibrated(exported, tiny_source):
    """FP8 + FP16 ONNX from a real (small) calibration on top of the FP32 export."""
    from sd35trt.calibrate import CalibrationConfig, calibrate_model

    out, _ = exported
    result = calibrate_model(tiny_source, out, CalibrationConfig(**CALIB), device="cpu")
    return out, result


@pytest.fixture()
def work_copy(calibrated, tmp_path):
    """A private copy of the calibrated work dir for tests that modify or break files."""
    out, _ = calibrated
    dest = tmp_path / "work"
    shutil.copytree(out, dest)
    return dest
