"""The typed artifact layer: manifests round-trip, the one freshness check, older layouts refused in one line."""

from __future__ import annotations

import json

from sd35trt.core.manifests import OnnxManifest, WorkDir, load_current
from sd35trt.core.specs import Precision
from sd35trt.producers.calibration_state import CalibrationManifest, load_calibration
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


def test_export_plans_follow_the_calibration(calibrated):
    """What `export --precision auto` builds: FP16 everywhere (FP32 weights where calibrate chose the last
    resort, with its islands otherwise), FP8 for the calibrated components only."""
    from dataclasses import replace

    from sd35trt.core.numerics import Island
    from sd35trt.producers.calibration_state import Fp16Decision
    from sd35trt.producers.export import plan_variants

    out, _ = calibrated
    manifest = load_calibration(WorkDir(out))
    island = Island("transformer_blocks.1", 2e5, "census: test")
    manifest = replace(manifest, islands={**manifest.islands, "transformer": [island]},
                       fp16={**manifest.fp16, "t5": Fp16Decision(Precision.FP32, "last resort: test")})
    plans = {(p.component, p.precision): p for p in plan_variants("auto", ("transformer", "t5", "vae_decoder"),
                                                                    manifest, {})}
    assert set(plans) == {("transformer", Precision.FP16), ("t5", Precision.FP16), ("vae_decoder", Precision.FP16),
                          ("transformer", Precision.FP8)}
    assert plans[("transformer", Precision.FP16)].islands == (island,)
    assert plans[("transformer", Precision.FP8)].islands == (island,), "an island is FP32 in the FP8 graph too"
    assert plans[("t5", Precision.FP16)].weights == "fp32" and plans[("t5", Precision.FP16)].islands == ()
    assert plans[("vae_decoder", Precision.FP16)].weights == "fp16"


def test_export_for_a_gpu_makes_what_its_build_picks(calibrated):
    """`export --gpu T` (what `make engines GPU=T` runs): one variant per component, the one build then picks for
    T from all that `--precision auto` would make, so an FP8 target never traces the FP16 twin of its FP8
    transformer and an FP16 target never exports FP8."""
    from sd35trt.core.targets import TARGETS, GpuTarget, plan_precisions
    from sd35trt.producers.export import plan_variants

    out, _ = calibrated
    manifest = load_calibration(WorkDir(out))
    comps = ("transformer", "clip_l", "t5", "vae_decoder")
    every = {c: {p.precision for p in plan_variants("auto", comps, manifest, {}) if p.component == c} for c in comps}
    assert every["transformer"] == {Precision.FP16, Precision.FP8}
    for target, transformer in ((GpuTarget.ADA, Precision.FP8), (GpuTarget.HOPPER, Precision.FP8),
                                (GpuTarget.AMPERE, Precision.FP16), (GpuTarget.TURING, Precision.FP16)):
        info = TARGETS[target]
        made = {(p.component, p.precision) for p in plan_variants("auto", comps, manifest, {}, info)}
        assert made == {("transformer", transformer), ("clip_l", Precision.FP16), ("t5", Precision.FP16),
                        ("vae_decoder", Precision.FP16)}, target
        picked = plan_precisions(info, comps, every)
        assert made == {(c, choice.precision) for c, choice in picked.items()}, target
    named = plan_variants("fp16", comps, manifest, {}, TARGETS[GpuTarget.ADA])
    assert {p.precision for p in named} == {Precision.FP16} and len(named) == 4, "--precision fp16 is what it says"


def test_artifacts_of_another_model_are_refused(capsys, work_copy, tmp_path):
    from tests.outliers import save_outlier_model

    other = save_outlier_model(tmp_path / "other")
    code, err = run_cli(capsys, ["export", "--model", other, "--out", work_copy, "--components", "clip_l"])
    assert_user_error(code, err, "artifacts were built from model 'tiny'")
