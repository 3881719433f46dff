"""The typed artifact layer: manifests round-trip, the one freshness check, older layouts refused in one line."""

from __future__ import annotations

import json

from sd35trt.manifests import CalibrationManifest, OnnxManifest, WorkDir, load_calibration, load_current
from sd35trt.specs import Precision
from tests.test_bad_inputs import assert_user_error, run_cli


def test_calibration_and_onnx_manifests_round_trip(calibrated):
    out, result = calibrated
    work = WorkDir(out)
    manifest = load_calibration(work)
    assert manifest is not None and manifest.inputs_hash == result.inputs_hash
    assert CalibrationManifest.from_dict(manifest.to_dict(), work.calibration) == manifest
    assert set(manifest.islands) == set(manifest.fp16) == {"transformer", "clip_l", "clip_g", "t5", "vae_decoder"}
    for precision in (Precision.FP32, Precision.FP16, Precision.FP8):
        onnx = OnnxManifest.load(work.onnx_folder(precision, "transformer"), "transformer", precision)
        assert OnnxManifest.from_dict(onnx.to_dict(), onnx.folder) == onnx
        assert onnx.onnx_path.is_file() and WorkDir.of_onnx(onnx.onnx_path) == work
    fp8 = OnnxManifest.load(work.onnx_folder(Precision.FP8, "transformer"), "transformer", Precision.FP8)
    assert fp8.calibration_hash == result.inputs_hash


def test_load_current_is_the_one_freshness_check(work_copy):
    folder = WorkDir(work_copy).onnx_folder(Precision.FP16, "clip_l")
    data = json.loads((folder / "manifest.json").read_text())
    assert load_current(folder, data["inputs_hash"], "m") is not None
    assert load_current(folder, "another hash", "m") is None
    (folder / "model.onnx").write_bytes(b"short")
    assert load_current(folder, data["inputs_hash"], "m") is None, "a file of another size is not current"


def test_calibration_state_of_an_older_layout_is_refused_in_one_line(capsys, work_copy):
    path = work_copy / "calibration" / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "layout": 1}))
    code, err = run_cli(capsys, ["export", "--out", work_copy, "--components", "clip_l"])
    assert_user_error(code, err, "older sd35trt layout")
    assert "calibrate --force" in err
