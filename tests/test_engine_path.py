"""The engine path on real objects built from a real tiny bundle (TensorRT-RTX, ahead of time): what sd35trt's engine
runners and polygraphy's TrtRunner twin would hand to TensorRT — plan paths, hashes, streaming budgets, the VRAM
plan's activation sizes — and that loading gets as far as the runtime's own refusal (on this CPU box: "cudaError 35";
on the H200: TensorRT-RTX's compute-capability refusal, bench/reach_refusal.sh). No engine executes here."""

from __future__ import annotations

import json
import shutil

import pytest

from sd35trt.core.errors import ArtifactError
from tests.conftest import needs_rtx

pytestmark = needs_rtx
REFUSAL = "cudaError 35"  # TensorRT-RTX deserializing without a CUDA driver: the runtime's own words on this box


@pytest.fixture(scope="module")
def bundle(calibrated, tmp_path_factory):
    """`sd35trt build` of the tiny work dir, the transformer in 2 parts built for weight streaming."""
    from sd35trt.producers.bundle import BuildConfig, build_bundle

    out, _ = calibrated
    root = tmp_path_factory.mktemp("engines")
    result = build_bundle(out, root, BuildConfig(parts=(("transformer", 2),), weight_streaming=True))
    return result.folder


def runners(folder):
    from sd35trt.runtime.runners import runners_from_bundle

    return runners_from_bundle(folder, check_host=False)


def test_every_engine_runner_names_its_plan_from_any_directory(bundle, tmp_path, monkeypatch):
    found = runners(bundle)
    monkeypatch.chdir(tmp_path)  # compare and selftest run from wherever the user stands
    for runner in found.runners.values():
        engines = getattr(runner, "parts", [runner])
        for engine in engines:
            assert engine.plan.is_absolute() and engine.plan.is_file(), engine.plan
            assert engine.plan.parent == bundle.absolute() and engine.plan_file.file == engine.plan.name
    assert [e.plan.name for e in found.runners["transformer"].parts] == ["transformer.part1of2.plan",
                                                                       "transformer.part2of2.plan"]


def test_sd35trt_session_and_polygraphy_twin_both_reach_the_runtime(bundle, tmp_path, monkeypatch):
    """Loading opens the right file, checks its sha256 on the mapped bytes, and hands them to TensorRT-RTX, whose
    own refusal is the error (was: polygraphy's twin opened 'clip_l.plan' relative to the current directory)."""
    from sd35trt.checks.polygraphy_runners import engine_twin

    found = runners(bundle)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match=REFUSAL):
        found.runners["clip_l"].load()
    twin = engine_twin(found.runners["transformer"], "engine-polygraphy:transformer")
    with pytest.raises(Exception, match="deserializ|CUDA|cuda") as refused:
        twin.activate()
    assert not isinstance(refused.value, (FileNotFoundError, ArtifactError)), refused.value


def test_a_plan_whose_bytes_differ_is_refused_before_tensorrt_sees_it(bundle, tmp_path):
    from sd35trt.core.artifacts import check_mapped

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    entry = json.loads((copy / "manifest.json").read_text())["components"]["clip_l"]
    plan = copy / entry["file"]
    assert check_mapped(plan, plan.read_bytes(), entry["sha256"], entry["bytes"]) == "sha256 checked now"
    assert check_mapped(plan, plan.read_bytes(), entry["sha256"], entry["bytes"]).startswith("sha256 checked before"), \
        "an unchanged plan is not hashed again at the next load"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))  # same size, new stamp
    with pytest.raises(ArtifactError, match="sha256 differs"):
        runners(copy).runners["clip_l"].load()


