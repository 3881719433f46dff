import json

import pytest

from sd35trt.core.errors import ArtifactError, BuildError, InvalidInputError
from sd35trt.core.specs import COMPONENTS, Precision
from sd35trt.core.targets import TARGETS, Backend, GpuTarget, plan_precisions
from sd35trt.producers.bundle import BuildConfig, build_bundle, verify_bundle
from tests.conftest import needs_rtx


def test_precision_table_fp8_where_the_gpu_has_it_fp16_fallback_elsewhere():
    have = {c: {Precision.FP32, Precision.FP16} for c in COMPONENTS}
    have["transformer"].add(Precision.FP8)
    ada = plan_precisions(TARGETS[GpuTarget.ADA], COMPONENTS, have)
    assert ada["transformer"].precision is Precision.FP8
    assert ada["vae_decoder"].precision is Precision.FP16 and ada["t5"].precision is Precision.FP16
    for target in (GpuTarget.AMPERE, GpuTarget.TURING):
        plan = plan_precisions(TARGETS[target], COMPONENTS, have)
        assert plan["transformer"].precision is Precision.FP16
        assert "runs no FP8 GEMM" in plan["transformer"].reason
    assert plan_precisions(TARGETS[GpuTarget.HOPPER], COMPONENTS, have)["transformer"].precision is Precision.FP8
    with pytest.raises(InvalidInputError, match="runs no FP8 GEMM"):
        plan_precisions(TARGETS[GpuTarget.AMPERE], COMPONENTS, have, requested=Precision.FP8)


@needs_rtx
def test_a_build_of_some_components_keeps_the_bundles_other_engines(calibrated, tmp_path):
    """`build --components clip_l` into a bundle folder used to swap in a bundle of clip_l alone: every other engine
    of that folder was dropped. They are kept (same model, backend version and target), the bundle still verifies."""
    out, _ = calibrated
    first = build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.ADA, components=("clip_l", "vae_decoder")))
    vae = first.folder / "vae_decoder.plan"
    vae_bytes = vae.read_bytes()
    again = build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.ADA, components=("clip_l",)), force=True)
    assert again.folder == first.folder and again.rebuilt == ["clip_l"]
    assert set(again.manifest.components) == {"clip_l", "vae_decoder"}
    assert vae.read_bytes() == vae_bytes and again.manifest.components["vae_decoder"] == first.manifest.components["vae_decoder"]
    assert verify_bundle(again.folder).target == "ada"


@needs_rtx
def test_ada_bundle_has_fp8_transformer_and_manifest(calibrated, tmp_path):
    out, _ = calibrated
    result = build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.ADA))
    folder = result.folder
    assert folder == tmp_path / "tiny" / "ada-tensorrt-rtx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["compute_capabilities"] == ["8.9"] and manifest["backend"] == "tensorrt-rtx"
    assert set(manifest["components"]) == set(COMPONENTS)
    transformer = manifest["components"]["transformer"]
    assert transformer["precision"] == "fp8" and transformer["layers"]["gemm_fp8"] > 0
    assert "FP8" in (folder / "layers" / "transformer.txt").read_text()
    assert transformer["onnx"]["calibration_hash"]
    assert verify_bundle(folder).target == "ada"
    from sd35trt.core.shapes import ShapeRanges

    assert result.manifest.shape_ranges == ShapeRanges()  # the exported ranges travel with the engines
    from sd35trt.core.manifests import BundleManifest

    assert BundleManifest.from_dict(result.manifest.to_dict(), folder) == result.manifest  # round trip

    again = build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.ADA))
    assert again.skipped


@needs_rtx
def test_ampere_falls_back_to_fp16(calibrated, tmp_path):
    out, _ = calibrated
    result = build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.AMPERE, components=("transformer",)))
    entry = result.manifest.components["transformer"].to_dict()
    assert entry["precision"] == "fp16" and entry["layers"]["gemm_fp8"] == 0
    assert result.manifest.compute_capabilities == ["8.0", "8.6"]
    text = plan_precisions(TARGETS[GpuTarget.AMPERE], ("clip_l",), {"clip_l": {Precision.FP16}})["clip_l"].reason
    assert "runs no FP8 GEMM" in text and "calibrate" not in text, "never advice that cannot help on this GPU"


