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
def tiny_pipe(tiny_source):
    """The tiny preset's diffusers pipeline (random weights, FP32, CPU), shared by the loop tests, which only
    read it (its text encoders switch to eager attention on first use, as every torch runner does)."""
    from sd35trt.core.models import build_pipeline

    pipe = build_pipeline(tiny_source)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


# `make test-fast`: the tests that build no model pipeline, export no ONNX and start no worker process (pure
# functions, parsers, plans, CLI refusals), marked here from the fixtures they use and the modules they live in.
HEAVY_FIXTURES = {"chain", "exported", "calibrated", "work_copy", "outlier_chain", "boundary_chain", "turbo_work",
                  "lora_work", "adapter", "tiny_pipe", "lora_model", "plain"}
SLOW_MODULES = {"test_shards", "test_interrupts", "test_journeys"}
SLOW_TESTS = {"test_runtime_imports_on_a_host_without_the_build_stack", "test_tiny_preset_is_deterministic_and_uses_diffusers_classes",
              "test_fp16_last_resort_is_whole_fp32_with_why", "test_lora_changes_the_model_and_is_part_of_its_identity",
              "test_tiled_decode_blends_overlapping_tiles_close_to_the_whole_decode",
              "test_a_2048_image_from_a_vae_profile_capped_at_1024", "test_bad_adapters_are_one_line_naming_the_file",
              "test_calibration_size_per_model_and_the_makefile_leaves_it_to_calibrate", "test_peers_in_one_run_with_ratios_table_json_and_csv"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        name = item.originalname if hasattr(item, "originalname") else item.name
        if module in SLOW_MODULES or name in SLOW_TESTS or HEAVY_FIXTURES & set(item.fixturenames) or \
                item.get_closest_marker("gpu"):
            continue
        item.add_marker(pytest.mark.fast)
