"""FP16 range: census, FP32 islands (pure planning, hooks) and the whole chain on a model with real-SD3.5-like
activation outliers, through the CLI on a local diffusers directory."""

from __future__ import annotations

import json

import pytest

from sd35trt.core.numerics import Island, island_unit, plan_islands
from sd35trt.core.specs import SPECS
from tests.conftest import needs_rtx

T5_UNITS = SPECS["t5"].island_units
MMDIT_UNITS = SPECS["transformer"].island_units


def _row(inp: float, out: float, outs=None):
    return {"in": inp, "out": out, "outs": outs if outs is not None else [out]}


def test_island_units_come_from_the_spec():
    assert island_unit("transformer_blocks.35.ff.net.0.proj", MMDIT_UNITS) == "transformer_blocks.35"
    assert island_unit("encoder.block.23.layer.1.DenseReluDense.wo", T5_UNITS) == "encoder.block.23.layer.1"
    assert island_unit("encoder.final_layer_norm", T5_UNITS) == "encoder.final_layer_norm"
    assert island_unit("text_model.encoder.layers.11.mlp.fc2", SPECS["clip_l"].island_units) == \
        "text_model.encoder.layers.11"


def test_plan_islands_from_census_and_recipe():
    names = ["encoder", "encoder.block", "encoder.block.0", "encoder.block.1", "encoder.block.1.layer.0",
             "encoder.block.1.layer.1", "encoder.block.1.layer.1.DenseReluDense", "encoder.final_layer_norm"]
    census = {
        "encoder.block.1": _row(3.0, 2e5, [2e5, 1.0]),  # a container: its hot value comes from layer.1
        "encoder.block.1.layer.1": _row(3.0, 2e5),
        "encoder.block.1.layer.1.DenseReluDense": _row(3.0, 2e5),
        "encoder.final_layer_norm": _row(2e5, 4.0),
        "encoder.block.0": _row(1.0, 1.2e4),  # below the margin
    }
    islands = plan_islands(census, names, margin=2.0**14, units=T5_UNITS)
    assert [i.module for i in islands] == ["encoder.block.1.layer.1", "encoder.final_layer_norm"]
    layer, norm = islands
    assert layer.fp32_outputs == (0,), "an island whose own output leaves FP16 range keeps it FP32"
    assert norm.fp32_outputs == (), "the norm brings values back: cast back to FP16"
    assert "2e+05 > margin 16384" in layer.why and layer.max_abs == 2e5
    assert plan_islands(census, names, margin=3e5, units=T5_UNITS) == []
    # recipe sites apply only where the model has them (SD3.5-Large's block 35 is absent from Medium)
    mmdit = ["transformer_blocks.0", "transformer_blocks.35", "transformer_blocks.35.ff"]
    assert [i.module for i in plan_islands({}, mmdit, margin=2.0**14, upcast=("transformer_blocks.35",))] == \
        ["transformer_blocks.35"]
    assert plan_islands({}, mmdit[:1], margin=2.0**14, upcast=("transformer_blocks.35",)) == []


def test_fp32_island_hooks_cast_and_restore():
    import torch

    from sd35trt.core.numerics import fp32_islands

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    net = Net().half()
    with torch.no_grad():
        for layer, gain in ((net.a, 300.0), (net.b, 300.0), (net.c, 2.0**-16)):  # b's output 9e4 overflows FP16
            layer.weight.copy_(torch.eye(4) * gain)
            layer.bias.zero_()
        x = torch.ones(2, 4, dtype=torch.float16)
        assert not torch.isfinite(net(x)).all()
        with fp32_islands(net, [Island("b", 1e5, "test", (0,)), Island("c", 1e5, "test")], torch.float16):
            assert net.b.weight.dtype == torch.float32
            y = net(x)
        assert y.dtype == torch.float16 and torch.allclose(y.float(), torch.full((2, 4), 9e4 * 2.0**-16), rtol=1e-2)
    assert all(p.dtype == torch.float16 for p in net.parameters()), "weights are back in FP16 after the context"
    assert not net.b._forward_hooks and not net.b._forward_pre_hooks


