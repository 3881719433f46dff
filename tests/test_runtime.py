"""The deploy runtime, driven through onnxruntime where no engine can run: one EngineSession per network (buffers
once per shape, stable addresses, I/O checked at load, the exported profile enforced, load/unload), part chains
in their own dtype, and profiles that take every call the loop makes."""

from __future__ import annotations

import pytest
import torch

from sd35trt.core.errors import ArtifactError, InvalidInputError
from sd35trt.core.manifests import OnnxManifest, WorkDir
from sd35trt.core.specs import SPECS, Precision
from sd35trt.runtime.runners import ChainRunner, ort_runner, runners_from_onnx
from tests.conftest import needs_rtx


def _transformer_feeds(batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 16, size // 8, size // 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 333, 96, generator=g),
            "pooled_projections": torch.randn(batch, 96, generator=g),
            "timestep": torch.full((batch,), 500.0)}


def test_session_allocates_once_per_shape_and_keeps_addresses(exported):
    out, _ = exported
    runner = runners_from_onnx(out, "fp32", components=("transformer",)).runners["transformer"]
    assert not runner.loaded, "engines load lazily (the VRAM plan decides)"
    a, b = _transformer_feeds(2, 512), _transformer_feeds(1, 576)
    first = runner(**a)["noise_pred"]
    ptr, value = first.data_ptr(), first.clone()
    for _ in range(3):
        again = runner(**a)["noise_pred"]
        assert again.data_ptr() == ptr and torch.equal(again, value), "same buffer, same result, every step"
    stats = runner.session.stats
    assert stats.allocations == 1 and stats.runs == 4 and stats.binds == 1
    runner(**b)
    back = runner(**a)["noise_pred"]
    assert stats.allocations == 2 and back.data_ptr() == ptr, "a shape seen before reuses its buffers"
    assert stats.binds == 3  # bound again only when the shape changed
    runner.unload()
    assert not runner.loaded
    assert torch.equal(runner(**a)["noise_pred"], value), "reloads on the next call"


def test_session_checks_the_engine_against_its_component(exported):
    out, _ = exported
    wrong = WorkDir(out).onnx_path(Precision.FP32, "clip_l")
    runner = ort_runner(SPECS["transformer"], wrong, Precision.FP32, "cpu", None)
    with pytest.raises(ArtifactError, match=r"transformer engine does not match its component: inputs \['input_ids'\], "
                                            r"expected \['hidden_states'"):
        runner.load()
    assert not runner.loaded


def test_the_exported_profile_is_enforced_where_onnxruntime_would_accept(exported):
    """onnxruntime takes any batch; engines only their profile. The runner refuses what an engine would."""
    out, _ = exported
    runner = runners_from_onnx(out, "fp32", components=("transformer",)).runners["transformer"]
    with pytest.raises(InvalidInputError, match=r"input hidden_states shape \(9, 16, 64, 64\) is outside the engine's "
                                                r"profile \(1, 16, 64, 64\)..\(8, 16, 192, 192\)"):
        runner(**_transformer_feeds(9, 512))
    assert runner.accepts({"hidden_states": (1, 16, 64, 64)}) == []


def test_parts_hand_over_in_their_own_dtype(calibrated, tmp_path):
    """The FP16 transformer cut in 2: what crosses the cut stays FP16 between the sessions (no float32 round
    trip) and the chain computes what the whole graph does."""
    from sd35trt.producers.parts import write_parts

    root, _ = calibrated
    manifest = OnnxManifest.load(WorkDir(root).onnx_folder(Precision.FP16, "transformer"), "transformer", Precision.FP16)
    parts = write_parts(manifest.onnx_path, 2, manifest.profile, tmp_path / "parts")
    spec = SPECS["transformer"]
    chain = ChainRunner(spec, [ort_runner(spec, path, Precision.FP16, "cpu", plan.profile, inputs=plan.inputs, outputs=plan.outputs)
                               for path, plan in parts])
    whole = ort_runner(spec, manifest.onnx_path, Precision.FP16, "cpu", manifest.profile)
    feeds = _transformer_feeds(2, 512, seed=3)
    got, expected = chain(**feeds)["noise_pred"], whole(**feeds)["noise_pred"]
    carried = [n for n in chain.parts[1].inputs if n not in spec.input_names]
    assert carried and {chain.parts[1].session.dtypes[n] for n in carried} == {"float16"}
    assert all(chain.parts[0].session.dtypes[n] == "float16" for n in carried)
    assert torch.allclose(got, expected, rtol=0, atol=2e-2), (got - expected).abs().max()


REQUESTS = [(batch, guidance, height, width) for batch in (1, 2, 4) for guidance in (0.0, 1.0, 4.5)
            for height, width in ((1024, 1024), (1344, 768), (768, 1344), (1216, 832), (832, 1216), (1152, 896),
                                  (896, 1152), (1536, 640), (640, 1536), (512, 512))]


