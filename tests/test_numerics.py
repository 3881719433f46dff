"""FP16 range: census and FP32 islands (pure planning, hooks). The whole chain on model directories with
real-SD3.5-like outliers is tests/test_journeys.py (make engines, compare)."""

from __future__ import annotations

from sd35trt.core.numerics import Island, island_unit, plan_islands
from sd35trt.core.specs import SPECS

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
    from sd35trt.core.traffic import TrafficRecorder
    from sd35trt.producers.calibrate import CalibrationConfig
    from sd35trt.producers.reference import fp16_decision, run_module, run_pipeline
    from tests.conftest import CALIB
    from tests.outliers import inject_outliers

    pipe = build_pipeline(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    inject_outliers(pipe, transformer=False)
    recorder = TrafficRecorder(pipe, ("t5",))
    run_pipeline(pipe, ["a cat"], CalibrationConfig(**{**CALIB, "steps": 1}), seed=0, steps=1)
    recorder.close()
    refs = [run_module(SPECS["t5"].module(pipe), SPECS["t5"], c) for c in recorder.calls["t5"]]
    checks, decision = fp16_decision(pipe, "t5", recorder.calls["t5"], refs, [], {})
    assert decision.precision == "fp32" and decision.reason.startswith("last resort")
    assert not checks["with_islands"]["passed"]


def test_awq_sample_spreads_steps_and_batches_and_records_those_calls():
    """AWQ's search runs on a sample of the calibration loop's transformer calls: every step range and prompt batch
    is represented, no call twice, and the recorder keeps exactly the sampled calls of a real loop."""
    import torch

    from sd35trt.core.models import build_pipeline, resolve_model
    from sd35trt.core.traffic import sample_calls
    from sd35trt.producers.calibrate import CalibrationConfig
    from sd35trt.producers.reference import sampled_traffic
    from tests.conftest import CALIB

    picked = sample_calls(8, 20, 16)  # SD3.5's defaults: 32 prompts in batches of 4, 20 steps
    pairs = sorted(divmod(c, 20) for c in picked)
    assert len(picked) == 16 and {s for _, s in pairs} >= {0, 19}
    assert sorted(b for b, _ in pairs) == sorted(list(range(8)) * 2)  # each batch twice
    assert len({s for _, s in pairs}) == 16  # no step twice
    assert sample_calls(1, 2, 16) == {0, 1} and len(sample_calls(2, 20, 3)) == 3

    pipe = build_pipeline(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    cfg = CalibrationConfig(**{**CALIB, "steps": 3, "batch": 1})
    traffic = sampled_traffic(pipe, ["a cat", "a dog"], cfg, ("transformer", "clip_l"), steps=3, keep=2,
                              device="cpu", compute="fp32")
    assert len(traffic["clip_l"]) == 4  # every encoder call: prompt and negative prompt of each batch
    timesteps = [float(call["timestep"][0]) for call in traffic["transformer"]]
    pipe.scheduler.set_timesteps(3)
    first, last = float(pipe.scheduler.timesteps[0]), float(pipe.scheduler.timesteps[-1])
    assert timesteps == [first, last]  # batch 0's first step, batch 1's last
    assert all(torch.isfinite(v).all() for call in traffic["transformer"] for v in call.values())