def test_fp16_last_resort_is_whole_fp32_with_why():
    """When FP16 fails even with its islands (here: none given), the component's FP16 variant is FP32."""
    from sd35trt.core.models import build_pipeline, resolve_model
    from sd35trt.producers.calibrate import CalibrationConfig, TrafficRecorder, _fp16_decision, _run_module, run_pipeline
    from tests.conftest import CALIB
    from tests.outliers import inject_outliers

    pipe = build_pipeline(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    inject_outliers(pipe, transformer=False)
    recorder = TrafficRecorder(pipe, ("t5",))
    run_pipeline(pipe, ["a cat"], CalibrationConfig(**{**CALIB, "steps": 1}), seed=0, steps=1)
    recorder.close()
    refs = [_run_module(SPECS["t5"].module(pipe), SPECS["t5"], c) for c in recorder.calls["t5"]]
    checks, decision = _fp16_decision(pipe, "t5", recorder.calls["t5"], refs, [], {})
    assert decision.precision == "fp32" and decision.reason.startswith("last resort")
    assert not checks["with_islands"]["passed"]


@pytest.fixture(scope="module")
def outlier_chain(tmp_path_factory):
    """calibrate → export (→ build with TensorRT-RTX) on a saved tiny SD3.5 with injected outliers, via the CLI."""
    from sd35trt.cli.main import main
    from tests.outliers import save_outlier_model

    root = tmp_path_factory.mktemp("outliers")
    model = save_outlier_model(root / "model")
    work = root / "work"
    small = ["--num-prompts", "4", "--steps", "2", "--height", "512", "--width", "512"]
    assert main(["calibrate", "--model", str(model), "--out", str(work), *small]) == 0
    assert main(["export", "--model", str(model), "--out", str(work)]) == 0
    return model, work


def test_outliers_get_fp32_islands_not_a_whole_fp32_component(outlier_chain):
    _, work = outlier_chain
    report = json.loads((work / "calibration" / "calibration.json").read_text())
    islands = {c: [i["module"] for i in v] for c, v in report["fp32_islands"].items()}
    assert islands["transformer"] == ["transformer_blocks.1"]
    assert islands["t5"] == ["encoder.block.1.layer.1", "encoder.final_layer_norm"]
    assert islands["clip_l"] == islands["clip_g"] == islands["vae_decoder"] == []
    for name in ("transformer", "t5"):
        fp16 = report["fp16"][name]
        assert fp16["precision"] == "fp16", fp16["reason"]
        assert not fp16["without_islands"]["passed"], "without islands FP16 overflows (NaN) or clamps (T5)"
        assert fp16["with_islands"]["passed"]
    assert report["fp16"]["transformer"]["without_islands"]["noise_pred"]["nonfinite"] > 0
    why = report["fp32_islands"]["transformer"][0]["why"]
    assert "ff.net" in why and "> margin 16384" in why
    census = json.loads((work / "calibration" / "census.json").read_text())["components"]
    assert census["transformer"]["transformer_blocks.1.ff.net.0.proj"]["out"] > 65504


def test_outlier_onnx_is_finite_within_tolerance_and_mostly_fp16(outlier_chain):
    import onnx

    _, work = outlier_chain
    for variant, name in (("onnx-fp16", "transformer"), ("onnx-fp16", "t5"), ("onnx-fp8", "transformer")):
        manifest = json.loads((work / variant / name / "manifest.json").read_text())
        check = manifest["traffic_check"]
        assert check["passed"] and check["calls"] >= 1, (variant, name)
        assert all(v["nonfinite"] == 0 for k, v in check.items() if isinstance(v, dict) and "nonfinite" in v)
        assert manifest["fp32_islands"], "the manifest names the islands"
        if variant == "onnx-fp16":
            assert "float32" in manifest["validation"]["reference"], "FP16 is validated against FP32"
    model = onnx.load(str(work / "onnx-fp16" / "transformer" / "model.onnx"))
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    fp32 = [t.name for t in weights if t.data_type == onnx.TensorProto.FLOAT]
    fp16 = [t for t in weights if t.data_type == onnx.TensorProto.FLOAT16]
    assert 0 < len(fp32) <= 16 and len(fp16) > 2 * len(fp32), "only the island's weights are FP32"
    assert all("transformer_blocks.1." in n or n.startswith("onnx::") for n in fp32), fp32


@needs_rtx
def test_outlier_bundle_shows_islands_in_fp32(outlier_chain, tmp_path):
    from sd35trt.cli.main import main

    model, work = outlier_chain
    assert main(["build", "--gpu", "ada", "--onnx", str(work), "--out", str(tmp_path),
                 "--components", "transformer,t5"]) == 0
    bundle = tmp_path / "model" / "ada-tensorrt-rtx"
    manifest = json.loads((bundle / "manifest.json").read_text())
    transformer = manifest["components"]["transformer"]
    assert transformer["precision"] == "fp8" and transformer["layers"]["gemm_fp8"] > 0
    assert [i["module"] for i in transformer["fp32_islands"]] == ["transformer_blocks.1"]
    for name in ("transformer", "t5"):
        layers = manifest["components"][name]["layers"]
        assert layers["island_gemm"] > 0 and layers["island_gemm_fp32"] == layers["island_gemm"], name
        text = (bundle / "layers" / f"{name}.txt").read_text()
        assert "# FP32 island:" in text
