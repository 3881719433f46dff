"""SD3.5 on the GPUs people have: VRAM plans (resident / sequential / streaming), CLIP-only bundles, Turbo, and
tiled VAE decode — on the tiny model through onnxruntime, and the plans on the manifests of real-size bundles
built on the GPU machine (bench/results: engine sizes measured, random weights)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sd35trt.core.errors import InvalidInputError
from sd35trt.runtime.vram import GIB, Need, choose_plan
from tests.conftest import REPO, needs_rtx

RESULTS = REPO / "bench" / "results"
MEDIUM_BUNDLE = RESULTS / "2026-11-22-h100-run6" / "sd3.5-medium-make_engines" / "engines" / "sd3.5-medium" / "ada-tensorrt-rtx"
LARGE_FP8_TRANSFORMER = RESULTS / "2026-11-22-h100-run8" / "engines-fp8-transformer-p1"
T5_FP8 = RESULTS / "2026-11-22-h100-run7" / "t5-fp8" / "engines-fp8-t5" / "sd3.5-medium" / "ada-tensorrt-rtx"
LARGE_INT4 = RESULTS / "2026-12-05-h200-r16" / "fourbit-sd3.5-large-int4" / "bundle.json"
LARGE_INT4_FITTED = RESULTS / "2026-12-05-h200-r21" / "fourbit-sd3.5-large-int4-clip-fit-int8" / "bundle.json"


def _needs(**sizes_gb: float) -> dict[str, Need]:
    act = {"transformer": 0.6, "clip_l": 0.01, "clip_g": 0.02, "t5": 0.1, "vae_decoder": 1.3}
    return {n: Need(n, int(gb * 1e9), int(act[n] * GIB), streamable=n == "transformer") for n, gb in sizes_gb.items()}


def test_each_plan_is_chosen_at_its_budget_and_a_misfit_is_one_line():
    medium = _needs(transformer=2.35, clip_l=0.25, clip_g=1.40, t5=9.53, vae_decoder=0.10)
    assert choose_plan(medium, 24 * GIB).mode == "resident"
    assert choose_plan(medium, 12 * GIB).mode == "sequential"  # 13.6 GB at once; T5 alone is 9.5
    with pytest.raises(InvalidInputError, match=r"does not fit 8.0 GiB of GPU memory: it needs at least 9.\d GiB"):
        choose_plan(medium, 8 * GIB)  # T5-XXL alone is larger, and only the transformer streams
    with pytest.raises(InvalidInputError, match="largest network is t5.*drop T5"):
        choose_plan(medium, 8 * GIB)
    clip_only = {k: v for k, v in medium.items() if k != "t5"}
    assert choose_plan(clip_only, 8 * GIB).mode == "resident"
    large = _needs(transformer=8.87, clip_l=0.25, clip_g=1.40, vae_decoder=0.10)
    plan = choose_plan(large, 8 * GIB)
    assert plan.mode == "streaming" and plan.peak <= 8 * GIB
    assert 0 < plan.streaming_budget < large["transformer"].weights
    assert choose_plan(large, 16 * GIB).mode == "resident"
    assert choose_plan(large, 16 * GIB, "sequential").mode == "sequential"
    with pytest.raises(InvalidInputError, match="--vram-plan resident"):
        choose_plan(large, 8 * GIB, "resident")
    no_stream = {k: Need(k, v.weights, v.activations, False) for k, v in large.items()}
    with pytest.raises(InvalidInputError, match="largest network is transformer.*build --weight-streaming"):
        choose_plan(no_stream, 8 * GIB)


def _doctor(capsys, folder: Path, vram: float) -> dict:
    from sd35trt.cli.main import main

    assert main(["doctor", str(folder), "--vram", str(vram)]) in (0, 3)
    return json.loads(capsys.readouterr().out)


def _todays_vae(manifest: dict) -> dict:
    """bench/vram_plans.py's ``with_todays_vae``: the bundle with today's default VAE decoder profile."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vram_plans", REPO / "bench" / "vram_plans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.with_todays_vae(manifest)


