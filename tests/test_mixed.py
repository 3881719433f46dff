"""The mixed FP8/INT4 recipe (#35 item 4) on a user's directory whose weights overflow FP16, with a LoRA: `make engines
GPU=ada QUANT=mixed T5=0 LORA=...` chooses INT4 for the layers that cost least on held-out traffic until the transformer's weights fit
the budget, keeps the FP32 islands out, lands between FP8's and INT4's errors, exports standard ONNX validated in
onnxruntime, and TensorRT-RTX builds it for SM89 with FP8 GEMMs and INT4 weights; the user's own budget moves the
choice, and a budget no mix meets is one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_rtx
from tests.test_bad_inputs import assert_user_error, run_cli
from tests.test_journeys import MAKE_SMALL, REPO


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, adapter):
    """(root, make's process, LORA=): `make engines GPU=ada QUANT=mixed T5=0 LORA=...` on a directory with FP16
    outliers."""
    from tests.outliers import inject_stream_outliers, save_model

    root = tmp_path_factory.mktemp("mixed")
    model = save_model(root / "hot", inject_stream_outliers)
    lora = f"{adapter}:0.8"
    run = subprocess.run(["make", "engines", f"MODEL={model}", "GPU=ada", "QUANT=mixed", "T5=0", f"LORA={lora}",
                          f"WORK={root / 'work'}", f"ENGINES={root / 'engines'}", *MAKE_SMALL], cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root, run, lora


def _initializer_bytes(path: Path) -> int:
    """Bytes of every weight the ONNX holds (initializers and Constant tensors, 4-bit ones packed)."""
    import onnx

    model = onnx.load(str(path))
    tensors = [*model.graph.initializer,
               *(a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")]
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in tensors)


@needs_rtx
def test_mixed_fits_its_budget_between_fp8_and_int4(mixed, capsys):
    root, run, _ = mixed
    work = root / "work"
    report = json.loads((work / "calibration" / "calibration.json").read_text())
    plan = report["mixed"]
    assert report["format"] == "mixed" and report["components"]["transformer"]["mixed"]["passed"]
    assert report["model"]["lora"], "the adapter fused before calibration"
    size, error = plan["estimated_gib"], plan["error"]
    assert plan["budget_from"].startswith("default: midway") and size["int4"] < plan["budget_gib"] < size["fp8"]
    assert size["mixed"] <= plan["budget_gib"]  # the budget is met ...
    assert error["fp8"] < error["mixed"] < error["int4"], error  # ... and the error lands between FP8's and INT4's

    layers = report["layers"]["transformer"]  # each layer's format and its measured cost
    chosen = {n for n, row in plan["layers"].items() if row["format"] == "int4"}
    assert 0 < len(chosen) < len(plan["layers"]) and all(layers[n].startswith("int4") for n in chosen)
    assert all(layers[n].startswith("fp8") for n in set(plan["layers"]) - chosen)
    islands = tuple(f"{i['module']}." for i in report["fp32_islands"]["transformer"])
    assert islands and not any(n.startswith(islands) for n in plan["layers"])  # islands are never quantized
    assert all(layers[n].startswith("fp32") for n in layers if n.startswith(islands))
    cheapest = sorted(plan["layers"], key=lambda n: plan["layers"][n]["delta_rel_l2"] / plan["layers"][n]["saved_bytes"])
    assert set(cheapest[: len(chosen)]) == chosen  # the cheapest per byte saved, by the measured costs

    onnx_dir = work / "onnx-mixed" / "transformer"
    exported = json.loads((onnx_dir / "manifest.json").read_text())
    assert "mixed fake-quant" in exported["validation"]["reference"] and exported["traffic_check"]["passed"]
    assert json.loads((onnx_dir / "4bit_rewrite.json").read_text())["int4_weights"] == len(chosen)
    stored = _initializer_bytes(onnx_dir / "model.onnx") / 2**30
    assert abs(stored - size["mixed"]) < 0.05 * size["mixed"], (stored, size)  # the size model is what the ONNX holds

    (model_folder,) = (root / "engines").glob("hot-lora-*")  # the LoRA model's own folder
    bundle = model_folder / "ada-tensorrt-rtx-mixed-clip"
    entry = json.loads((bundle / "manifest.json").read_text())["components"]["transformer"]
    assert entry["precision"] == "mixed" and entry["layers"]["gemm_fp8"] > 0
    assert entry["layers"]["int4_weights"] == len(chosen), entry["layers"]  # every chosen layer INT4 in the engine
    assert entry["layers"]["island_gemm"] == entry["layers"]["island_gemm_fp32"] > 0

    # Blackwell (SM120) in two parts: every FP8 GEMM and INT4 weight of the whole engine, counted over the parts;
    # doctor's 8 GB plan from the bundle's manifests
    code, err = run_cli(capsys, ["build", "--onnx", work, "--gpu", "blackwell", "--out", root / "engines", "--no-t5",
                                 "--parts", "transformer=2"])
    assert code == 0, err[-3000:]
    parts = json.loads((model_folder / "blackwell-tensorrt-rtx-mixed-clip" / "manifest.json").read_text())
    cut = parts["components"]["transformer"]
    assert len(cut["parts"]) == 2 and cut["layers"]["int4_weights"] == len(chosen)
    # (FP8 GEMMs are counted after the builder's fusions, which a cut between two layers can prevent: 9 vs 8 here)
    assert cut["layers"]["gemm_fp8"] >= entry["layers"]["gemm_fp8"] > 0, (cut["layers"], entry["layers"])
    from sd35trt.cli.main import main

    code = main(["doctor", str(bundle), "--vram", "8"])
    out, err = capsys.readouterr()
    assert code in (0, 3), err[-2000:]  # 3: no engine of it runs on this host (no GPU here), said in the report
    vram = json.loads(out)["vram"]
    assert 0 < vram["plans_gib"]["resident"] < 8
    # the transformer room on an 8 GiB card: a transformer engine of that size makes the resident plan exactly 8 GiB
    room, weights = vram["transformer_room"], vram["needs"]["transformer"]["weights_gib"]
    assert abs(vram["plans_gib"]["resident"] - weights + room["resident_gib"] - 8) < 0.02, vram
    assert room["sequential_gib"] > room["resident_gib"] > room["mixed_gib"]["resident"] > 0
    assert "MIXED_GIB" in room["for"]


@needs_rtx
def test_the_users_budget_moves_the_choice_and_one_no_mix_meets_is_one_line(mixed, capsys):
    root, _, lora = mixed
    default = json.loads((root / "work" / "calibration" / "calibration.json").read_text())["mixed"]
    size = default["estimated_gib"]
    tight = size["int4"] + 0.1 * (size["fp8"] - size["int4"])
    argv = ["calibrate", "--model", root / "hot", "--lora", lora, "--format", "mixed", "--no-t5", "--num-prompts", "4", "--steps", "2",
            "--height", "256", "--width", "256", "--out", root / "tight"]
    code, err = run_cli(capsys, [*argv, "--max-transformer-gib", f"{tight:.6g}"])
    assert code == 0, err[-3000:]
    plan = json.loads((root / "tight" / "calibration" / "calibration.json").read_text())["mixed"]
    int4 = [n for n, row in plan["layers"].items() if row["format"] == "int4"]
    assert plan["budget_from"] == "--max-transformer-gib" and plan["estimated_gib"]["mixed"] <= tight
    assert len(int4) > sum(row["format"] == "int4" for row in default["layers"].values())
    assert plan["error"]["mixed"] > default["error"]["mixed"]  # a smaller transformer costs more error

    code, err = run_cli(capsys, [*argv[:-1], root / "none", "--max-transformer-gib", f"{size['int4'] / 2:.6g}"])
    assert_user_error(code, err, "below this transformer's smallest mix")
    assert not (root / "none" / "calibration").exists()
    code, err = run_cli(capsys, ["calibrate", "--model", "tiny", "--format", "int4", "--max-transformer-gib", "3",
                                 "--out", root / "none"])
    assert_user_error(code, err, "needs --format mixed")


def test_at_sd35_size_blocks_are_ranked_first_then_the_layers_of_the_block_at_the_margin():
    """``plan_mix`` on made-up errors (each layer's cost adds): with more candidates than ``GROUPED_ABOVE`` (SD3.5 has
    385/515) it measures each block once, takes the cheapest blocks whole, and ranks one by one only the layers of
    the block where the budget is crossed, with the blocks taken before it INT4 too: 38 measurements instead of 93."""
    from sd35trt.producers.mixed import GIB, GROUPED_ABOVE, Sizes, plan_mix

    cost = {"norm_out.linear": 1e-4}  # outside every block: its own group
    cost |= {f"transformer_blocks.0.l{i}": 1e-3 for i in range(30)}
    cost |= {f"transformer_blocks.1.l{i}": 1e-2 + i * 1e-4 for i in range(30)}  # the margin: cheaper at low i
    cost |= {f"transformer_blocks.2.l{i}": 1e-1 for i in range(30)}
    assert len(cost) > GROUPED_ABOVE
    sizes = Sizes(200 * GIB, dict.fromkeys(cost, GIB))
    calls = []

    def measure(layers: list[str]) -> float:
        calls.append(sorted(layers))
        return 0.01 + sum(cost[n] for n in layers)

    plan = plan_mix(list(cost), sizes, (200 - 45, "--max-transformer-gib"), measure)
    margin = {f"transformer_blocks.1.l{i}" for i in range(14)}
    assert set(plan.chosen) == {"norm_out.linear", *(n for n in cost if n.startswith("transformer_blocks.0.")), *margin}
    assert plan.bytes["mixed"] == (200 - 45) * GIB and len(calls) == 1 + 4 + 1 + 30 + 2
    report = plan.to_dict()
    assert report["ranking"].startswith("by block")
    assert report["layers"]["transformer_blocks.0.l3"]["measured_with"] == "transformer_blocks.0"
    assert "measured_with" not in report["layers"]["transformer_blocks.1.l3"]  # measured alone, the blocks before INT4
    assert abs(report["layers"]["transformer_blocks.1.l3"]["delta_rel_l2"] - 0.0103) < 1e-9
    assert plan.error["fp8"] < plan.error["mixed"] < plan.error["int4"]

    small = {n: c for n, c in cost.items() if n.startswith("transformer_blocks.0.")}  # per layer at tiny size
    calls.clear()
    plan = plan_mix(list(small), Sizes(200 * GIB, dict.fromkeys(small, GIB)), (190, "x"), measure)
    assert len(calls) == 1 + 30 + 2 and len(plan.chosen) == 10 and not plan.ranked_as


def test_the_choice_takes_the_cheapest_per_byte_until_the_budget_holds():
    """``mixed.choose`` and ``resolve_budget`` on made-up costs: the order is cost per byte saved, it stops as soon as
    the weights fit, and a budget outside (all INT4, all FP8) is one line each way."""
    from sd35trt.core.errors import InvalidInputError
    from sd35trt.producers.mixed import GIB, Sizes, choose, resolve_budget

    sizes = Sizes(100 * GIB, {"a": 30 * GIB, "b": 20 * GIB, "c": 10 * GIB})  # all INT4: 40 GiB
    cost = {"a": 0.3, "b": 0.1, "c": 0.3}  # per GiB saved: b 0.005, a 0.01, c 0.03
    assert choose(cost, sizes, 85) == ["b"]
    assert choose(cost, sizes, 60) == ["b", "a"]
    assert choose(cost, sizes, 40) == ["b", "a", "c"]
    assert resolve_budget(None, sizes)[0] == 70 and resolve_budget(55, sizes) == (55, "--max-transformer-gib")
    with pytest.raises(InvalidInputError, match="below this transformer's smallest mix"):
        resolve_budget(39, sizes)
    with pytest.raises(InvalidInputError, match="holds the whole FP8 transformer"):
        resolve_budget(100, sizes)