@needs_rtx
def test_tampered_onnx_is_refused_and_previous_bundle_kept(work_copy, tmp_path):
    first = build_bundle(work_copy, tmp_path, BuildConfig(target=GpuTarget.ADA, components=("clip_l",)))
    plan_bytes = (first.folder / "clip_l.plan").read_bytes()
    onnx_path = work_copy / "onnx-fp16" / "clip_l" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        build_bundle(work_copy, tmp_path, BuildConfig(target=GpuTarget.ADA, components=("clip_l",)), force=True)
    assert (first.folder / "clip_l.plan").read_bytes() == plan_bytes


@needs_rtx
def test_bundle_verify_detects_truncated_engine(calibrated, tmp_path):
    out, _ = calibrated
    result = build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.ADA, components=("clip_g",)))
    plan = result.folder / "clip_g.plan"
    plan.write_bytes(plan.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        verify_bundle(result.folder)


def test_hopper_without_tensorrt_is_a_clear_error(calibrated, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("full TensorRT is installed here")
    except ImportError:
        pass
    out, _ = calibrated
    with pytest.raises(BuildError, match="no backend here can build hopper.*sd35trt\\[tensorrt\\]"):
        build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.HOPPER))
    with pytest.raises(Exception, match="tensorrt backend is not installed"):
        build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.ADA, backend=Backend.TENSORRT))


def test_tensorrt_backend_builds_on_a_gpu_host(calibrated, tmp_path):
    """Full TensorRT needs NVIDIA's index and a GPU of the target: not available on CPU CI or here."""
    trt = pytest.importorskip("tensorrt", reason="full TensorRT is not installable here (PyPI ships a stub)")
    from sd35trt.core.host import local_compute_capability

    if local_compute_capability() is None:
        pytest.skip("full TensorRT builds for the local GPU and this host has none")
    out, _ = calibrated
    result = build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.AUTO, backend=Backend.TENSORRT,
                                                     components=("transformer",)))
    assert result.manifest.backend_version == trt.__version__