def test_doctor_plans_real_size_bundles_from_their_manifests(capsys, tmp_path):
    """The VRAM each plan needs, from the manifests of the SD3.5 bundles built on the GPU machine (runs 6-8; the
    engines themselves were not kept), counting what the engines allocate (their profiles' largest activations). As
    built, the VAE decoder's profile (4 images up to 1536 px) alone needs ~23 GiB: nothing fits 8 GB. With the VAE
    profile export builds now (1 image up to 1024 px, tiles above): Medium FP8 CLIP-only fits 8 GB resident, Large
    FP8 CLIP-only fits 8 GB with streaming (its transformer alone is 8.87 GB)."""
    medium = json.loads((MEDIUM_BUNDLE / "manifest.json").read_text())

    def doctor(name: str, manifest: dict) -> dict:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return _doctor(capsys, folder, 8)["vram"]

    clip_only = {**medium, "components": {k: v for k, v in medium["components"].items() if k != "t5"}}
    size = sum(v["bytes"] for v in clip_only["components"].values())
    assert size <= 4.5e9, "the CLIP-only Medium FP8 bundle"
    as_built = doctor("medium-clip-only", clip_only)
    assert as_built["plan"] is None and as_built["needs"]["vae_decoder"]["activations_gib"] > 20
    report = doctor("medium-clip-only-today", _todays_vae(clip_only))
    assert report["plan"]["mode"] == "resident" and report["plan"]["peak_gib"] <= 8
    assert report["needs"]["vae_decoder"]["activations_gib"] < 3
    full = doctor("medium-today", _todays_vae(medium))
    assert "error" in full and "does not fit 8.0 GiB" in full["error"]
    t5_fp8 = json.loads((T5_FP8 / "manifest.json").read_text())["components"]["t5"]
    assert size + t5_fp8["bytes"] <= 10e9
    large = json.loads((LARGE_FP8_TRANSFORMER / "manifest.json").read_text())
    streamable = {**large["components"]["transformer"], "weight_streaming": True}
    parts = {"transformer": streamable, **{k: medium["components"][k] for k in ("clip_l", "clip_g", "vae_decoder")}}
    plan = doctor("large-clip-only-today", _todays_vae({**large, "components": parts}))["plan"]
    assert plan["mode"] == "streaming" and plan["peak_gib"] <= 8


def test_doctor_names_the_ranges_that_fit_large_int4_clip_only_on_8_gb(capsys, tmp_path):
    """SD3.5-Large INT4 built on the H200 (round 16: `make engines MODEL=sd3.5-large GPU=ada QUANT=int4`), without
    its T5: at the default ranges (4 images up to 1536 px) the transformer engine holds 4.7 GiB of activations beside
    its 4.7 GiB of weights, so no plan fits 8 GiB, and the one-line hint names the ranges, not the request; the
    ranges that end at one 1024 px image fit it one network at a time, without weight streaming. Round 21 built
    that bundle (those ranges; CLIP-L/CLIP-G INT8, which one network at a time leaves out of the peak, the
    transformer's): its own manifests give the plan the estimate said."""
    from sd35trt.cli.main import main

    def doctor_on(bundle: Path, name: str) -> dict:
        folder = tmp_path / name / "sd3.5-large" / "ada-tensorrt-rtx-int4"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(bundle.read_text())
        assert main(["doctor", str(folder), "--vram", "8", "--no-t5"]) == 3  # the H200 cannot run SM89 engines
        return json.loads(capsys.readouterr().out)["vram"]

    report = doctor_on(LARGE_INT4, "default-ranges")
    assert report["needs"]["transformer"]["weights_gib"] <= 5.2  # the bar for the INT4 engine
    assert report["plan"] is None and "largest shapes" in report["error"] and "BATCH=" in report["error"]
    fitted = report["fitted_ranges"]
    assert fitted["make"] == "BATCH=1:1:1 HEIGHT=512:1024:1024 WIDTH=512:1024:1024"
    assert fitted["plan"] == "sequential" and fitted["peak_gib"] <= 8 and fitted["plans_gib"]["streaming"] is None
    built = doctor_on(LARGE_INT4_FITTED, "fitted-ranges")["plan"]
    assert built["mode"] == "sequential" and built["peak_gib"] <= 8 and built["streaming_budget_gib"] is None
    assert abs(built["peak_gib"] - fitted["peak_gib"]) <= 0.1  # the estimate, against the engines built to it


