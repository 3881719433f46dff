"""What users run, where they run it: `make engines` on model *directories* (``save_pretrained`` of the tiny preset,
weights edited where it matters: LoRA, Turbo, CLIP-only, FP16 overflows at several boundaries and one that only
shows past calibration's inputs), then every command that takes ``--model`` on the same directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, needs_rtx
from tests.outliers import inject_ring_outliers, inject_stream_outliers, save_model

# Users' `make engines`, with a calibration small enough for CI (make's own knobs) and this interpreter.
MAKE_SMALL = ("NUM_PROMPTS=4", "STEPS=2", "SIZE=256", "SYSTEM_PYTHON=1", f"PYTHON={sys.executable}")
NOISE = ("Loading pipeline components", "FutureWarning", "deprecate(", "torch_dtype", "Traceback")


def make_engines(model: Path, root: Path, *extra: str, gpu: str = "ada") -> subprocess.CompletedProcess:
    run = subprocess.run(["make", "engines", f"MODEL={model}", f"GPU={gpu}", f"WORK={root / 'work'}",
                          f"ENGINES={root / 'engines'}", *MAKE_SMALL, *extra], cwd=REPO, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd35trt", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def bundle_of(root: Path) -> Path:
    found = sorted((root / "engines").glob("*/ada-tensorrt-rtx*"))  # -clip for a CLIP-only download
    assert len(found) == 1, found
    return found[0]


@needs_rtx
def test_make_engines_on_a_directory_with_lora_is_quiet_and_calibrates_by_model_size(user_model, user_work):
    root, run = user_work  # (a second test worker's make found every step current: still nothing noisy)
    noisy = [line for line in run.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy[:5]
    report = json.loads((root / "work" / "calibration" / "calibration.json").read_text())
    assert report["model"]["path"] == str(user_model.resolve()) and not report["random_weights"]
    assert (report["config"]["num_prompts"], report["config"]["steps"]) == (4, 2), "make's NUM_PROMPTS/STEPS"
    manifest = json.loads((bundle_of(root) / "manifest.json").read_text())
    assert manifest["components"]["transformer"]["precision"] == "fp8" and manifest["model"]["lora"][0]["scale"] == 0.8


@needs_rtx
def test_every_command_that_takes_model_takes_the_directory(user_model, user_work, adapter, capsys, tmp_path):
    """generate, compare, bench and preflight on the directory (with its LoRA, which the work dir was built with);
    the same directory refused where it must be: another model's weights, a size the model cannot take, a bundle
    on a host without its GPU."""
    from tests.test_bad_inputs import assert_user_error, run_cli

    root, _ = user_work
    work, out, lora = root / "work", tmp_path / "image.png", f"{adapter}:0.8"
    mine = ("--model", user_model, "--lora", lora)
    small = ("--steps", "2", "--height", "512", "--width", "512")
    assert run_cli(capsys, ["preflight", *mine, "--gpu", "ampere"])[0] == 0
    code, err = run_cli(capsys, ["generate", "--onnx", work, *mine, "--prompt", "a koi pond", *small, "--out", out])
    assert code == 0 and out.stat().st_size > 0, err[-2000:]
    code, err = run_cli(capsys, ["compare", "--onnx", work, *mine, "--prompts", "1", *small, "--out", tmp_path / "c",
                                 "--components", "transformer"])
    assert code == 0, err[-2000:]
    compared = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert compared["reference_device"] == "cpu" and "FP32" in compared["reference"] and compared["model"]["lora"]
    code, err = run_cli(capsys, ["bench", "--onnx", work, *mine, "--steps", "1", "--images", "1", "--loop-steps", "2",
                                 "--height", "512", "--width", "512", "--no-sample"])
    assert code == 0, err[-2000:]
    other = save_model(tmp_path / "other", lambda pipe: pipe.transformer.proj_out.weight.data.mul_(2))
    code, err = run_cli(capsys, ["generate", "--onnx", work, "--model", other, "--lora", lora, "--prompt", "x", *small,
                                 "--out", out])
    assert_user_error(code, err, "fingerprints differ")  # edited weights of the same size are another model
    code, err = run_cli(capsys, ["export", "--model", user_model, "--out", tmp_path / "w", "--height", "512:1024:2048"])
    assert_user_error(code, err, "takes at most 1536 px")
    code, err = run_cli(capsys, ["generate", "--bundle", bundle_of(root), "--prompt", "x", *small, "--out", out])
    assert_user_error(code, err, "cannot run on this host")
    assert "--onnx" in err


@needs_rtx
def test_a_directory_with_fp16_overflows_builds_and_compares_within_clean_tolerances(tmp_path_factory, capsys):
    """Overflows inside the last joint block, in its output stream (it feeds norm_out, also an island) and in T5's
    last feed-forward: make engines, then compare — FP16 and FP8 finite and within the clean model's tolerances."""
    import onnx

    from sd35trt.cli.main import main

    root = tmp_path_factory.mktemp("overflow")
    model, work = save_model(root / "overflowing", inject_stream_outliers), root / "work"
    make_engines(model, root)
    # the FP16 transformer too (what an FP16-fallback target builds), from the same calibration
    assert main(["export", "--model", str(model), "--out", str(work), "--precision", "fp16", "--components",
                 "transformer"]) == 0
    report = json.loads((work / "calibration" / "calibration.json").read_text())
    islands = {c: [i["module"] for i in v] for c, v in report["fp32_islands"].items()}
    assert islands["transformer"] == ["norm_out", "transformer_blocks.1"]
    assert islands["t5"] == ["encoder.block.1.layer.1", "encoder.final_layer_norm"]
    assert islands["clip_l"] == islands["clip_g"] == islands["vae_decoder"] == []
    census = json.loads((work / "calibration" / "census.json").read_text())["components"]
    assert census["transformer"]["transformer_blocks.1.ff.net.0.proj"]["out"] > 65504, "an overflow inside the block"
    assert 16384 < census["transformer"]["norm_out"]["in"] < 65504, "a stream past the margin, inside FP16"
    for name in ("transformer", "t5"):
        fp16 = report["fp16"][name]
        assert fp16["precision"] == "fp16", "FP16 with islands, not the FP32 last resort: " + fp16["reason"]
        assert not fp16["without_islands"]["passed"] and fp16["with_islands"]["passed"]
    for variant, name in (("onnx-fp16", "transformer"), ("onnx-fp16", "t5"), ("onnx-fp8", "transformer")):
        manifest = json.loads((work / variant / name / "manifest.json").read_text())
        assert manifest["traffic_check"]["passed"] and manifest["fp32_islands"], (variant, name)
        if name == "transformer":
            block = next(i for i in manifest["fp32_islands"] if i["module"] == "transformer_blocks.1")
            assert 1 in block["fp32_outputs"], "the stream into norm_out stays FP32"
            assert manifest["island_weights"].startswith("read from transformer/"), "FP32 weights from the files"
    graph = onnx.load(str(work / "onnx-fp16" / "transformer" / "model.onnx"))
    weights = [t for t in graph.graph.initializer if len(t.dims) == 2]
    fp32 = [t.name for t in weights if t.data_type == onnx.TensorProto.FLOAT]
    assert 0 < len(fp32) and len(weights) > 2 * len(fp32), "only the islands' weights are FP32"
    assert all(n.startswith("onnx::") or "transformer_blocks.1." in n or "norm_out." in n for n in fp32), fp32
    bundle = json.loads((bundle_of(root) / "manifest.json").read_text())
    for name in ("transformer", "t5"):
        layers = bundle["components"][name]["layers"]
        assert layers["island_gemm"] > 0 and layers["island_gemm_fp32"] == layers["island_gemm"], name
    assert bundle["components"]["transformer"]["layers"]["gemm_fp8"] > 0
    capsys.readouterr()
    code = main(["compare", "--onnx", str(work), "--model", str(model), "--prompts", "1", "--steps", "2",
                 "--out", str(root / "c"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-2000:]
    compared = json.loads(out)
    assert compared["passed"] and {"fp16", "fp8"} <= set(compared["end_to_end"])
    for variant in ("fp16", "fp8"):  # the clean model's bars: per-component tolerances and end-to-end PSNR
        assert compared["components"]["transformer"][variant]["outputs"]["noise_pred"]["passed"]
        assert compared["end_to_end"][variant]["passed"]


@needs_rtx
def test_an_overflow_past_calibrations_inputs_is_found_by_the_census_probes(tmp_path_factory, capsys):
    """A CLIP-only directory whose position table overflows only where images past 1024 px read it: calibration
    at 256 px (the tests' size; 512 px neither) never sees it, the census's range probes (1536 px) do; the 1024-px
    FP16 image is finite."""
    from sd35trt.core.probes import range_probes  # noqa: F401  (what the census ran)

    root = tmp_path_factory.mktemp("ring")
    model = save_model(root / "clip-only", inject_ring_outliers, clip_only=True)
    make_engines(model, root)
    census = json.loads((root / "work" / "calibration" / "census.json").read_text())
    assert any("1536x1536" in label for label in census["probes"]["transformer"])
    report = json.loads((root / "work" / "calibration" / "calibration.json").read_text())
    assert "pos_embed" in [i["module"] for i in report["fp32_islands"]["transformer"]]
    manifest = json.loads((bundle_of(root) / "manifest.json").read_text())
    assert "t5" not in manifest["components"] and manifest["t5"] is False, "a CLIP-only download builds CLIP-only"
    out = root / "big.png"
    from tests.test_bad_inputs import run_cli

    code, err = run_cli(capsys, ["generate", "--onnx", root / "work", "--model", model, "--prompt", "a harbour at dawn",
                                 "--steps", "1", "--height", "1024", "--width", "1024", "--out", out])
    assert code == 0, err[-2000:]
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(out)).astype(float)
    assert pixels.std() > 1.0, "not a blank (NaN) image"
