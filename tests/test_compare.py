import json

from sd35trt.checks.compare import CompareConfig, onnx_variants, run_compare
from sd35trt.runtime.launch import LoopOptions


def test_compare_per_component_and_end_to_end(calibrated, tiny_source, tmp_path):
    """The issue's bar: FP32 ONNX loop vs diffusers ≥ 60 dB; FP16 and FP8 reported and within their bars."""
    out, _ = calibrated
    cfg = CompareConfig(prompts=1, steps=3, components=("transformer", "clip_l", "vae_decoder"))
    runners, ranges, missing = onnx_variants(LoopOptions(onnx=out), cfg.variants)
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
    # each row says where its onnxruntime session ran: the device its runner was opened on, loaded or not (an
    # unloaded runner's polygraphy twin ran on the CPU at SD3.5 size on the H200, whatever --provider said)
    assert {row["device"] for row in transformer.values()} == {runners["fp8"]["transformer"].device}
    assert data["executed_with"] == ["onnxruntime"]
    # clip_l has no FP8 variant: it is compared once, as FP16, never again under an "fp8" label
    assert set(data["components"]["clip_l"]) == {"fp32", "fp16"}
    assert data["end_to_end"]["fp8"]["runners"]["clip_l"]["precision"] == "fp16"  # the fp8 run uses FP16 there
    from PIL import Image

    grid = Image.open(tmp_path / "compare.png")
    assert grid.size == (256 * 7, 256 + 20 + 18), "reference, then each variant with its amplified difference"
    pixels = grid.crop((256 * 4, 38, 256 * 5, 38 + 256)).convert("L")  # the fp16 difference tile: visible, not black
    assert max(pixels.getdata()) > 100, "amplified to the visible range (it was black at x8)"


def test_compare_fails_loudly_when_a_tolerance_breaks(calibrated, tiny_source, tmp_path, monkeypatch):
    import sd35trt.checks.compare as compare_mod
    from sd35trt.core.specs import Precision

    monkeypatch.setitem(compare_mod.E2E_MIN_PSNR_DB, Precision.FP16, 1000.0)
    out, _ = calibrated
    cfg = CompareConfig(variants=("fp16",), prompts=1, steps=2, components=("clip_g",))
    runners, ranges, _ = onnx_variants(LoopOptions(onnx=out), cfg.variants)
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
                 "--components", "clip_l", "--variants", "fp32,fp16,fp8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "not compared fp32: no fp32 ONNX for transformer" in captured.out
    assert "not compared fp8: no fp8 ONNX for any component" in captured.out
    assert "[I]" not in captured.out and "polygraphy" not in captured.out.lower()
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(data["missing"]) == {"fp32", "fp8"} and set(data["end_to_end"]) == {"fp16"}


def test_polygraphy_chain_twin_runs_through_the_comparator(calibrated, tmp_path):
    """The twin's I/O metadata must be polygraphy DataTypes (0.53.6 returns numpy dtypes by default, on which
    Comparator.run fails coercing feeds). Exercised with polygraphy's own OnnxrtRunner under the same chaining
    code the TrtRunner twin uses: a transformer cut in 2 parts equals the whole graph."""
    import numpy as np
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from sd35trt.checks.polygraphy_runners import chained_poly_runner
    from sd35trt.core.manifests import OnnxManifest, WorkDir
    from sd35trt.core.onnx_utils import ort_session
    from sd35trt.core.specs import SPECS, Precision
    from sd35trt.producers.parts import write_parts

    out, _ = calibrated
    manifest = OnnxManifest.load(WorkDir(out).onnx_folder(Precision.FP32, "transformer"), "transformer", Precision.FP32)
    parts = write_parts(manifest.onnx_path, 2, manifest.profile, tmp_path / "parts")
    inners = [OnnxrtRunner(lambda path=path: ort_session(path), name=f"part{i}") for i, (path, _) in enumerate(parts)]
    twin = chained_poly_runner(inners, "chain", SPECS["transformer"].input_names, SPECS["transformer"].output_names)
    whole = OnnxrtRunner(lambda: ort_session(manifest.onnx_path), name="whole")
    rng = np.random.default_rng(0)
    feed = {"hidden_states": rng.standard_normal((2, 16, 64, 64), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 333, 96), dtype=np.float32),
            "pooled_projections": rng.standard_normal((2, 96), dtype=np.float32),
            "timestep": np.array([500.0, 500.0], dtype=np.float32)}
    results = Comparator.run([whole, twin], data_loader=[feed])
    got, expected = results["chain"][0]["noise_pred"], results["whole"][0]["noise_pred"]
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_fp8_work_dir_compares_the_fp16_components_it_ships(calibrated, tiny_source, tmp_path):
    """`make export` at SD3.5 size writes an FP8 transformer and FP16 encoders/decoder, no FP16 transformer: the
    "fp16" variant is missing, yet the FP16 components the FP8 bundle ships are compared (on the H200 only the
    transformer had a row), once each, labelled with their own precision."""
    import shutil

    out, _ = calibrated
    work = tmp_path / "work"
    for folder in ("calibration", "onnx-fp8", "onnx-fp16"):
        shutil.copytree(out / folder, work / folder)
    shutil.rmtree(work / "onnx-fp16" / "transformer")
    cfg = CompareConfig(prompts=1, steps=2, components=("transformer", "clip_l", "vae_decoder"))
    runners, ranges, missing = onnx_variants(LoopOptions(onnx=work), cfg.variants)
    assert set(runners) == {"fp8"} and "fp16" in missing
    report = run_compare(tiny_source, tmp_path / "cmp", cfg, ["a cat"], runners, ranges, str(work))
    assert report, report.failures
    components = json.loads((tmp_path / "cmp" / "compare.json").read_text())["components"]
    assert {name: set(rows) for name, rows in components.items()} == {
        "transformer": {"fp8"}, "clip_l": {"fp16"}, "vae_decoder": {"fp16"}}
    assert components["clip_l"]["fp16"]["precision"] == "fp16"
