"""What users run, where they run it: `make engines` on model *directories* (``save_pretrained`` of the tiny preset,
weights edited where it matters: LoRA, Turbo, CLIP-only, FP16 overflows at several boundaries and one that only
shows past calibration's inputs), then every command that takes ``--model`` on the same directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, needs_rtx
from tests.outliers import inject_ring_outliers, inject_stream_outliers, save_model

# Users' `make engines`, with a calibration small enough for CI (make's own knobs) and this interpreter.
MAKE_SMALL = ("NUM_PROMPTS=4", "STEPS=2", "SYSTEM_PYTHON=1", f"PYTHON={sys.executable}")
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
    found = sorted((root / "engines").glob("*/ada-tensorrt-rtx"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """`make engines MODEL=<a saved tiny SD3.5>`, as a user with a downloaded diffusers directory runs it."""
    root = tmp_path_factory.mktemp("plain")
    model = save_model(root / "sd3.5-mine")
    return model, root, make_engines(model, root)


@needs_rtx
def test_make_engines_on_a_directory_is_quiet_and_calibrates_by_model_size(plain):
    model, root, run = plain
    noisy = [line for line in run.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy[:5]
    report = json.loads((root / "work" / "calibration" / "calibration.json").read_text())
    assert report["model"]["path"] == str(model.resolve()) and not report["random_weights"]
    manifest = json.loads((bundle_of(root) / "manifest.json").read_text())
    assert manifest["components"]["transformer"]["precision"] == "fp8" and manifest["model"]["path"] == str(model.resolve())


@needs_rtx
def test_every_command_that_takes_model_takes_the_directory(plain, tmp_path):
    model, root, _ = plain
    work, out = root / "work", tmp_path / "image.png"
    small = ("--steps", "2", "--height", "512", "--width", "512")
    assert cli("preflight", "--model", str(model), "--gpu", "ampere").returncode == 0
    run = cli("generate", "--onnx", str(work), "--model", str(model), "--prompt", "a koi pond", *small, "--out", str(out))
    assert run.returncode == 0 and out.stat().st_size > 0, run.stderr[-2000:]
    run = cli("compare", "--onnx", str(work), "--model", str(model), "--prompts", "1", *small, "--out", str(tmp_path / "c"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    compared = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert compared["reference_device"] == "cpu" and "FP32" in compared["reference"]
    run = cli("bench", "--onnx", str(work), "--model", str(model), "--steps", "1", "--images", "1", "--loop-steps", "2",
              "--height", "512", "--width", "512", "--no-sample")
    assert run.returncode == 0, run.stderr[-2000:]
    # the same directory refused where it must be: another model's artifacts, a size the model cannot take
    other = save_model(tmp_path / "other", lambda pipe: pipe.transformer.proj_out.weight.data.mul_(2))
    run = cli("generate", "--onnx", str(work), "--model", str(other), "--prompt", "x", *small, "--out", str(out))
    assert run.returncode == 2 and "fingerprints differ" in run.stderr and "Traceback" not in run.stderr
    run = cli("export", "--model", str(model), "--out", str(tmp_path / "w"), "--height", "512:1024:2048")
    assert run.returncode == 2 and "takes at most 1536 px" in run.stderr
    run = cli("generate", "--bundle", str(bundle_of(root)), "--prompt", "x", *small, "--out", str(out))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "--onnx" in run.stderr


@needs_rtx
def test_a_directory_with_fp16_overflows_builds_and_compares_within_clean_tolerances(tmp_path_factory):
    """Overflows inside the last joint block, in its output stream (it feeds norm_out, also an island) and in T5's
    last feed-forward: make engines, then compare — FP16 and FP8 finite and within the clean model's tolerances."""
    root = tmp_path_factory.mktemp("overflow")
    model = save_model(root / "overflowing", inject_stream_outliers)
    make_engines(model, root)
    make_engines(model, root, gpu="ampere")  # the FP16 transformer too (its FP16 fallback bundle), same calibration
    report = json.loads((root / "work" / "calibration" / "calibration.json").read_text())
    islands = {c: [i["module"] for i in v] for c, v in report["fp32_islands"].items()}
    assert islands["transformer"] == ["norm_out", "transformer_blocks.1"]
    assert islands["t5"] == ["encoder.block.1.layer.1", "encoder.final_layer_norm"]
    manifest = json.loads((root / "work" / "onnx-fp8" / "transformer" / "manifest.json").read_text())
    block = next(i for i in manifest["fp32_islands"] if i["module"] == "transformer_blocks.1")
    assert 1 in block["fp32_outputs"], "the stream into norm_out stays FP32"
    assert report["fp16"]["transformer"]["precision"] == "fp16", "FP16 with islands, not the FP32 last resort"
    run = cli("compare", "--onnx", str(root / "work"), "--model", str(model), "--prompts", "1", "--steps", "2",
              "--out", str(root / "c"), "--json")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    compared = json.loads(run.stdout)
    assert compared["passed"] and {"fp16", "fp8"} <= set(compared["end_to_end"])
    for variant in ("fp16", "fp8"):  # the clean model's bars: per-component tolerances and end-to-end PSNR
        assert compared["components"]["transformer"][variant]["outputs"]["noise_pred"]["passed"]
        assert compared["end_to_end"][variant]["passed"]


@needs_rtx
def test_an_overflow_past_calibrations_inputs_is_found_by_the_census_probes(tmp_path_factory):
    """A CLIP-only directory whose position table overflows only where images past 1024 px read it: calibration
    at 512 px never sees it, the census's range probes (1536 px) do; the 1024-px FP16 image is finite."""
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
    run = cli("generate", "--onnx", str(root / "work"), "--model", str(model), "--prompt", "a harbour at dawn",
              "--steps", "2", "--height", "1024", "--width", "1024", "--out", str(out), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(out)).astype(float)
    assert pixels.std() > 1.0, "not a blank (NaN) image"