def test_the_sha256_cache_forgets_files_that_are_gone_and_stays_bounded(tmp_path, monkeypatch):
    """The per-user cache of file digests is read by every command for every file it names: entries of deleted work
    dirs are dropped and the oldest go past the cap, so it does not grow with every work dir ever made."""
    from sd35trt.core import artifacts

    monkeypatch.setenv("SD35TRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(artifacts, "SHA256_CACHE_ENTRIES", 4)
    files = []
    for i in range(6):
        files.append(tmp_path / f"w{i}.bin")
        files[-1].write_bytes(bytes([i]) * 10)
        assert artifacts.known_sha256(files[-1]) == artifacts.sha256_file(files[-1])
    kept = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert list(kept) == [str(f.resolve()) for f in files[2:]]  # the newest four
    files[3].unlink()
    assert artifacts.known_sha256(files[5]) == artifacts.sha256_file(files[5])  # a hit: nothing written
    files[0].write_bytes(b"changed")
    artifacts.known_sha256(files[0])  # a miss: written, the deleted file's entry dropped
    kept = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert str(files[3].resolve()) not in kept and str(files[0].resolve()) in kept and len(kept) == 4


def test_streaming_budget_is_shared_by_the_parts_in_proportion_to_their_weights(bundle):
    transformer = runners(bundle).runners["transformer"]
    assert transformer.streamable and all(p.streamable for p in transformer.parts)
    transformer.set_streaming_budget(10_000_000)
    budgets = [p.streaming_budget for p in transformer.parts]
    sizes = [p.weight_bytes for p in transformer.parts]
    assert sum(budgets) <= 10_000_000 and all(b > 0 for b in budgets)
    assert abs(budgets[0] / budgets[1] - sizes[0] / sizes[1]) < 1e-3, "each part gets its share, not the whole"
    assert runners(bundle).runners["clip_l"].streaming_budget is None


def test_the_loop_gets_its_plan_and_streaming_budget_at_construction(bundle):
    """One path from options to a loop: the plan is chosen from the loop's shape (data: profiles and sizes, no engine
    loaded), and the loop built with it hands the transformer its streaming budget before anything loads."""
    from sd35trt.core.assets import PipelineAssets
    from sd35trt.runtime.pipeline import Sd35Loop
    from sd35trt.runtime.request import GenerateRequest, LoopShape
    from sd35trt.runtime.vram import choose_plan

    found = runners(bundle)
    assets = PipelineAssets.load(found.assets_folder)
    shape = LoopShape(assets, found.runners, found.ranges)
    request = shape.resolve(GenerateRequest(prompt="x", height=512, width=512))
    with pytest.raises(ValueError, match="resolve the request first"):
        shape.check(GenerateRequest(prompt="x", height=512, width=512))  # steps/guidance not yet the model's
    plan = choose_plan(shape.needs(request), 2**40, "streaming")
    transformer = found.runners["transformer"]
    assert transformer.parts[0].streaming_budget is None and not any(r.loaded for r in found.runners.values())
    loop = Sd35Loop(assets, found.runners, found.ranges, plan=plan)
    assert loop.plan is plan and sum(p.streaming_budget for p in transformer.parts) <= plan.streaming_budget
    assert all(p.streaming_budget > 0 for p in transformer.parts)
    assert loop.needs(GenerateRequest(prompt="x", height=512, width=512)) == shape.needs(request)


def test_the_vram_plan_counts_what_engines_allocate_their_profiles_maximum(bundle):
    """Static allocation: an engine's context holds its profile's largest activations whatever the request; the plan
    counts that (was: the request's), and the narrowed VAE profile (1 image, 1024 px) is what keeps it small."""
    from sd35trt.checks.doctor import vram_report
    from sd35trt.core.specs import SPECS

    report = vram_report(bundle, 8.0, height=512, width=512)
    needs = report["needs"]
    assert all("profile" in n["activations_at"] for n in needs.values())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["runtime"]["activation_memory"].startswith("static")
    vae_profile = manifest["components"]["vae_decoder"]["profile"]["latent"][-1]
    assert vae_profile == [1, 16, 128, 128], "one image of at most 1024 px"
    dims = SPECS["vae_decoder"].dims_of({"latent": vae_profile}, 8)
    assert dims["height"] == 1024 and needs["vae_decoder"]["activations_gib"] == pytest.approx(
        SPECS["vae_decoder"].activation_bytes(dims, 0) / 2**30, abs=1e-3)
    transformer = manifest["components"]["transformer"]["profile"]["hidden_states"][-1]
    assert transformer[0] == 8, "the transformer's profile reaches 4 images with guidance"


def test_a_weight_stripped_bundle_refuses_to_run_until_refit(bundle, tmp_path):
    from sd35trt.core.manifests import BundleManifest
    from sd35trt.producers.refit import refitted

    copy = tmp_path / "stripped"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["components"]["clip_l"]["refit"] = {"mode": "refit", "stripped": True, "plan_bytes": 1}
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="weight-stripped and not refit yet"):
        runners(copy)
    entry = BundleManifest.load(copy).components["clip_l"]
    after = refitted(entry, entry.plans, copy / "onnx-fp16" / "clip_l" / "model.onnx")
    assert after.refit["stripped"] is False and after.refit["refit_from"].endswith("model.onnx")


def test_parts_are_refit_from_the_same_cut_of_the_refit_onnx(bundle, calibrated, tmp_path):
    """The weights of a part engine come from the part graph the build cut, never from the whole graph (whose
    folded weights TensorRT names by another running counter)."""
    from sd35trt.core.manifests import BundleManifest, OnnxManifest, WorkDir
    from sd35trt.core.specs import Precision
    from sd35trt.producers.refit import _part_graphs

    out, _ = calibrated
    entry = BundleManifest.load(bundle).components["transformer"]
    source = OnnxManifest.load(WorkDir(out).onnx_folder(Precision.FP8, "transformer"), "transformer", Precision.FP8)
    graphs = _part_graphs(source, entry, tmp_path / "parts")
    assert [g.name for g in graphs] == ["part1of2.onnx", "part2of2.onnx"] and all(g.is_file() for g in graphs)


def test_the_runtime_cache_is_kept_after_each_new_shape_not_only_at_unload(exported, monkeypatch):
    """TensorRT-RTX compiles kernels the first time a shape runs: the session asks its adapter to keep them then (a
    resident run never unloads). Driven on onnxruntime, whose adapter is the same protocol."""
    import torch

    from sd35trt.runtime.onnxrt import OrtAdapter
    from sd35trt.runtime.runners import runners_from_onnx

    kept = []
    monkeypatch.setattr(OrtAdapter, "keep_compiled", lambda self: kept.append(self.path.parent.name))
    out, _ = exported
    runner = runners_from_onnx(out, "fp32", components=("clip_l",)).runners["clip_l"]
    for batch in (1, 1, 2, 1):
        runner(input_ids=torch.zeros(batch, 77, dtype=torch.int64))
    assert kept == ["clip_l", "clip_l"], "once per new shape"


def test_polygraphy_twin_of_a_bundle_is_scoped_to_tensorrt_rtx(bundle):
    import sys

    import polygraphy.config as polygraphy_config

    from sd35trt.checks.polygraphy_runners import engine_twin

    before = polygraphy_config.USE_TENSORRT_RTX
    twin = engine_twin(runners(bundle).runners["clip_l"], "engine-polygraphy:clip_l")
    import tensorrt_rtx_bindings

    bound = type(twin.inners[0]).__init__.__globals__["trt"]
    assert bound.__version__ == tensorrt_rtx_bindings.__version__, "the TrtRunner resolved TensorRT-RTX"
    assert polygraphy_config.USE_TENSORRT_RTX == before and "tensorrt_rtx" not in sys.modules, "scoped to the call"
