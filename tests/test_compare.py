import json

from sd35trt.compare import CompareConfig, onnx_variants, run_compare
from tests.conftest import needs_rtx


def test_compare_per_component_and_end_to_end(calibrated, tiny_source, tmp_path):
    """The issue's bar: FP32 ONNX loop vs diffusers ≥ 60 dB; FP16 and FP8 reported and within their bars."""
    out, _ = calibrated
    cfg = CompareConfig(prompts=1, steps=3, components=("transformer", "clip_l", "vae_decoder"))
    runners, ranges, missing = onnx_variants(out, cfg.variants)
    assert missing == {}
    report = run_compare(tiny_source, tmp_path, cfg, ["a koi pond in autumn, watercolor"], runners, ranges, str(out))
    assert report, report.failures
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["end_to_end"]["fp32"]["min_image_psnr_db"] >= 60
    assert data["end_to_end"]["fp8"]["transformer_precision"] == "fp8"
    assert data["end_to_end"]["fp16"]["min_image_psnr_db"] > data["end_to_end"]["fp8"]["min_image_psnr_db"] - 30
    transformer = data["components"]["transformer"]
    assert set(transformer) == {"fp32", "fp16", "fp8"}
    assert transformer["fp8"]["outputs"]["noise_pred"]["rel_l2_max"] <= 0.05
    assert transformer["fp32"]["polygraphy_mean_error_passed"]
    assert data["executed_with"] == ["onnxruntime"]
    assert data["components"]["clip_l"]["fp8"]["precision"] == "fp16"  # not calibrated: FP16, as engines do
    from PIL import Image

    grid = Image.open(tmp_path / "compare.png")
    assert grid.size == (256 * 7, 276), "reference, then each variant with its amplified difference"


def test_compare_fails_loudly_when_a_tolerance_breaks(calibrated, tiny_source, tmp_path, monkeypatch):
    import sd35trt.compare as compare_mod
    from sd35trt.specs import Precision

    monkeypatch.setitem(compare_mod.E2E_MIN_PSNR_DB, Precision.FP16, 1000.0)
    out, _ = calibrated
    cfg = CompareConfig(variants=("fp16",), prompts=1, steps=2, components=("clip_g",))
    runners, ranges, _ = onnx_variants(out, cfg.variants)
    report = run_compare(tiny_source, tmp_path, cfg, ["a cat"], runners, ranges, str(out))
    assert not report and "end-to-end fp16" in report.failures[0]


def test_compare_compares_what_exists_and_lists_what_is_missing(capsys, calibrated, tmp_path):
    """Right after an FP16-only export there is no FP32/FP8: compare runs FP16 and says what it skipped;
    stdout carries the table only (polygraphy's log goes to stderr)."""
    import shutil

    from sd35trt.cli.main import main

    out, _ = calibrated
    work = tmp_path / "work"
    shutil.copytree(out / "onnx-fp16", work / "onnx-fp16")
    code = main(["compare", "--onnx", str(work), "--out", str(tmp_path / "cmp"), "--prompts", "1", "--steps", "2",
                 "--components", "clip_l"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "not compared fp32: no fp32 ONNX for transformer" in captured.out
    assert "not compared fp8: no fp8 ONNX for any component" in captured.out
    assert "[I]" not in captured.out and "polygraphy" not in captured.out.lower()
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(data["missing"]) == {"fp32", "fp8"} and set(data["end_to_end"]) == {"fp16"}


@needs_rtx
def test_polygraphy_trt_runner_loads_tensorrt_rtx_for_rtx_bundles(tmp_path):
    """compare --bundle's second engine runner is polygraphy's own TrtRunner. What can run here: it is built for
    a TensorRT-RTX plan, polygraphy resolves its TensorRT module to the installed TensorRT-RTX bindings, and the
    dtype mapping it relies on exists. Executing it needs a GPU TensorRT-RTX supports (none here)."""
    import numpy as np
    from polygraphy.backend.base import BaseRunner
    from polygraphy.datatype import DataType
    from polygraphy.mod.trt_importer import lazy_import_trt

    from sd35trt.compare import polygraphy_trt_runner

    runner = polygraphy_trt_runner(tmp_path / "clip_l.plan", "tensorrt-rtx", "engine-polygraphy:clip_l")
    assert isinstance(runner, BaseRunner) and runner.name == "engine-polygraphy:clip_l"
    import tensorrt_rtx_bindings

    assert lazy_import_trt().__version__ == tensorrt_rtx_bindings.__version__
    assert DataType.FLOAT16.numpy() == np.float16 and DataType.INT64.numpy() == np.int64
