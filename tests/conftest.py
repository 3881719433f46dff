"""Shared fixtures: one tiny calibration + export per session (the expensive part), reused by every test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
# Calibration settings for tests: real pipeline, small image, few prompts/steps (seconds on 2 CPU cores).
CALIB = dict(num_prompts=4, steps=2, height=256, width=256, batch=2, holdout=2)


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
def shared(tmp_path_factory, worker_id):
    """A folder for one session fixture's artifacts that every pytest-xdist worker of this run shares: the first to
    ask builds them while holding its lock, the others wait, then find them (sd35trt's steps skip when their inputs
    are unchanged). Without xdist, a fresh temp folder."""
    from contextlib import contextmanager

    from sd35trt.core.artifacts import exclusive

    root = tmp_path_factory.getbasetemp().parent if worker_id != "master" else tmp_path_factory.getbasetemp()

    @contextmanager
    def folder(name: str):
        with exclusive(root / name, f"the test session's {name}"):
            yield root / name

    return folder


@pytest.fixture(scope="session")
def chain(shared, tiny_source):
    """`make engines`' chain on the tiny model: calibrate (small), then export every variant (FP32 too)."""
    from sd35trt.producers.calibrate import CalibrationConfig, calibrate_model
    from sd35trt.producers.export import ExportConfig, export_model

    with shared("work") as out:
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


@pytest.fixture(scope="session")
def adapter(shared) -> Path:
    """A LoRA adapter file for the tiny transformer (PEFT, saved with diffusers' save_lora_weights)."""
    from tests.test_lora import make_adapter

    with shared("lora") as folder:
        found = folder / "pytorch_lora_weights.safetensors"
        return found if found.is_file() else make_adapter(folder)


@pytest.fixture(scope="session")
def user_model(shared) -> Path:
    """A user's model directory: the tiny preset saved with save_pretrained (`mine`), loaded by from_pretrained."""
    from tests.outliers import save_model

    with shared("user") as folder:
        return folder / "mine" if (folder / "mine" / "model_index.json").is_file() else save_model(folder / "mine")


@pytest.fixture(scope="session")
def user_work(user_model, adapter, shared):
    """What users run: `make engines MODEL=<their directory> LORA=style.safetensors:0.8` (the journey that crashed
    in export). Returns (root with work/ and engines/, make's finished process: every step ran or, for a second
    test worker, found its artifacts current and skipped)."""
    from tests.test_journeys import make_engines

    with shared("user-work") as root:
        return root, make_engines(user_model, root, f"LORA={adapter}:0.8")


@pytest.fixture()
def work_copy(calibrated, tmp_path):
    """A private copy of the calibrated work dir for tests that modify or break files."""
    out, _ = calibrated
    dest = tmp_path / "work"
    shutil.copytree(out, dest)
    return dest


# `make test-fast`: the tests that build no model pipeline, export no ONNX and start no worker process (pure
# functions, parsers, plans, CLI refusals), marked here from the fixtures they use and the modules they live in.
HEAVY_FIXTURES = {"chain", "exported", "calibrated", "work_copy", "boundary_chain", "turbo_work", "adapter", "tiny_pipe",
                  "user_model", "user_work", "shared", "mixed"}
SLOW_MODULES = {"test_shards", "test_interrupts", "test_journeys"}
SLOW_TESTS = {"test_runtime_imports_on_a_host_without_the_build_stack", "test_tiny_preset_is_deterministic_and_uses_diffusers_classes",
              "test_fp16_last_resort_is_whole_fp32_with_why", "test_lora_changes_the_model_and_is_part_of_its_identity",
              "test_tiled_decode_blends_overlapping_tiles_close_to_the_whole_decode",
              "test_a_1536_image_from_a_vae_profile_capped_at_768", "test_bad_adapters_are_one_line_naming_the_file",
              "test_calibration_size_per_model_and_the_makefile_leaves_it_to_calibrate", "test_peers_in_one_run_with_ratios_table_json_and_csv"}


# The modules that cost most (worker seconds, measured with --durations=0 on the 2-core box), run first so the two
# workers of `make test` finish together (longest first; the Makefile keeps this order: --no-loadscope-reorder), and
# so the first two do not wait on one shared fixture: test_four_bit builds its own, test_journeys the user's work dir
# that test_lora reads later, test_shards the tiny chain.
HEAVY_FIRST = ("test_four_bit", "test_journeys", "test_shards", "test_deploy_plans", "test_mixed", "test_lora", "test_batch",
               "test_hostile", "test_interrupts", "test_bad_inputs", "test_parts")


def _module(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1]


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: HEAVY_FIRST.index(_module(item)) if _module(item) in HEAVY_FIRST else len(HEAVY_FIRST))
    for item in items:  # (the sort is stable: the tests of a module keep their order)
        module = _module(item)
        name = item.originalname if hasattr(item, "originalname") else item.name
        if module in SLOW_MODULES or name in SLOW_TESTS or HEAVY_FIXTURES & set(item.fixturenames) or \
                item.get_closest_marker("gpu"):
            continue
        item.add_marker(pytest.mark.fast)