@needs_rtx
def test_every_request_the_loop_accepts_fits_every_engine_profile(calibrated, tmp_path):
    """From a built tiny bundle's manifest: every request GenerateRequest accepts (batch 1-4, guidance 0, 1 and
    4.5, SD3's aspect buckets) and every call generate (prompts batched) and compare (encoded one at a time, as
    diffusers does) make for it fits every engine's profile."""
    from sd35trt.core.assets import load_assets
    from sd35trt.core.models import resolve_model
    from sd35trt.producers.bundle import BuildConfig, build_bundle
    from sd35trt.runtime.pipeline import Sd35Loop
    from sd35trt.runtime.request import GenerateRequest
    from sd35trt.runtime.runners import ComponentRunner

    out, _ = calibrated
    manifest = build_bundle(out, tmp_path, BuildConfig()).manifest
    sized_runners = {n: ComponentRunner(SPECS[n], e.precision, profile=e.profile) for n, e in manifest.components.items()}
    assets = load_assets(resolve_model("tiny"))
    checked = 0
    for batch_text in (True, False):
        loop = Sd35Loop(assets, sized_runners, batch_text=batch_text)
        for batch, guidance, height, width in REQUESTS:
            request = GenerateRequest(prompt="x", batch=batch, guidance=guidance, height=height, width=width)
            loop.check(request)
            for call in loop.planned_calls(request):
                assert sized_runners[call.component].accepts(call.shapes) == [], (call, request)
                checked += 1
            transformer = next(c for c in loop.planned_calls(request) if c.component == "transformer")
            assert transformer.dims["batch"] == (2 * batch if guidance > 1 else batch)
    assert checked == 990  # 90 requests, 2 ways of encoding: 5 calls each, 8 with guidance encoded apart


def test_calls_the_loop_makes_are_the_calls_it_plans(tiny_pipe, exported):
    """What ``check`` verifies is what runs: every call the loop really makes (recorded on real onnxruntime
    runners) is one of ``planned_calls``, with and without guidance, batched or encoded apart."""
    from sd35trt.core.assets import PipelineAssets
    from sd35trt.runtime.pipeline import Sd35Loop
    from sd35trt.runtime.request import GenerateRequest

    out, _ = exported
    found = runners_from_onnx(out, "fp32")
    seen: list[tuple[str, tuple]] = []

    def recording(name, runner):
        original = runner.__call__

        class Recorder:
            def __getattr__(self, attr):
                return getattr(runner, attr)

            def __call__(self, **inputs):
                seen.append((name, tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items()))))
                return original(**inputs)

        return Recorder()

    runners = {n: recording(n, r) for n, r in found.runners.items()}
    for batch_text, guidance, batch in ((True, 4.5, 2), (False, 4.5, 1), (True, 0.0, 1)):
        loop = Sd35Loop(PipelineAssets.of_pipeline(tiny_pipe), runners, found.ranges, batch_text=batch_text)
        request = GenerateRequest(prompt="a fox", steps=1, guidance=guidance, batch=batch, height=512, width=576)
        seen.clear()
        loop(request, progress=False)
        planned = {(c.component, tuple(sorted(c.shapes.items()))) for c in loop.planned_calls(request)}
        assert set(seen) <= planned, set(seen) - planned
        assert {name for name, _ in seen} == set(SPECS)


def test_the_loop_keeps_latents_on_the_execution_device(tiny_pipe):
    """Latents, the guidance combine and the scheduler step stay where the transformer runs: no tensor the loop
    hands the transformer after the first step comes from the host (on CPU the device is the host, so this
    checks the code path: every step's input is the previous step's output, not a copy)."""
    from sd35trt.core.assets import PipelineAssets
    from sd35trt.runtime.pipeline import Sd35Loop
    from sd35trt.runtime.request import GenerateRequest
    from sd35trt.runtime.runners import runners_from_torch

    runners = runners_from_torch(tiny_pipe)
    transformer = runners["transformer"]
    inputs = []
    original = transformer.__call__

    class Spy:
        def __getattr__(self, attr):
            return getattr(transformer, attr)

        def __call__(self, **kw):
            inputs.append(kw)
            return original(**kw)

    runners["transformer"] = Spy()
    loop = Sd35Loop(PipelineAssets.of_pipeline(tiny_pipe), runners)
    assert loop.device == "cpu"
    loop(GenerateRequest(prompt="x", steps=3, height=512, width=512), progress=False)
    assert all(kw["timestep"].device == kw["hidden_states"].device for kw in inputs)
    assert inputs[0]["encoder_hidden_states"].data_ptr() == inputs[-1]["encoder_hidden_states"].data_ptr(), \
        "the prompt embeddings are made once and stay put"


def test_results_outlive_the_next_call(exported, tiny_pipe):
    """Engine sessions reuse their output buffers; what the loop hands back (images, latents) is its own."""
    from sd35trt.core.assets import PipelineAssets
    from sd35trt.runtime.pipeline import Sd35Loop
    from sd35trt.runtime.request import GenerateRequest

    out, _ = exported
    found = runners_from_onnx(out, "fp32")
    loop = Sd35Loop(PipelineAssets.of_pipeline(tiny_pipe), found.runners, found.ranges)
    first = loop(GenerateRequest(prompt="a fox", steps=2, seed=1, height=512, width=512), progress=False)
    kept = first.images.clone()
    loop(GenerateRequest(prompt="a lighthouse", steps=2, seed=2, height=512, width=512), progress=False)
    assert torch.equal(first.images, kept), "the first image was overwritten by the second call"