def test_missing_onnx_dir(tmp_path):
    with pytest.raises(InvalidInputError, match="ONNX directory not found"):
        build_bundle(tmp_path / "nothing", tmp_path, BuildConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no exported ONNX"):
        build_bundle(tmp_path / "empty", tmp_path, BuildConfig())


@needs_rtx
def test_a_crashing_builder_is_one_error_not_a_dead_process(tmp_path):
    """TensorRT-RTX 1.7 segfaults (or fails in Myelin) building a T5 whose attention sub-layer runs in FP32
    inside an FP16 graph. Builds run in a child process, so that is a BuildError here, never a dead sd35trt."""
    import torch

    from sd35trt.core.models import build_pipeline, resolve_model
    from sd35trt.core.numerics import Island, fp32_islands
    from sd35trt.core.shapes import ShapeRanges
    from sd35trt.core.specs import SPECS, PipeDims
    from sd35trt.core.wrappers import CastIO
    from sd35trt.producers.export import export_component
    from sd35trt.producers.trt_builder import TensorRTRTXBackend, build_engine_isolated

    pipe = build_pipeline(resolve_model("tiny"), dtype=torch.float16, components={"text_encoder_3"})
    spec = SPECS["t5"]
    with fp32_islands(pipe.text_encoder_3, [Island("encoder.block.1.layer.0", 1.0, "test")], torch.float16):
        record = export_component(CastIO(spec.module(pipe), torch.float16), spec, PipeDims.from_pipeline(pipe),
                                  tmp_path, opset=19, ranges=ShapeRanges(), precision=Precision.FP16, validate=False)
    try:
        built = build_engine_isolated(TensorRTRTXBackend(), tmp_path / "model.onnx", record["profile"], ((8, 9),),
                                      tmp_path / "t5.plan")
    except BuildError as err:  # what 1.7.1.116 does; a fixed TensorRT-RTX may build it
        assert "crashed (signal SIG" in str(err) or "engine build failed" in str(err), str(err)
    else:
        assert built.plan_bytes == (tmp_path / "t5.plan").stat().st_size


def test_an_unreadable_layer_report_is_unknown_not_a_failed_build(tmp_path):
    from sd35trt.producers.bundle import check_layer_report
    from sd35trt.producers.layer_report import summarize_layers

    unknown = summarize_layers([])
    check_layer_report("transformer", Precision.FP8, unknown, tmp_path / "model.onnx")
    assert unknown["report"] == "unknown"
    no_fp8 = summarize_layers([{"name": "/t/MatMul", "type": "gemm", "input_dtypes": ["Half"], "weight_dtypes": []}])
    with pytest.raises(BuildError, match="no FP8 GEMM"):
        check_layer_report("transformer", Precision.FP8, no_fp8, tmp_path / "model.onnx")


def test_gemms_fused_with_their_add_count_as_gemms():
    """TensorRT-RTX reports a GEMM fused with its bias/residual add as a ``runtime_fusion`` layer named ``Fc…``
    (SD3.5-Large's FP8 transformer: 12 of them, the GEMMs the recipe leaves unquantized); they are GEMMs."""
    from sd35trt.producers.layer_report import is_gemm, summarize_layers

    def layer(kind, name, dtype="Half"):
        return {"type": kind, "name": name, "input_dtypes": [dtype], "weight_dtypes": [dtype]}

    layers = [layer("gemm", "/t/blocks.0/attn/to_q/MatMul", "FP8"), layer("runtime_fusion", "__myl_FcAddSilu_myl0_2"),
              layer("runtime_fusion", "__myl_FcAdd_myl0_3"), layer("runtime_fusion", "__myl_ResizeConv_myl0_4"),
              layer("kgen", "__myl_FcLike_but_kgen_myl0_5"), layer("runtime_fusion", "__myl_Fc_myl0_6", "Float")]
    assert [is_gemm(x) for x in layers] == [True, True, True, False, False, True]
    summary = summarize_layers(layers)
    assert (summary["gemm"], summary["gemm_fp8"], summary["gemm_fp16"], summary["gemm_other"]) == (4, 1, 2, 1)


@needs_rtx
def test_streamed_plan_equals_the_in_memory_plan(calibrated, tmp_path):
    """The plan the builder streams to disk is the plan ``build_serialized_network`` returns, and the builder
    process records where its memory peaked. Byte for byte up to TensorRT-RTX 1.7's own variation: the order of
    its I/O-tensor table can differ between any two builds of one ONNX (a few hundred bytes of CLIP-L's plan,
    seen between two in-memory builds too), so the check is equal size and ≥ 99.9% equal bytes in place."""
    import numpy as np

    from sd35trt.core.manifests import OnnxManifest, WorkDir
    from sd35trt.producers.trt_builder import TensorRTRTXBackend, build_engine_isolated

    out, _ = calibrated
    for name in ("clip_l", "transformer"):
        source = OnnxManifest.load(WorkDir(out).onnx_folder(Precision.FP16, name), name, Precision.FP16)
        plans = {}
        for stream in (True, False):
            path = tmp_path / f"{name}-{'stream' if stream else 'memory'}.plan"
            built = build_engine_isolated(TensorRTRTXBackend(), source.onnx_path, source.profile, ((8, 9),), path,
                                          stream=stream)
            assert built.plan_bytes == path.stat().st_size and built.memory["streamed"] is stream
            assert built.memory["peak_rss_gib"] >= built.memory["rss_after_parse_gib"] > 0
            plans[stream] = np.fromfile(path, dtype=np.uint8)
        assert plans[True].size == plans[False].size
        same = float((plans[True] == plans[False]).mean())
        assert same >= 0.999, f"{name}: {same:.5f} of the bytes equal"


def test_layer_precision_from_the_engine_inspector_json():
    """Full TensorRT's per-layer report comes from IEngineInspector's JSON (the verbose log's format changed
    between 10.x and 11.x). Shape as documented (trex reads the same keys); anything else is "unknown"."""
    import json

    from sd35trt.producers.layer_report import parse_inspector_json, summarize_layers

    doc = {"Layers": [
        {"Name": "/transformer_blocks.0/attn/to_q/MatMul", "LayerType": "gemm",
         "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP8 format"}],
         "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP16 format"}], "Weights": {"Type": "FP8"}},
        {"Name": "/transformer_blocks.35/ff/net.2/MatMul", "LayerType": "gemm",
         "Inputs": [{"Name": "h", "Format/Datatype": "Row major linear FP32 format"}], "Outputs": []},
        {"Name": "/proj_out/MatMul", "LayerType": "gemm", "Inputs": [{"Name": "z", "Format/Datatype": "Half"}]},
    ], "Bindings": ["hidden_states", "noise_pred"]}
    layers = parse_inspector_json(json.dumps(doc))
    assert [l["input_dtypes"] for l in layers] == [["FP8"], ["Float"], ["Half"]]
    summary = summarize_layers(layers, ["transformer_blocks.35"])
    assert (summary["gemm"], summary["gemm_fp8"], summary["gemm_fp16"]) == (3, 1, 1)
    assert summary["island_gemm"] == summary["island_gemm_fp32"] == 1
    assert parse_inspector_json(json.dumps({"Layers": ["only", "names"]})) == []  # built without DETAILED
    assert parse_inspector_json("not json") == []
