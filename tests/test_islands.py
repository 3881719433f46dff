"""FP32 islands at every boundary (#22): outliers placed where an island meets its neighbours, through the CLI on
saved tiny models (calibrate → export → build): the census picks the islands, every boundary is right by
construction (no dtype crash), and the FP16/FP8 ONNX are finite and within tolerance on held-out traffic."""

from __future__ import annotations

import json

import pytest

from sd35trt.core.numerics import plan_islands
from sd35trt.core.specs import SPECS
from tests.conftest import needs_rtx

MMDIT = SPECS["transformer"].island_units


def _row(inp, out, outs=None):
    return {"in": inp, "out": out, "outs": outs if outs is not None else [out]}


def test_a_container_receiving_an_outlier_is_the_island_whole():
    """norm_out's input is past the margin: AdaLayerNormContinuous hands it to code between its children (it casts
    its conditioning to the input's dtype before its Linear), so norm_out is the island, not just norm_out.norm;
    a container of units (the block list, T5's block) never is; islands never nest."""
    names = ["transformer_blocks", "transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.1.ff",
             "norm_out", "norm_out.linear", "norm_out.norm", "proj_out", "context_embedder"]
    census = {"transformer_blocks.1": _row(3.0, 2e5, [None, 2e5]), "transformer_blocks.1.ff": _row(3.0, 2e5),
              "norm_out.norm": _row(2e5, 4.0), "norm_out": _row(2e5, 6.0)}
    islands = plan_islands(census, names, margin=2.0**14, units=MMDIT)
    assert [i.module for i in islands] == ["norm_out", "transformer_blocks.1"]
    assert islands[1].fp32_outputs == (1,), "the block's hidden stream stays FP32 into norm_out"
    census = {"context_embedder": _row(2.0, 3e5), "transformer_blocks.0": _row(3e5, 2e5, [None, 2e5]),
              "transformer_blocks": _row(3e5, 2e5)}
    assert [i.module for i in plan_islands(census, names, margin=2.0**14, units=MMDIT)] == \
        ["context_embedder", "transformer_blocks.0"], "two adjacent islands; the block list is not one"


# (The last block's output stream into norm_out is tests/test_journeys.py's overflow journey.)
@pytest.fixture(scope="module", params=[("context_embedder", 1)], ids=lambda p: p[0])
def boundary_chain(request, tmp_path_factory):
    from sd35trt.cli.main import main
    from tests.outliers import save_boundary_model

    site, layers = request.param
    root = tmp_path_factory.mktemp(site)
    model = save_boundary_model(root / "model", site, layers=layers)
    work = root / "work"
    small = ["--num-prompts", "2", "--steps", "2", "--height", "256", "--width", "256", "--calib-batch", "2"]
    assert main(["calibrate", "--model", str(model), "--out", str(work), *small]) == 0
    assert main(["export", "--model", str(model), "--out", str(work), "--components", "transformer"]) == 0
    return site, model, work


EXPECTED = {"last_block_output": ["norm_out", "transformer_blocks.1"],
            "context_embedder": ["context_embedder", "transformer_blocks.0"]}
# The 1-block model's only block is an island and the recipe excludes the rest: nothing is left to run in FP8.
FP8 = {"last_block_output": True, "context_embedder": False}


def test_boundaries_are_right_through_calibrate_and_export(boundary_chain):
    site, _, work = boundary_chain
    report = json.loads((work / "calibration" / "calibration.json").read_text())
    islands = [i["module"] for i in report["fp32_islands"]["transformer"]]
    assert islands == EXPECTED[site], islands
    fp16 = report["fp16"]["transformer"]
    assert fp16["precision"] == "fp16" and fp16["with_islands"]["passed"], fp16["reason"]
    assert not fp16["without_islands"]["passed"], "the outliers are real: FP16 alone fails"
    assert (report["components"] != {}) == FP8[site] and (work / "onnx-fp8").exists() == FP8[site]
    for variant in ("onnx-fp16", "onnx-fp8")[: 2 if FP8[site] else 1]:
        manifest = json.loads((work / variant / "transformer" / "manifest.json").read_text())
        check = manifest["traffic_check"]
        assert check["passed"] and check["noise_pred"]["nonfinite"] == 0, (variant, check)
        assert [i["module"] for i in manifest["fp32_islands"]] == EXPECTED[site]


@needs_rtx
def test_boundary_engines_keep_their_islands_in_fp32(boundary_chain, tmp_path):
    from sd35trt.cli.main import main

    site, model, work = boundary_chain
    assert main(["build", "--gpu", "ada", "--onnx", str(work), "--out", str(tmp_path), "--components", "transformer"]) == 0
    manifest = json.loads((tmp_path / "model" / "ada-tensorrt-rtx" / "manifest.json").read_text())
    entry = manifest["components"]["transformer"]
    layers = entry["layers"]
    assert entry["precision"] == ("fp8" if FP8[site] else "fp16"), entry["reason"]
    assert (layers["gemm_fp8"] > 0) == FP8[site]
    assert layers["island_gemm"] > 0 and layers["island_gemm_fp32"] == layers["island_gemm"]