def test_tiled_decode_blends_overlapping_tiles_close_to_the_whole_decode():
    """The tiny VAE (random weights): tiles of 768 px over a 1024² image against the whole decode, and against
    diffusers' own tiled decode at the same tile size. The decoder's GroupNorm statistics and mid-block attention
    span the whole image, so no tiling is exact; ours is measured here and must beat diffusers'."""
    from sd35trt.core.metrics import error_stats
    from sd35trt.core.models import build_pipeline, resolve_model
    from sd35trt.runtime.tiling import tile_starts, tiled_decode

    assert tile_starts(256, 128, 32) == [0, 96, 128] and tile_starts(128, 128, 32) == [0]
    vae = build_pipeline(resolve_model("tiny"), components=set()).vae
    z = torch.randn(1, 16, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
        ours = tiled_decode(lambda t: vae.decode(t, return_dict=False)[0], z, tile=96, scale=8)
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = 768, 96
        theirs = vae.decode(z, return_dict=False)[0]
    mine, diffusers = error_stats(whole.numpy(), ours.numpy()), error_stats(whole.numpy(), theirs.numpy())
    assert ours.shape == whole.shape and mine.nonfinite == 0
    assert mine.rel_l2 < 0.02 and mine.rel_l2 < diffusers.rel_l2, (mine, diffusers)


def test_a_1536_image_from_a_vae_profile_capped_at_768(tmp_path, tiny_source):
    """An ONNX VAE decoder exported to take at most 768 px per side decodes a 1536² image in tiles, every call
    inside its profile (onnxruntime enforces it as an engine would), two images one after another (its profile
    takes one)."""
    from sd35trt.core.assets import load_assets
    from sd35trt.core.shapes import Range, ShapeRanges
    from sd35trt.core.specs import SPECS, Precision
    from sd35trt.producers.export import ExportConfig, export_model
    from sd35trt.runtime.pipeline import Sd35Loop
    from sd35trt.runtime.request import GenerateRequest
    from sd35trt.runtime.runners import ComponentRunner, runners_from_onnx

    ranges = ShapeRanges(batch=Range(1, 1, 2), height=Range(512, 768, 1536), width=Range(512, 768, 1536), vae_max=768)
    export_model(tiny_source, tmp_path, ExportConfig(components=("vae_decoder",), ranges=ranges, validate=False),
                 device="cpu", precision="fp32")
    vae = runners_from_onnx(tmp_path, "fp32", components=("vae_decoder",)).runners["vae_decoder"]
    assert vae.profile["latent"][-1] == [1, 16, 96, 96]
    runners = {n: ComponentRunner(SPECS[n], Precision.FP32) for n in ("transformer", "clip_l", "clip_g")} | {"vae_decoder": vae}
    loop = Sd35Loop(load_assets(tiny_source), runners, ranges)
    request = GenerateRequest(prompt="x", height=1536, width=1536, batch=2)
    assert loop.vae_tile(request) == 96
    vae_calls = [c for c in loop.planned_calls(request) if c.component == "vae_decoder"]
    assert [c.shapes["latent"] for c in vae_calls] == [(1, 16, 96, 96)]
    images = loop.decode(torch.randn(2, 16, 192, 192, generator=torch.Generator().manual_seed(1)), request)
    assert images.shape == (2, 3, 1536, 1536) and torch.isfinite(images).all()
    assert vae.session.stats.allocations == 1 and vae.session.stats.runs == 18  # 2 images x 3 x 3 tiles, one buffer set
    with pytest.raises(InvalidInputError, match="larger than the VAE decoder takes whole"):
        Sd35Loop(load_assets(tiny_source), runners, ranges, vae_tiling="off").check(request)


@pytest.fixture(scope="module")
def turbo_work(tmp_path_factory):
    """A Turbo model directory (the tiny Turbo preset saved as `my-sd3.5-turbo`: Turbo by its name, as a downloaded
    SD3.5-Large-Turbo is) through the CLI: calibrate (its 4 steps, no guidance) and export."""
    from sd35trt.cli.main import main
    from tests.outliers import save_model

    root = tmp_path_factory.mktemp("turbo")
    model, work = save_model(root / "my-sd3.5-turbo", preset="tiny-turbo"), root / "work"
    assert main(["calibrate", "--model", str(model), "--out", str(work), "--num-prompts", "2", "--calib-batch", "2",
                 "--height", "256", "--width", "256"]) == 0
    assert main(["export", "--model", str(model), "--out", str(work)]) == 0
    return work


def test_turbo_runs_at_batch_1_without_guidance_through_the_profile_check(turbo_work, capsys, tmp_path):
    from sd35trt.cli.main import main
    from sd35trt.core.manifests import OnnxManifest, WorkDir
    from sd35trt.core.specs import Precision

    report = json.loads((turbo_work / "calibration" / "calibration.json").read_text())
    assert report["config"]["steps"] == 4 and report["config"]["guidance"] == 0.0, "Turbo calibrates on its traffic"
    manifest = OnnxManifest.load(WorkDir(turbo_work).onnx_folder(Precision.FP8, "transformer"), "transformer",
                                 Precision.FP8)
    assert manifest.profile["hidden_states"][1][0] == 1, "optimised for batch 1 (no CFG)"
    capsys.readouterr()
    assert main(["generate", "--onnx", str(turbo_work), "--prompt", "a koi", "--height", "512", "--width", "512",
                 "--out", str(tmp_path / "t.png"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["request"]["steps"] == 4 and info["request"]["guidance"] == 0.0
    assert (tmp_path / "t.png").stat().st_size > 0


def test_clip_only_onnx_loop_matches_diffusers_without_t5(exported):
    """--no-t5 on any runner: zero T5 embeddings, exactly as diffusers' pipeline with text_encoder_3=None."""
    from sd35trt.core.assets import PipelineAssets
    from sd35trt.core.metrics import psnr
    from sd35trt.core.models import build_pipeline, resolve_model
    from sd35trt.runtime.pipeline import Sd35Loop
    from sd35trt.runtime.request import GenerateRequest
    from sd35trt.runtime.runners import runners_from_onnx

    out, _ = exported
    pipe = build_pipeline(resolve_model("tiny"), components={"transformer", "text_encoder", "text_encoder_2", "vae"})
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_3 is None
    found = runners_from_onnx(out, "fp32", t5=False)
    assert "t5" not in found.runners
    request = GenerateRequest(prompt="a lighthouse", steps=3, guidance=4.5, seed=2, height=512, width=512)
    ours = Sd35Loop(PipelineAssets.of_pipeline(pipe), found.runners, found.ranges, batch_text=False)(request, progress=False)
    ref = pipe(prompt=request.prompt, negative_prompt="", num_inference_steps=3, guidance_scale=4.5, height=512,
               width=512, generator=torch.Generator("cpu").manual_seed(2), output_type="latent").images
    assert psnr(ref.numpy(), ours.latents.numpy(), data_range=float(ref.max() - ref.min())) > 60


@needs_rtx
def test_clip_only_bundle_leaves_t5_out(calibrated, capsys, tmp_path):
    from sd35trt.cli.main import main
    from sd35trt.core.manifests import BundleManifest

    out, _ = calibrated
    assert main(["build", "--onnx", str(out), "--out", str(tmp_path), "--components", "t5,clip_l"]) == 0
    full = tmp_path / "tiny" / "ada-tensorrt-rtx"
    before = {p.name: p.stat().st_mtime_ns for p in full.rglob("*")}
    assert main(["build", "--onnx", str(out), "--out", str(tmp_path), "--no-t5"]) == 0
    # beside the bundle with T5, never over it (`make engines T5=0` after `make engines` replaced it, T5 engine and all)
    assert {p.name: p.stat().st_mtime_ns for p in full.rglob("*")} == before
    bundle = tmp_path / "tiny" / "ada-tensorrt-rtx-clip"
    manifest = BundleManifest.load(bundle)
    assert not manifest.has_t5 and set(manifest.components) == {"transformer", "clip_l", "clip_g", "vae_decoder"}
    assert json.loads((bundle / "manifest.json").read_text())["t5"] is False
    assert not (bundle / "assets" / "tokenizer_3").exists() and (bundle / "assets" / "tokenizer_2").is_dir()
    manifest.verify()  # the shipped assets are hashed too
    (bundle / "assets" / "assets.json").write_text("{}")
    from sd35trt.core.errors import ArtifactError

    with pytest.raises(ArtifactError):
        manifest.verify()
    shutil.rmtree(bundle)


@pytest.mark.fast
def test_clip_only_and_four_bit_make_runs_have_work_dirs_of_their_own():
    """`make engines T5=0` after `make engines` recalibrated the full work dir on CLIP-only traffic: each kind of
    run has its own work dir by default (make's own expansion, `make -n`)."""
    def work_of(*knobs: str) -> str:
        run = subprocess.run(["make", "-n", "calibrate", "SYSTEM_PYTHON=1", *knobs], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return re.search(r'calibrate .*--out "([^"]+)"', run.stdout).group(1)

    assert work_of("MODEL=/data/sd3.5-large/") == "build/sd3.5-large"
    assert work_of("MODEL=/data/sd3.5-large/", "T5=0") == "build/sd3.5-large-clip"
    assert work_of("MODEL=sd3.5-medium", "QUANT=int4", "T5=0") == "build/sd3.5-medium-int4-clip"
    assert work_of("T5=0", "WORK=mine") == "mine"
