"""4-bit transformers: the precision table for every target x format x backend (pure), INT4 weight-only end to end
on a user's directory with FP32 islands and a LoRA (AWQ calibration, standard ONNX validated in onnxruntime,
TensorRT-RTX builds for SM86, SM89 and SM120, one in parts, whose layer reports hold the calibrated INT4 weights),
NVFP4 for SM120 on a Turbo model with a LoRA, CLIP-only, in parts, with doctor's plan, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_rtx
from tests.test_bad_inputs import assert_user_error, run_cli
from tests.test_journeys import MAKE_SMALL, REPO, cli

# What the issue and NVIDIA's support matrices say, written out: (backend, target, calibrated format) -> the
# transformer's engine precision, and the compute capabilities built for. TensorRT-RTX 1.7: FP8 on 8.9 and 12.x,
# INT4 weight-only on 8.6, 8.9, 12.x, FP4 on 12.x (it builds Blackwell for SM120 ahead of time). Full TensorRT: FP8
# from 8.9, INT4 weight-only from 7.5, FP4 on Blackwell. Mixed FP8/INT4 needs both: where FP8 runs.
TABLE = {
    ("tensorrt-rtx", "turing"): {"fp8": ("fp16", ["7.5"]), "int4": ("fp16", ["7.5"]), "nvfp4": ("fp16", ["7.5"]),
                                 "mixed": ("fp16", ["7.5"])},
    ("tensorrt-rtx", "ampere"): {"fp8": ("fp16", ["8.0", "8.6"]), "int4": ("int4", ["8.6"]),
                                 "nvfp4": ("fp16", ["8.0", "8.6"]), "mixed": ("fp16", ["8.0", "8.6"])},
    ("tensorrt-rtx", "ada"): {"fp8": ("fp8", ["8.9"]), "int4": ("int4", ["8.9"]), "nvfp4": ("fp16", ["8.9"]),
                              "mixed": ("mixed", ["8.9"])},
    ("tensorrt-rtx", "blackwell"): {"fp8": ("fp8", ["12.0"]), "int4": ("int4", ["12.0"]), "nvfp4": ("nvfp4", ["12.0"]),
                                    "mixed": ("mixed", ["12.0"])},
    ("tensorrt", "turing"): {"fp8": ("fp16", ["7.5"]), "int4": ("int4", ["7.5"]), "nvfp4": ("fp16", ["7.5"]),
                             "mixed": ("fp16", ["7.5"])},
    ("tensorrt", "ampere"): {"fp8": ("fp16", ["8.0", "8.6"]), "int4": ("int4", ["8.0", "8.6"]),
                             "nvfp4": ("fp16", ["8.0", "8.6"]), "mixed": ("fp16", ["8.0", "8.6"])},
    ("tensorrt", "ada"): {"fp8": ("fp8", ["8.9"]), "int4": ("int4", ["8.9"]), "nvfp4": ("fp16", ["8.9"]),
                          "mixed": ("mixed", ["8.9"])},
    ("tensorrt", "hopper"): {"fp8": ("fp8", ["9.0"]), "int4": ("int4", ["9.0"]), "nvfp4": ("fp16", ["9.0"]),
                             "mixed": ("mixed", ["9.0"])},
    ("tensorrt", "blackwell"): {"fp8": ("fp8", ["10.0", "12.0"]), "int4": ("int4", ["10.0", "12.0"]),
                                "nvfp4": ("nvfp4", ["10.0", "12.0"]), "mixed": ("mixed", ["10.0", "12.0"])},
}


def _planned(backend_name: str, target_name: str, fmt: str):
    from sd35trt.core.specs import Precision
    from sd35trt.core.targets import TARGETS, Backend, GpuTarget, buildable, narrow_for_format, plan_precisions

    backend, target = Backend(backend_name), TARGETS[GpuTarget(target_name)]
    quant = Precision(fmt)
    ccs, dropped = narrow_for_format(target, backend, quant, buildable(target, backend))
    have = {"transformer": {Precision.FP16, quant}, "vae_decoder": {Precision.FP16}}
    plan = plan_precisions(target, ("transformer", "vae_decoder"), have, backend=backend, ccs=ccs)
    return plan, [f"{a}.{b}" for a, b in ccs], dropped


@pytest.mark.fast
@pytest.mark.parametrize("backend,target", sorted(TABLE))
def test_precision_table_every_target_and_format(backend, target):
    for fmt, (expected, ccs) in TABLE[backend, target].items():
        plan, built, dropped = _planned(backend, target, fmt)
        choice = plan["transformer"]
        assert (choice.precision.value, built) == (expected, ccs), (backend, target, fmt, choice, built)
        assert plan["vae_decoder"].precision.value == "fp16"
        if expected == "fp16":  # the fallback says which GEMM the GPU lacks
            assert "fallback" in choice.reason and "runs no" in choice.reason, choice.reason
        else:
            assert choice.reason.lower().startswith(("int4", "fp8", "fp4", "nvfp4", "mixed")), choice.reason
    ampere = _planned(backend, "ampere", "int4")[2] if target == "ampere" else None
    if backend == "tensorrt-rtx" and target == "ampere":
        assert ampere and "SM80 left out" in ampere  # A100 owners are told why their GPU gets no INT4 bundle


@pytest.mark.fast
def test_forcing_a_format_the_gpu_lacks_is_one_line(capsys, tmp_path):
    from sd35trt.core.errors import InvalidInputError
    from sd35trt.core.specs import Precision
    from sd35trt.core.targets import TARGETS, Backend, GpuTarget, plan_precisions

    with pytest.raises(InvalidInputError, match="FP4"):
        plan_precisions(TARGETS[GpuTarget.ADA], ("transformer",), {"transformer": {Precision.NVFP4}}, Precision.NVFP4,
                        backend=Backend.TENSORRT_RTX)
    code, err = run_cli(capsys, ["calibrate", "--model", "tiny", "--format", "int4", "--components", "transformer,t5",
                                 "--out", tmp_path / "w"])
    assert_user_error(code, err, "transformer only")
    code, err = run_cli(capsys, ["calibrate", "--model", "tiny", "--format", "fp16", "--out", tmp_path / "w"])
    assert code == 2 and "fp16" in err and "Traceback" not in err
    code, err = run_cli(capsys, ["preflight", "--model", "tiny", "--format", "int4", "--fp8", "transformer,t5"])
    assert_user_error(code, err, "transformer only")
    code, out = run_cli(capsys, ["preflight", "--model", "tiny", "--gpu", "ampere", "--format", "int4"])
    assert code == 0


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory, adapter):
    """`make engines GPU=ampere QUANT=int4 LORA=...` on a user's directory whose weights overflow FP16 (FP32 islands
    in the transformer and T5), with a LoRA: the INT4 chain with islands kept out of the 4-bit layers. Returns (root,
    make's process, the LORA= value)."""
    from tests.outliers import inject_stream_outliers, save_model

    root = tmp_path_factory.mktemp("int4")
    model = save_model(root / "hot", inject_stream_outliers)
    lora = f"{adapter}:0.8"
    run = subprocess.run(["make", "engines", f"MODEL={model}", "GPU=ampere", "QUANT=int4", f"WORK={root / 'work'}",
                          f"ENGINES={root / 'engines'}", f"LORA={lora}", *MAKE_SMALL], cwd=REPO, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root, run, lora


def _transformer(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@needs_rtx
def test_int4_make_engines_on_a_directory_keeps_islands_and_builds_sm86_sm89_sm120(int4_bundle):
    root, run, _ = int4_bundle
    assert "SM80 left out" in run.stderr
    report = json.loads((root / "work" / "calibration" / "calibration.json").read_text())
    assert report["format"] == "int4" and report["components"]["transformer"]["int4"]["passed"]
    layers = report["layers"]["transformer"]
    int4 = {name for name, got in layers.items() if got.startswith("int4")}
    islands = {i["module"] for i in report["fp32_islands"]["transformer"]}
    assert int4 and islands and not any(n.startswith(tuple(f"{i}." for i in islands)) for n in int4)
    assert all(layers[n].startswith("fp32") for n in layers if n.startswith(tuple(f"{i}." for i in islands)))

    exported = json.loads((root / "work" / "onnx-int4" / "transformer" / "manifest.json").read_text())
    check, traffic = exported["validation"], exported["traffic_check"]
    assert "int4 fake-quant" in check["reference"] and check["provider"] == "cpu"
    assert all(o["passed"] for o in check["outputs"].values()) and traffic["passed"]
    assert traffic["noise_pred"]["rel_l2_max"] < 0.05  # held-out calls vs FP32, as the issue asks
    rewrite = json.loads((root / "work" / "onnx-int4" / "transformer" / "4bit_rewrite.json").read_text())
    assert rewrite["int4_weights"] == len(int4)

    (model_folder,) = (root / "engines").glob("hot-lora-*")  # the LoRA model's own folder
    for gpu in ("ada", "blackwell"):  # Blackwell's transformer in two parts (a build box short of memory)
        parts = ["--parts", "transformer=2"] if gpu == "blackwell" else []
        built = cli("build", "--onnx", str(root / "work"), "--gpu", gpu, "--out", str(root / "engines"), *parts)
        assert built.returncode == 0, built.stderr[-3000:]
    for gpu, sms in (("ampere", ["8.6"]), ("ada", ["8.9"]), ("blackwell", ["12.0"])):
        manifest = _transformer(model_folder / f"{gpu}-tensorrt-rtx-int4")
        entry = manifest["components"]["transformer"]
        assert manifest["compute_capabilities"] == sms and entry["precision"] == "int4", (gpu, entry["reason"])
        assert len(entry.get("parts", [])) == (2 if gpu == "blackwell" else 0) and manifest["model"]["lora"]
        assert entry["layers"]["int4_weights"] == len(int4), (gpu, entry["layers"])  # every INT4 layer stays 4-bit
        assert entry["layers"]["island_gemm"] and entry["layers"]["island_gemm"] == entry["layers"]["island_gemm_fp32"]
        assert manifest["components"]["t5"]["fp32_islands"]


@needs_rtx
def test_int4_work_dir_runs_and_compares_in_onnxruntime(int4_bundle, tmp_path):
    root, _, lora = int4_bundle
    model = str(root / "hot")
    compared = cli("compare", "--onnx", str(root / "work"), "--model", model, "--lora", lora, "--variants", "int4",
                   "--prompts", "1", "--steps", "2", "--out", str(tmp_path / "c"))
    assert compared.returncode == 0, compared.stderr[-3000:]
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    e2e = data["end_to_end"]["int4"]
    assert e2e["runners"]["transformer"]["precision"] == "int4" and data["passed"]
    made = cli("generate", "--onnx", str(root / "work"), "--model", model, "--lora", lora, "--precision", "int4",
               "--prompt", "a fox", "--steps", "2", "--height", "512", "--width", "512", "--out", str(tmp_path / "fox.png"))
    assert made.returncode == 0 and (tmp_path / "fox.png").stat().st_size > 0, made.stderr[-2000:]


@needs_rtx
def test_nvfp4_builds_for_sm120_and_ada_is_told_why(tmp_path, capsys, adapter):
    """NVFP4 with the user's options at once: a Turbo model directory with a LoRA, CLIP-only, the transformer built
    in two parts, and doctor's 8 GB plan from the bundle's manifests."""
    from tests.outliers import save_model

    work, engines, lora = tmp_path / "w", tmp_path / "e", f"{adapter}:0.8"
    model = save_model(tmp_path / "my-sd3.5-turbo", preset="tiny-turbo")  # Turbo by its name, as a download is
    mine = ("--model", model, "--lora", lora, "--no-t5")
    small = ("--num-prompts", "4", "--height", "256", "--width", "256")
    for argv in (["calibrate", *mine, "--format", "nvfp4", "--out", work, *small],
                 ["export", *mine, "--out", work, "--gpu", "blackwell"],
                 ["build", "--onnx", work, "--gpu", "blackwell", "--out", engines, "--no-t5", "--parts",
                  "transformer=2"]):
        code, err = run_cli(capsys, argv)
        assert code == 0, err[-3000:]
    report = json.loads((work / "calibration" / "calibration.json").read_text())
    assert report["config"]["steps"] == 4 and report["model"]["lora"], "Turbo's traffic, the adapter fused"
    fp4 = [n for n, got in report["layers"]["transformer"].items() if got.startswith("nvfp4")]
    exported = json.loads((work / "onnx-nvfp4" / "transformer" / "manifest.json").read_text())
    assert "twin" in exported["validation"]["onnx_checked"] and exported["traffic_check"]["passed"]
    bundle = next(engines.glob("my-sd3.5-turbo-lora-*/blackwell-tensorrt-rtx-nvfp4-clip"))
    manifest = _transformer(bundle)
    entry = manifest["components"]["transformer"]
    assert entry["precision"] == "nvfp4" and entry["layers"]["fp4_weights"] == len(fp4) > 0, "every part's FP4 layers"
    assert len(entry["parts"]) == 2 and "t5" not in manifest["components"]
    from sd35trt.cli.main import main

    code = main(["doctor", str(bundle), "--vram", "8"])
    out, err = capsys.readouterr()
    assert code in (0, 3), err[-2000:]  # 3: no engine of it runs on this host (this box has no GPU), said in the report
    vram = json.loads(out)["vram"]  # the plan from the bundle's manifests, for its Turbo request
    assert (vram["request"]["guidance"], vram["request"]["steps"], vram["request"]["t5"]) == (0.0, 4, False), vram
    assert 0 < vram["plans_gib"]["resident"] < 8, vram
    code, err = run_cli(capsys, ["build", "--onnx", work, "--gpu", "ada", "--out", engines, "--no-t5"])
    assert_user_error(code, err, "only a nvfp4 onnx")


@needs_rtx
def test_int4_calibration_is_seeded_and_reproducible(int4_bundle):
    """`make calibrate` again, into another work dir, on the same directory and options: the same AWQ state."""
    import torch

    root, _, lora = int4_bundle
    again = root / "again"
    run = subprocess.run(["make", "calibrate", f"MODEL={root / 'hot'}", "GPU=ampere", "QUANT=int4", f"WORK={again}",
                          f"LORA={lora}", *MAKE_SMALL], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    first, second = (torch.load(w / "calibration" / "int4_state.pt", weights_only=True)["transformer"]
                     for w in (root / "work", again))
    assert first.keys() == second.keys() and first
    for layer in first:
        assert torch.equal(first[layer]["amax"], second[layer]["amax"]), layer
        assert torch.equal(first[layer]["pre_quant_scale"], second[layer]["pre_quant_scale"]), layer


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
