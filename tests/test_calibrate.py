import json

import pytest

from sd35trt.calibrate import CalibrationConfig, Recipe, calibrate_model, calibrate_networks, read_prompts
from sd35trt.errors import CalibrationError, InvalidInputError
from tests.conftest import CALIB, REPO


def test_shipped_prompt_set():
    prompts = read_prompts(REPO / "calibration" / "prompts.txt", 512)
    assert len(prompts) >= 512 and len(set(prompts)) == len(prompts)
    lengths = [len(p.split()) for p in prompts]
    assert min(lengths) >= 3 and max(lengths) <= 70
    assert sum('"' in p for p in prompts) >= 20, "text-rendering prompts are part of the set"


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"\n  \n", "empty"),
    (b"a cat\n\xff\xfe broken\n", r"not UTF-8 \(line 2"),
    (b"a\x00b\n", "binary"),
    (b"one prompt\n", "has 1 prompts, 6 needed"),
])
def test_bad_prompt_files(tmp_path, content, match):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=match):
        read_prompts(path, 6)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        read_prompts(tmp_path / "nope.txt", 1)


def test_config_rejects_bad_numbers():
    with pytest.raises(InvalidInputError, match="--steps 0"):
        CalibrationConfig(steps=0)
    with pytest.raises(InvalidInputError, match="--guidance nan"):
        CalibrationConfig(guidance=float("nan"))
    with pytest.raises(InvalidInputError, match="cannot calibrate vae_decoder"):
        CalibrationConfig(components=("vae_decoder",))


def test_recipe_rejects_unknown_modules_and_syntax(tmp_path):
    from sd35trt.models import build_pipeline, resolve_model

    good = Recipe.load(REPO / "calibration" / "fp8.toml")
    assert "proj_out" in good.exclude["transformer"]
    bad = tmp_path / "fp8.toml"
    bad.write_text('[transformer]\nexclude = ["proj_outt"]\n')
    pipe = build_pipeline(resolve_model("tiny"), components={"transformer"})
    with pytest.raises(CalibrationError, match="'proj_outt' matches no module"):
        Recipe.load(bad).check_patterns("transformer", [n for n, _ in pipe.transformer.named_modules()])
    bad.write_text("[transformer\n")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        Recipe.load(bad)
    bad.write_text('format = "int8"\n')
    with pytest.raises(InvalidInputError, match="format 'int8'"):
        Recipe.load(bad)


def test_calibration_is_deterministic():
    """Same model, prompts, seed and recipe → byte-identical scales (fresh pipelines, two runs)."""
    from sd35trt.models import build_pipeline, resolve_model

    prompts = read_prompts(REPO / "calibration" / "prompts.txt", 4)[:4]
    cfg = CalibrationConfig(**CALIB)
    recipe = Recipe.load(REPO / "calibration" / "fp8.toml")
    runs = []
    for _ in range(2):
        pipe = build_pipeline(resolve_model("tiny"))
        pipe.set_progress_bar_config(disable=True)
        _, scales = calibrate_networks(pipe, cfg, recipe, prompts)
        runs.append(json.dumps({k: v.hex() for k, v in sorted(scales.items())}).encode())
    assert runs[0] == runs[1]
    assert len(json.loads(runs[0])) > 50


def test_calibration_outputs_and_report(calibrated):
    import onnx

    from sd35trt.onnx_utils import ort_session

    out, result = calibrated
    fp8 = out / "onnx-fp8" / "transformer" / "model.onnx"
    onnx.checker.check_model(str(fp8))
    model = onnx.load(str(fp8))
    assert not any(n.domain == "trt" for n in model.graph.node)
    fp8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.dims]
    assert len(fp8_weights) > 20, "weights are stored as FP8, not FP16 + Q/DQ"
    ort_session(fp8)  # loads in onnxruntime
    for name in ("transformer", "clip_l", "clip_g", "t5", "vae_decoder"):
        assert (out / "onnx-fp16" / name / "model.onnx").is_file()
    report = result.report
    fp8_stats = report["components"]["transformer"]["fp8"]["noise_pred"]
    assert fp8_stats["rel_l2_max"] <= 0.05, "tiny FP8 transformer ≤ 5% rel-L2 per step vs FP32"
    assert fp8_stats["nonfinite"] == 0
    assert report["end_to_end"]["image_psnr_db"] and min(report["end_to_end"]["image_psnr_db"]) > 20
    scales = json.loads((out / "calibration" / "scales.json").read_text())
    assert len(scales) == report["quantizers"]["enabled"]
    assert (out / "calibration" / "calibration.json").is_file()


def test_unchanged_calibration_is_skipped(calibrated, tiny_source):
    out, first = calibrated
    again = calibrate_model(tiny_source, out, CalibrationConfig(**CALIB), device="cpu")
    assert again.skipped and again.inputs_hash == first.inputs_hash
    changed = CalibrationConfig(**{**CALIB, "seed": 1})
    from sd35trt.calibrate import calibration_inputs_hash, export_config_for

    prompts = read_prompts(changed.prompts_file, 6)
    recipe = Recipe.load(changed.recipe_file)
    assert calibration_inputs_hash(tiny_source, changed, prompts, recipe, export_config_for(out)) != first.inputs_hash


def test_fp16_overflow_keeps_fp32_and_says_why():
    """T5's feed-forward outputs overflow FP16 with real weights; simulate it and check the fallback."""
    import torch

    from sd35trt.calibrate import TrafficRecorder, _fp16_or_safe, _run_module, run_pipeline
    from sd35trt.models import build_pipeline, resolve_model
    from sd35trt.specs import SPECS

    pipe = build_pipeline(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    cfg = CalibrationConfig(**{**CALIB, "steps": 1})
    recorder = TrafficRecorder(pipe, ("t5", "clip_l"))
    run_pipeline(pipe, ["a cat", "a dog"], cfg, seed=0, steps=1)
    recorder.close()
    with torch.no_grad():  # activations past FP16's 65504 in the last feed-forward (T5 then clamps them)
        pipe.text_encoder_3.encoder.block[-1].layer[-1].DenseReluDense.wo.weight.mul_(1e5)
    refs = {n: [_run_module(SPECS[n].module(pipe), SPECS[n], c) for c in recorder.calls[n]] for n in ("t5", "clip_l")}
    assert all(torch.isfinite(torch.from_numpy(r[0])).all() for r in refs["t5"])
    t5 = _fp16_or_safe(pipe, "t5", recorder.calls["t5"], refs["t5"])
    assert t5["precision"] == "fp32" and "FP16 on held-out traffic" in t5["reason"]
    assert _fp16_or_safe(pipe, "clip_l", recorder.calls["clip_l"], refs["clip_l"])["precision"] == "fp16"
