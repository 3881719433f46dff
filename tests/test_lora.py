"""LoRA on FP8 engines (#26): a style adapter made here with PEFT and saved with diffusers' save_lora_weights,
fused by diffusers' own SD3 LoRA loader before calibration; every cache key carries it; bad files are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd35trt.core.models import build_pipeline, resolve_model
from tests.conftest import needs_rtx


def make_adapter(dest: Path, *, seed: int = 0, config: dict | None = None) -> Path:
    """A LoRA on the tiny transformer's attention projections, random (non-zero) up-projections."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from sd35trt.core.presets import TINY

    transformer = SD3Transformer2DModel(**{**TINY.transformer, **(config or {})})
    with torch.random.fork_rng():  # PEFT draws lora_A from the global generator: seeded, so the adapter is one file
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.4)
    StableDiffusion3Pipeline.save_lora_weights(dest, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return dest / "pytorch_lora_weights.safetensors"


def test_lora_changes_the_model_and_is_part_of_its_identity(adapter):
    from sd35trt.core.assets import PipelineAssets
    from sd35trt.core.metrics import error_stats
    from sd35trt.runtime.pipeline import Sd35Loop
    from sd35trt.runtime.request import GenerateRequest
    from sd35trt.runtime.runners import runners_from_torch

    base, styled = resolve_model("tiny"), resolve_model("tiny", lora=f"{adapter}:0.8")
    assert "lora" not in base.describe() and resolve_model("tiny", lora="").fingerprint() == base.fingerprint()
    assert styled.fingerprint() != base.fingerprint() != resolve_model("tiny", lora=f"{adapter}:0.5").fingerprint()
    assert styled.describe()["lora"][0]["scale"] == 0.8 and styled.slug.startswith("tiny-lora-")
    latents = []
    for source in (base, styled):
        pipe = build_pipeline(source)
        assert not any("lora" in n for n, _ in pipe.transformer.named_parameters()), "fused, adapter layers gone"
        loop = Sd35Loop(PipelineAssets.of_pipeline(pipe), runners_from_torch(pipe))
        latents.append(loop(GenerateRequest(prompt="a koi pond", steps=2, height=512, width=512), progress=False).latents)
    assert error_stats(latents[0].numpy(), latents[1].numpy()).rel_l2 > 1e-2, "the adapter changes the image"


def test_island_weights_of_a_directory_with_lora_are_built_off_the_gpu(user_model, adapter):
    """Export builds a network in FP16 on its device and takes its islands' FP32 weights from a second, FP32 build
    when LoRA is fused. For a directory that copy is built on the CPU whatever the export's device (SD3.5-Large: 32
    GB that would sit on the GPU beside the FP16 network): asked for ``cuda`` on this GPU-less host, it still comes
    back, with the adapter fused in."""
    from sd35trt.core.models import island_weights
    from sd35trt.core.numerics import Island

    styled, base = resolve_model(str(user_model), lora=f"{adapter}:0.8"), resolve_model(str(user_model))
    block = Island("transformer_blocks.0", 1e5, "test")
    tensors, where = island_weights(styled, "transformer", [block], device="cuda")
    assert where == "the transformer network built in FP32"
    fused = dict(build_pipeline(styled, dtype=torch.float32).transformer.named_parameters())
    plain = dict(build_pipeline(base, dtype=torch.float32).transformer.named_parameters())
    query = "transformer_blocks.0.attn.to_q.weight"
    assert set(tensors) >= {query} and all(k.startswith("transformer_blocks.0.") for k in tensors)
    assert all(t.device.type == "cpu" and torch.equal(t, fused[k]) for k, t in tensors.items())
    assert not torch.equal(tensors[query], plain[query]), "the adapter is fused into the island's weights"


@pytest.fixture(scope="module")
def lora_work(user_work):
    return user_work[0] / "work"


@pytest.fixture(scope="module")
def lora_model(user_model):
    return user_model


@needs_rtx
def test_fp8_onnx_with_lora_matches_the_fused_torch_model(lora_work, lora_model, adapter, capsys, tmp_path):
    from sd35trt.cli.main import main

    manifest = json.loads((lora_work / "onnx-fp8" / "transformer" / "manifest.json").read_text())
    assert manifest["model"]["lora"][0]["file"] == adapter.name, "keyed on the adapter"
    assert manifest["validation"]["outputs"]["noise_pred"]["passed"] and manifest["traffic_check"]["passed"]
    calibration = json.loads((lora_work / "calibration" / "calibration.json").read_text())
    assert calibration["model"]["lora"][0]["sha256"] == manifest["model"]["lora"][0]["sha256"]
    capsys.readouterr()
    assert main(["compare", "--onnx", str(lora_work), "--model", str(lora_model), "--lora", f"{adapter}:0.8",
                 "--components", "transformer", "--prompts", "1", "--steps", "2", "--out", str(tmp_path / "cmp"),
                 "--no-t5"]) == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["passed"] and data["model"]["lora"], "compared against the same fused pipeline"


@needs_rtx
def test_artifacts_of_one_adapter_are_never_used_for_another(lora_work, lora_model, adapter, capsys, tmp_path):
    from tests.test_bad_inputs import assert_user_error, run_cli

    for args in ([], ["--lora", str(make_adapter(tmp_path / "other", seed=1))]):
        code, err = run_cli(capsys, ["export", "--model", lora_model, *args, "--out", lora_work, "--components",
                                     "transformer"])
        assert_user_error(code, err, "artifacts were built from model")
        code, err = run_cli(capsys, ["generate", "--onnx", lora_work, "--model", lora_model, *args, "--prompt", "x",
                                     "--steps", "1", "--height", "512", "--width", "512", "--out", tmp_path / "x.png"])
        assert_user_error(code, err, "fingerprints differ")


@needs_rtx
def test_a_lora_bundle_has_its_own_folder(lora_work):
    engines = lora_work.parent / "engines"
    folders = [p.name for p in engines.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(folders) == 1 and folders[0].startswith("mine-lora-")
    manifest = json.loads((engines / folders[0] / "ada-tensorrt-rtx" / "manifest.json").read_text())
    assert manifest["model"]["lora"][0]["scale"] == 0.8 and manifest["components"]["transformer"]["precision"] == "fp8"


def test_bad_adapters_are_one_line_naming_the_file(tmp_path, capsys, adapter, lora_model):
    from safetensors.torch import save_file

    from tests.test_bad_inputs import assert_user_error, run_cli

    (tmp_path / "notes.txt").write_text("not a tensor file")
    save_file({"transformer.proj_out.weight": torch.zeros(2, 2)}, str(tmp_path / "checkpoint.safetensors"))
    wrong = make_adapter(tmp_path / "wrong", config={"attention_head_dim": 8})  # another architecture's shapes
    cases = [(tmp_path / "missing.safetensors", "LoRA adapter not found"),
             (tmp_path / "notes.txt", "not a safetensors file"),
             (tmp_path / "checkpoint.safetensors", "holds no LoRA weights"),
             (wrong, "does not fit this model")]
    for path, message in cases:
        code, err = run_cli(capsys, ["calibrate", "--model", lora_model, "--lora", str(path), "--out", tmp_path / "w",
                                     "--num-prompts", "1", "--steps", "1", "--holdout", "1", "--calib-batch", "1"])
        assert_user_error(code, err, message)
        assert str(path.name) in err
    code, err = run_cli(capsys, ["preflight", "--lora", f"{adapter}:x0.8"])
    assert_user_error(code, err, "LoRA scale 'x0.8' is not a number")  # the scale is bad, the file is there


@needs_rtx
def test_refittable_builds_need_a_gpu_here_and_say_so(calibrated, capsys, tmp_path):
    """TensorRT-RTX builds refittable and weight-stripped plans only with a CUDA driver (it JIT-compiles them):
    on the CPU box that is one line naming the cause, and nothing is left behind. The GPU machine builds them
    (docs/BENCHMARKS.md: stripped vs full plan sizes)."""
    from sd35trt.core.host import local_compute_capability
    from tests.test_bad_inputs import assert_user_error, run_cli

    if local_compute_capability() is not None:
        pytest.skip("this host has a GPU: the refittable build is measured in bench/")
    out, _ = calibrated
    code, err = run_cli(capsys, ["build", "--onnx", out, "--out", tmp_path / "e", "--components", "clip_l",
                                 "--strip-weights"])
    assert_user_error(code, err, "needs a CUDA driver (TensorRT-RTX builds refittable or weight-stripped plans only")
    assert not list((tmp_path / "e").rglob("*.plan"))
