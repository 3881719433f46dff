import pytest
import torch

from sd35trt.core.assets import PipelineAssets
from sd35trt.core.errors import ArtifactError, InvalidInputError, RuntimeUnavailableError
from sd35trt.core.shapes import ShapeRanges
from sd35trt.runtime.pipeline import Sd35Loop
from sd35trt.runtime.request import GenerateRequest
from sd35trt.runtime.runners import runners_from_bundle, runners_from_onnx, runners_from_torch


def _diffusers(pipe, request):
    from sd35trt.core.presets import SD35_DEFAULTS

    request = request.resolved(SD35_DEFAULTS)
    out = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=request.steps,
               guidance_scale=request.guidance, height=request.height, width=request.width,
               generator=torch.Generator("cpu").manual_seed(request.seed), output_type="latent")
    return out.images


def test_torch_loop_is_bit_identical_to_diffusers(tiny_pipe):
    """Same math as StableDiffusion3Pipeline: tokenizers, CFG, FlowMatchEulerDiscreteScheduler, latents."""
    loop = Sd35Loop(PipelineAssets.of_pipeline(tiny_pipe), runners_from_torch(tiny_pipe), batch_text=False)
    request = GenerateRequest(prompt="a red fox in fresh snow", negative_prompt="blurry", steps=4, seed=3,
                              height=512, width=576)
    ours = loop(request, progress=False)
    assert torch.equal(_diffusers(tiny_pipe, request), ours.latents)
    batched = Sd35Loop(PipelineAssets.of_pipeline(tiny_pipe), runners_from_torch(tiny_pipe))(request, progress=False)  # one text-encoder call
    assert torch.allclose(batched.latents, ours.latents, rtol=0, atol=1e-4)
    assert ours.pil[0].size == (576, 512) and set(ours.timings) >= {"denoise_s", "text_encoders_s", "vae_decoder_s"}


def test_onnx_loop_matches_diffusers(tiny_pipe, exported):
    from sd35trt.core.metrics import psnr

    out, _ = exported
    found = runners_from_onnx(out, "fp32")
    assert {r.kind for r in found.runners.values()} == {"onnxruntime"}
    request = GenerateRequest(prompt="a lighthouse on a basalt cliff", steps=3, seed=1, height=512, width=512)
    ours = Sd35Loop(PipelineAssets.of_pipeline(tiny_pipe), found.runners, found.ranges, batch_text=False)(request, progress=False)
    ref = _diffusers(tiny_pipe, request)
    assert psnr(ref.numpy(), ours.latents.numpy(), data_range=float(ref.max() - ref.min())) > 60


def test_no_guidance_and_batch(tiny_pipe):
    loop = Sd35Loop(PipelineAssets.of_pipeline(tiny_pipe), runners_from_torch(tiny_pipe))
    out = loop(GenerateRequest(prompt="cat", guidance=1.0, steps=2, batch=2, height=512, width=512), progress=False)
    assert out.latents.shape == (2, 16, 64, 64) and len(out.pil) == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "--steps 0"), ({"guidance": float("nan")}, "--guidance nan"), ({"height": 1000}, "try 1024"),
    ({"batch": 0}, "--batch 0"),
])
def test_bad_requests(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        GenerateRequest(prompt="x", **kwargs)


def test_request_outside_exported_ranges(tiny_pipe):
    loop = Sd35Loop(PipelineAssets.of_pipeline(tiny_pipe), runners_from_torch(tiny_pipe), ShapeRanges(), vae_tiling="off")
    with pytest.raises(InvalidInputError, match="height 2048 outside 512..1536"):
        loop.check(GenerateRequest(prompt="x", height=2048))
    loop.check(GenerateRequest(prompt="x", height=1024, width=1024))
    with pytest.raises(InvalidInputError, match="larger than the VAE decoder takes whole"):  # tiles past 1024 px
        loop.check(GenerateRequest(prompt="x", height=1344, width=768))


def test_long_prompt_warns_with_the_words_it_drops(tiny_pipe, capsys):
    """A 5000-character prompt names, per encoder kind, the real text past the token limit (never the padding of
    the empty negative prompt, never twice); an ordinary 216-character prompt is not cut."""
    from sd35trt.core.prompts import DEFAULT_PROMPTS

    lines = DEFAULT_PROMPTS.read_text().splitlines()
    long_prompt = " ".join(lines)[:5000]
    loop = Sd35Loop(PipelineAssets.of_pipeline(tiny_pipe), runners_from_torch(tiny_pipe))
    loop(GenerateRequest(prompt=long_prompt, steps=1, height=512, width=512), progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("truncated to 77 CLIP tokens") == 1 and err.count("truncated to 256 T5 tokens") == 1
    assert "<|endoftext|>" not in err and "<pad>" not in err
    clip_dropped = err.split("truncated to 77 CLIP tokens (as diffusers does); dropped: '")[1].split("'")[0]
    assert len(clip_dropped) > 40 and clip_dropped.rstrip("…") in long_prompt, "the prompt's own words, verbatim"
    ordinary = next(line for line in lines if 200 <= len(line) <= 230)
    loop(GenerateRequest(prompt=ordinary, steps=1, height=512, width=512), progress=False)
    assert "truncated" not in capsys.readouterr().err


def test_bundle_cannot_run_without_gpu_and_points_to_onnx(calibrated, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    from sd35trt.core.host import local_compute_capability
    from sd35trt.producers.bundle import BuildConfig, build_bundle

    if local_compute_capability() is not None:
        pytest.skip("this host has a GPU; the refusal is for GPU-less hosts")
    out, _ = calibrated
    bundle = build_bundle(out, tmp_path, BuildConfig(components=("clip_l",))).folder
    with pytest.raises(RuntimeUnavailableError, match=f"no CUDA GPU.*--onnx {out}"):
        runners_from_bundle(bundle)


@pytest.mark.gpu
def test_engine_runner_executes_on_a_matching_gpu(calibrated, tmp_path):
    """Build the tiny bundle for this host's GPU with whichever backend can, and generate through its engines."""
    from sd35trt.core.errors import Sd35TrtError
    from sd35trt.core.host import local_compute_capability, resolve_target
    from sd35trt.core.targets import Backend, GpuTarget
    from sd35trt.producers.trt_builder import choose_backend

    if local_compute_capability() is None:
        pytest.skip("no CUDA GPU on this host: engines cannot be executed here (CI has none)")
    try:
        choose_backend(Backend.AUTO, resolve_target(GpuTarget.AUTO))
    except Sd35TrtError as err:  # e.g. the GPU machine here: CC 9.0, which TensorRT-RTX refuses, and no TensorRT
        pytest.skip(f"no installed backend builds engines for this GPU: {err}")
    from sd35trt.cli.main import main

    out, _ = calibrated
    assert main(["build", "--gpu", "auto", "--onnx", str(out), "--out", str(tmp_path / "engines")]) == 0
    bundle = next((tmp_path / "engines" / "tiny").iterdir())
    image = tmp_path / "x.png"
    assert main(["generate", "--bundle", str(bundle), "--prompt", "a cat", "--steps", "2", "--height", "512",
                 "--width", "512", "--out", str(image)]) == 0
    assert image.stat().st_size > 0


@pytest.mark.gpu
def test_selftest_passes_on_this_gpu(tmp_path):
    """`sd35trt selftest` under pytest: calibrate, export, build for this GPU, generate, compare (polygraphy's
    TrtRunner and ours), and engines built in parts compared the same way — every step must pass where a backend
    builds for the local GPU."""
    from sd35trt.checks.selftest import run_selftest
    from sd35trt.core.errors import Sd35TrtError
    from sd35trt.core.host import local_compute_capability, resolve_target
    from sd35trt.core.targets import Backend, GpuTarget
    from sd35trt.producers.trt_builder import choose_backend

    if local_compute_capability() is None:
        pytest.skip("no CUDA GPU on this host: engines cannot be executed here (CI has none)")
    try:
        choose_backend(Backend.AUTO, resolve_target(GpuTarget.AUTO))
    except Sd35TrtError as err:
        pytest.skip(f"no installed backend builds engines for this GPU: {err}")
    report = run_selftest(tmp_path)
    assert report.passed, report.table()


def test_engine_io_dtypes_and_profiles_against_the_real_bindings():
    """The TensorRT adapter's pure policies, checked against TensorRT-RTX's own enums (no engine runs here)."""
    from sd35trt.runtime.session import IO_DTYPES, profile_problem
    from sd35trt.runtime.trt import TRT_TYPES, graph_mode

    trt = pytest.importorskip("tensorrt_rtx_bindings")
    for member, name in ((trt.DataType.FLOAT, "float32"), (trt.DataType.HALF, "float16"), (trt.DataType.BF16, "bfloat16"),
                         (trt.DataType.INT64, "int64"), (trt.DataType.INT32, "int32"), (trt.DataType.BOOL, "bool")):
        assert TRT_TYPES[member.name] == name and name in IO_DTYPES
    assert trt.DataType.FP8.name not in TRT_TYPES, "an FP8 I/O tensor is refused by name at load"
    assert graph_mode("tensorrt-rtx", False) == graph_mode("tensorrt", False) == "off"
    assert graph_mode("tensorrt-rtx", True) == "runtime" and graph_mode("tensorrt", True) == "capture"
    assert hasattr(trt.CudaGraphStrategy, "WHOLE_GRAPH_CAPTURE")
    assert hasattr(trt.ExecutionContextAllocationStrategy, "USER_MANAGED")
    profile = [(2, 16, 64, 64), (2, 16, 128, 128), (8, 16, 192, 192)]
    assert profile_problem("hidden_states", (2, 16, 128, 96), profile) is None
    assert profile_problem("hidden_states", (2, 16, 256, 128), profile) == \
        "input hidden_states shape (2, 16, 256, 128) is outside the engine's profile (2, 16, 64, 64)..(8, 16, 192, 192)"


def test_onnx_runner_refuses_modified_files(work_copy):
    path = work_copy / "onnx" / "t5" / "model.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="differs from manifest"):
        runners_from_onnx(work_copy, "fp32", components=("t5",))


def test_bench_command_on_onnx_runners(capsys, exported):
    import json

    from sd35trt.cli.main import main

    out, _ = exported
    args = ["bench", "--onnx", str(out), "--precision", "fp32", "--steps", "3", "--loop-steps", "2", "--images", "1",
            "--height", "512", "--width", "512"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "step ms" in summary and "img/s" in summary and "512x512, 2 steps, guidance 4.5" in summary
    assert "\x1b[" not in summary, "a plain table on stdout"
    code = main([*args, "--json"])
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert code == 0
    assert row["transformer_step_ms"]["timed_steps"] == 3 and row["transformer_step_ms"]["median"] > 0
    assert row["transformer_step_ms"]["batch_with_cfg"] == 2
    assert row["images_per_s"] > 0 and row["runners"]["transformer"]["kind"] == "onnxruntime"
    from sd35trt.core.onnx_utils import _cuda_ep_usable

    # --provider auto (the default) runs on CUDA exactly when onnxruntime-gpu sees a GPU.
    expected = "cpu" if _cuda_ep_usable() else "cuda"
    assert {r["provider"] for r in row["runners"].values()} == {expected}


def test_selftest_without_gpu_is_one_line(capsys, tmp_path):
    from tests.test_bad_inputs import assert_user_error, run_cli

    code, err = run_cli(capsys, ["selftest", "--out", tmp_path / "st"])
    assert_user_error(code, err, "selftest needs an NVIDIA GPU and this host has none")


def test_selftest_stops_at_the_first_failure_with_its_reason(capsys, tmp_path, monkeypatch):
    """A driver that reports an SM89 GPU torch cannot use: target passes (TensorRT-RTX builds SM89), calibrate
    fails with the real reason, nothing after it runs, and the report says so (table, JSON, exit 1)."""
    import json

    import sd35trt.core.host as host
    import sd35trt.producers.bundle as build
    import sd35trt.producers.trt_builder as backends
    from sd35trt.cli.main import main

    for module in (backends, build, host):
        monkeypatch.setattr(module, "local_compute_capability", lambda: (8, 9))
    code = main(["selftest", "--out", str(tmp_path / "st")])
    out = capsys.readouterr().out
    assert code == 1
    report = json.loads((tmp_path / "st" / "selftest.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["target", "calibrate", "export", "build", "generate", "compare",
                                                    "parts"]
    assert not report["passed"] and [s["passed"] for s in report["steps"]] == [True] + [False] * 6
    assert report["steps"][0]["passed"] and "ada (SM89), tensorrt-rtx" in report["steps"][0]["detail"]
    assert "torch sees no CUDA GPU" in report["steps"][1]["detail"]
    assert report["steps"][2]["detail"] == "not run (after calibrate failed)"
    assert "calibrate  FAIL" in out and out.strip().endswith(f"wrote {tmp_path / 'st' / 'selftest.json'}")
