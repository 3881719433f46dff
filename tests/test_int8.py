"""INT8 weight-only components (``--int8``, make's ``INT8=``): the text encoders (and, where no calibrated format
runs, the transformer) stored in 8 bits, one scale per output channel, on every GPU target TensorRT-RTX builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import needs_rtx
from tests.test_bad_inputs import assert_user_error, run_cli
from tests.test_journeys import MAKE_SMALL, REPO, cli


@pytest.mark.fast
def test_int8_codes_are_within_half_a_step_of_the_weight_per_output_channel():
    import torch

    from sd35trt.producers.weight_quant import quantize_int8

    weight = torch.randn(48, 64) * torch.logspace(-3, 1, 48).unsqueeze(1)  # rows four decades apart
    weight[5] = 0.0  # an all-zero row keeps a positive scale
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape and scale.shape == (48,)
    assert int(q.abs().max()) == 127 and (scale > 0).all()
    rows = weight.abs().amax(dim=1) > 0
    assert (q.abs().amax(dim=1)[rows] == 127).all(), "every non-zero row uses its whole range"
    error = (q.float() * scale.unsqueeze(1) - weight).abs()
    assert (error <= scale.unsqueeze(1) / 2 + 1e-12).all()


@pytest.mark.fast
def test_int8_takes_t5s_wo_which_fp8_keeps_out_for_its_activations(tmp_path):
    from sd35trt.core.errors import InvalidInputError
    from sd35trt.core.models import build_pipeline, resolve_model
    from sd35trt.producers.quantize import int8_layers
    from sd35trt.producers.recipe import Recipe

    recipe = Recipe.load(REPO / "calibration" / "fp8.toml")
    t5 = build_pipeline(resolve_model("tiny"), components={"text_encoder_3"}).text_encoder_3
    got = int8_layers(t5, "t5", recipe, [])
    wo = [layer for layer in got if layer.endswith("DenseReluDense.wo")]
    assert wo and all(got[layer].startswith("int8") and "activations" in got[layer] for layer in wo)
    assert not set(wo) & set(recipe.quantizable("t5", t5, []))  # FP8 still leaves them out
    clip = build_pipeline(resolve_model("tiny"), components={"text_encoder"}).text_encoder
    assert got_fp16(int8_layers(clip, "clip_l", recipe, [])) == ["text_projection"]  # no weight_only for CLIP
    stray = tmp_path / "stray.toml"
    stray.write_text('[t5]\nexclude = ["shared"]\nweight_only = ["encoder.*"]\n')
    with pytest.raises(InvalidInputError, match="weight_only pattern 'encoder.\\*' is not one of its excludes"):
        Recipe.load(stray)


def got_fp16(table: dict[str, str]) -> list[str]:
    return [layer for layer, got in table.items() if got.startswith("fp16")]


@pytest.mark.fast
@pytest.mark.parametrize("gpu", ["turing", "ampere", "ada", "hopper", "blackwell"])
def test_int8_components_get_int8_on_every_target_and_the_transformer_keeps_its_calibrated_format(gpu):
    from sd35trt.core.errors import InvalidInputError
    from sd35trt.core.specs import Precision
    from sd35trt.core.targets import TARGETS, GpuTarget, buildable, likely_backend, plan_precisions

    target = TARGETS[GpuTarget(gpu)]
    backend = likely_backend(target)
    have = {"transformer": {Precision.FP16, Precision.FP8, Precision.INT8},
            "clip_g": {Precision.FP16, Precision.INT8}, "vae_decoder": {Precision.FP16}}
    plan = plan_precisions(target, tuple(have), have, backend=backend, ccs=buildable(target, backend),
                           int8=("transformer", "clip_g"))
    assert plan["clip_g"].precision is Precision.INT8 and "--int8" in plan["clip_g"].reason
    assert plan["vae_decoder"].precision is Precision.FP16
    if target.has_fp8:
        assert plan["transformer"].precision is Precision.FP8
    else:  # no FP8 GEMM on Turing/Ampere: the transformer's INT8 weights, not FP16, and the reason says both
        assert plan["transformer"].precision is Precision.INT8
        assert "runs no FP8 GEMM" in plan["transformer"].reason and "INT8" in plan["transformer"].reason
    unasked = plan_precisions(target, tuple(have), have, backend=backend, ccs=buildable(target, backend))
    assert unasked["clip_g"].precision is Precision.FP16, "an INT8 ONNX left in the work dir is used only when asked"
    with pytest.raises(InvalidInputError, match="no int8 ONNX of it"):
        plan_precisions(target, ("clip_l",), {"clip_l": {Precision.FP16}}, backend=backend,
                        ccs=buildable(target, backend), int8=("clip_l",))


@pytest.mark.fast
def test_runners_take_int8_when_asked_or_when_it_is_all_a_component_has():
    from sd35trt.core.specs import Precision
    from sd35trt.core.targets import runner_variant

    both, only = {Precision.FP16, Precision.INT8}, {Precision.INT8}
    assert runner_variant("clip_g", "auto", both) is Precision.FP16  # as a build without --int8
    assert runner_variant("clip_g", "auto", only) is Precision.INT8  # exported for one target with --int8
    assert runner_variant("clip_g", "int8", both) is Precision.INT8
    assert runner_variant("vae_decoder", "int8", {Precision.FP16}) is Precision.FP16  # as engines: FP16 where none


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, adapter):
    """`make engines GPU=ampere INT8=transformer,clip_l,clip_g,t5 LORA=...` on a user's directory whose weights
    overflow FP16 (FP32 islands in the transformer and T5): A100 (SM80) and RTX 30 (SM86) get no FP8 and (with
    TensorRT-RTX) no INT4 on SM80; INT8 weights run on both, one engine for the two."""
    import subprocess

    from tests.outliers import inject_stream_outliers, save_model

    root = tmp_path_factory.mktemp("int8")
    model = save_model(root / "hot", inject_stream_outliers)
    lora = f"{adapter}:0.8"
    run = subprocess.run(["make", "engines", f"MODEL={model}", "GPU=ampere", "INT8=transformer,clip_l,clip_g,t5",
                          f"WORK={root / 'work'}", f"ENGINES={root / 'engines'}", f"LORA={lora}", *MAKE_SMALL],
                         cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root, run, lora


@needs_rtx
def test_int8_make_engines_on_a_directory_keeps_islands_out_of_the_int8_layers(int8_bundle):
    root, run, _ = int8_bundle
    assert "transformer int8, clip_l int8, clip_g int8, t5 int8, vae_decoder fp16" in run.stdout  # preflight's plan
    (bundle,) = (root / "engines").glob("hot-lora-*/ampere-tensorrt-rtx-int8")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["compute_capabilities"] == ["8.0", "8.6"] and manifest["model"]["lora"]
    for name in ("transformer", "clip_l", "clip_g", "t5"):
        entry = manifest["components"][name]
        exported = json.loads((root / "work" / "onnx-int8" / name / "manifest.json").read_text())
        counted = json.loads((root / "work" / "onnx-int8" / name / "int8_weights.json").read_text())["int8_weights"]
        assert entry["precision"] == "int8" and exported["weights_precision"] == "int8", (name, entry["reason"])
        assert "INT8-weight network" in exported["validation"]["reference"]
        got = exported["layers"]  # every Linear, what it got and why
        assert sum(v.startswith("int8") for v in got.values()) == counted, (name, got)
        assert not any(v.startswith("int8") for layer, v in got.items()  # the islands' layers stay FP32
                       if any(layer.startswith(i["module"] + ".") for i in exported["fp32_islands"]))
        assert (name in ("transformer", "t5")) == any(v == "fp32: inside an FP32 island" for v in got.values())
        assert all(o["passed"] for o in exported["validation"]["outputs"].values())
        traffic = exported["traffic_check"]  # held-out pipeline calls against the FP32 network
        assert traffic["passed"] and max(v["rel_l2_max"] for k, v in traffic.items()
                                         if isinstance(v, dict) and "rel_l2_max" in v) < 0.05, (name, traffic)
        # every INT8 weight stays 8-bit in the plan; TensorRT-RTX merges the transformer's AdaLN pair (norm1 and
        # norm1_context's linears read the same SiLU output: one GEMM, one INT8 tensor) of its one non-island block
        merged = 1 if name == "transformer" else 0
        assert counted > 0 and entry["layers"]["int8_weights"] == counted - merged, (name, entry["layers"])
    assert "INT8 weight-only GEMMs on SM80, SM86" in manifest["components"]["transformer"]["reason"]
    for name in ("transformer", "t5"):  # the islands stay FP32, outside the INT8 layers
        assert manifest["components"][name]["fp32_islands"], name
        assert f"INT8 weight tensors: {manifest['components'][name]['layers']['int8_weights']}" in \
            (bundle / "layers" / f"{name}.txt").read_text()


@needs_rtx
def test_int8_work_dir_compares_and_generates_in_onnxruntime_and_doctor_plans_from_it(int8_bundle, tmp_path, capsys):
    root, _, lora = int8_bundle
    compared = cli("compare", "--onnx", str(root / "work"), "--model", str(root / "hot"), "--lora", lora,
                   "--variants", "int8", "--prompts", "1", "--steps", "2", "--out", str(tmp_path / "c"))
    assert compared.returncode == 0, compared.stderr[-3000:]
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    runners = data["end_to_end"]["int8"]["runners"]
    assert {runners[c]["precision"] for c in ("transformer", "clip_l", "clip_g", "t5")} == {"int8"} and data["passed"]
    made = cli("generate", "--onnx", str(root / "work"), "--model", str(root / "hot"), "--lora", lora, "--precision",
               "int8", "--prompt", "a fox", "--steps", "2", "--height", "512", "--width", "512",
               "--out", str(tmp_path / "fox.png"))
    assert made.returncode == 0 and (tmp_path / "fox.png").stat().st_size > 0, made.stderr[-2000:]
    from sd35trt.cli.main import main

    (bundle,) = (root / "engines").glob("hot-lora-*/ampere-tensorrt-rtx-int8")
    code = main(["doctor", str(bundle), "--vram", "8"])
    out, err = capsys.readouterr()
    assert code in (0, 3), err[-2000:]  # 3: no engine of it runs on this host (no GPU), said in the report
    assert 0 < json.loads(out)["vram"]["plans_gib"]["resident"] < 8


@needs_rtx
def test_an_int8_transformer_builds_in_parts_and_every_part_keeps_its_int8_weights(int8_bundle, tmp_path):
    root, _, _ = int8_bundle
    whole = json.loads(next((root / "engines").glob("hot-lora-*/ampere-tensorrt-rtx-int8/manifest.json")).read_text())
    built = cli("build", "--onnx", str(root / "work"), "--gpu", "ampere", "--out", str(tmp_path / "e"),
                "--components", "transformer", "--int8", "transformer", "--parts", "transformer=2")
    assert built.returncode == 0, built.stderr[-3000:]
    (manifest,) = (tmp_path / "e").glob("hot-lora-*/ampere-tensorrt-rtx-int8/manifest.json")
    entry = json.loads(manifest.read_text())["components"]["transformer"]
    assert entry["precision"] == "int8" and len(entry["parts"]) == 2
    # the cut may separate the AdaLN pair the whole build merges into one GEMM: never fewer INT8 tensors than it
    assert entry["layers"]["int8_weights"] >= whole["components"]["transformer"]["layers"]["int8_weights"], entry["layers"]


@needs_rtx
def test_int8_refusals_are_one_line(int8_bundle, capsys, tmp_path):
    root, _, _ = int8_bundle
    code, err = run_cli(capsys, ["export", "--model", "tiny", "--out", tmp_path / "w", "--int8", "vae_decoder"])
    assert_user_error(code, err, "not supported by --int8")
    code, err = run_cli(capsys, ["export", "--model", "tiny", "--out", tmp_path / "w", "--precision", "int8"])
    assert_user_error(code, err, "--precision int8 without --int8")
    # the work dir has INT8 ONNX for transformer, encoders and T5 only: asking for the VAE's is refused by name
    # a build asking for INT8 where export made none: the work dir's VAE decoder, and a component never exported
    code, err = run_cli(capsys, ["build", "--onnx", root / "work", "--gpu", "ampere", "--out", tmp_path / "e",
                                 "--components", "clip_g,vae_decoder", "--precision", "int8"])
    assert_user_error(code, err, "no int8 ONNX for vae_decoder")


def test_int8_takes_its_layers_from_the_recipe_given_and_refuses_one_calibrate_did_not_use(int8_bundle, tmp_path,
                                                                                            capsys):
    """`export --int8 clip_l --config mine.toml`: a user's recipe keeping CLIP-L's first layer's MLP out of 8 bits
    gets it FP16 in the INT8 ONNX (the shipped recipe would quantize it); on a work dir calibrated with the shipped
    recipe, that recipe is refused in one line naming the one calibrate used (with or without --int8)."""
    mine = tmp_path / "mine.toml"
    shipped = 'exclude = ["text_projection", "text_model.embeddings*"]'  # [clip_l]'s, then [clip_g]'s
    mine.write_text((REPO / "calibration" / "fp8.toml").read_text().replace(
        shipped, shipped[:-1] + ', "text_model.encoder.layers.0.mlp*"]', 1))
    made = cli("export", "--model", "tiny", "--out", str(tmp_path / "w"), "--components", "clip_l", "--int8", "clip_l",
               "--precision", "int8", "--config", str(mine))
    assert made.returncode == 0, made.stderr[-3000:]
    layers = json.loads((tmp_path / "w" / "onnx-int8" / "clip_l" / "manifest.json").read_text())["layers"]
    mlp = [layer for layer in layers if layer.startswith("text_model.encoder.layers.0.mlp.")]
    assert mlp and all(layers[layer].startswith("fp16") for layer in mlp)
    next_layer = [got for layer, got in layers.items() if ".layers.1." in layer]
    assert next_layer and all(got.startswith("int8") for got in next_layer)  # the rest as the shipped recipe has it
    typo = tmp_path / "typo.toml"  # as calibrate does, an exclude matching nothing must not quietly quantize it
    typo.write_text(mine.read_text().replace('"text_model.encoder.layers.0.mlp*"', '"text_model.encoder.layer.0.mlp*"'))
    code, err = run_cli(capsys, ["export", "--model", "tiny", "--out", tmp_path / "w2", "--components", "clip_l",
                                 "--int8", "clip_l", "--precision", "int8", "--config", typo])
    assert_user_error(code, err, "exclude pattern 'text_model.encoder.layer.0.mlp*' matches no module")
    assert not (tmp_path / "w2" / "onnx-int8").exists()
    root, _, lora = int8_bundle
    code, err = run_cli(capsys, ["export", "--model", root / "hot", "--lora", lora, "--out", root / "work",
                                 "--components", "clip_l", "--int8", "clip_l", "--config", mine])
    assert_user_error(code, err, "calibrated with another recipe")
    assert "fp8.toml" in err and "--config" in err
    code, err = run_cli(capsys, ["export", "--model", root / "hot", "--lora", lora, "--out", root / "work",
                                 "--components", "clip_l", "--config", mine])  # asked for, so not silently unread
    assert_user_error(code, err, "calibrated with another recipe")


def test_preflight_says_the_int8_plan_and_refuses_int8_t5_without_t5(capsys):
    from sd35trt.cli.main import main

    code, err = run_cli(capsys, ["preflight", "--model", "tiny", "--no-t5", "--int8", "clip_g,t5"])
    assert_user_error(code, err, "INT8=... names t5 but T5=0")
    code, err = run_cli(capsys, ["preflight", "--model", "tiny", "--int8", "vae_decoder"])
    assert_user_error(code, err, "not supported by --int8")
    assert main(["preflight", "--model", "tiny", "--gpu", "turing", "--int8", "clip_l,clip_g"]) == 0
    out = capsys.readouterr().out  # the plan and the bundle folder the build will write
    assert "clip_l int8, clip_g int8" in out and str(Path("engines/tiny/turing-tensorrt-rtx-int8")) in out


@needs_rtx
def test_a_gemm_the_builder_cannot_compile_for_turing_is_named_not_blamed_on_the_driver(tmp_path):
    """Found building INT8 for Turing: TensorRT-RTX 1.7 has no FP32 GEMM for SM75 (an FP32 island's AdaLN linear), and
    its log then ends in a CUDA-driver error. The one line names the operation and the GPU, not the driver."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sd35trt.core.errors import BuildError
    from sd35trt.core.targets import TARGETS, Backend, GpuTarget
    from sd35trt.producers.trt_builder import build_engine, choose_backend

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
         helper.make_node("Gemm", ["x32", "w"], ["y32"], transB=1, name="island_linear"),
         helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.FLOAT16)], "fp32_island",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "model.onnx")
    backend = choose_backend(Backend.TENSORRT_RTX, TARGETS[GpuTarget.TURING])
    profile = {"x": [[1, 64], [2, 64], [4, 64]]}
    with pytest.raises(BuildError) as refused:
        build_engine(backend, tmp_path / "model.onnx", profile, ((7, 5),), tmp_path / "model.plan")
    assert "cannot build island_linear for SM75: FP32 GEMM is not supported" in str(refused.value)
    assert "driver" not in refused.value.hint
    built = build_engine(backend, tmp_path / "model.onnx", profile, ((8, 6),), tmp_path / "model.plan")
    assert built is not None and (tmp_path / "model.plan").stat().st_size > 0  # the same graph for Ampere


def test_preflight_refuses_turing_for_a_model_with_a_recipe_island(capsys):
    """SD3.5-Large's block 35 is an FP32 island in every precision, and TensorRT-RTX 1.7 has no FP32 GEMM for SM75:
    refused in preflight (a second, no weights), not after calibrate and export."""
    from sd35trt.cli.main import main

    code, err = run_cli(capsys, ["preflight", "--model", "sd3.5-large", "--gpu", "turing"])
    assert_user_error(code, err, "builds no FP32 GEMM for SM75, and sd3.5-large runs transformer_blocks.35")
    assert main(["preflight", "--model", "sd3.5-large", "--gpu", "ampere"]) == 0
    assert main(["preflight", "--model", "sd3.5-medium", "--gpu", "turing"]) == 0
    assert "builds no FP32 GEMM" in capsys.readouterr().out  # the note: islands the census finds stop the build


def test_preflight_reads_the_users_recipe(capsys, tmp_path):
    """`make engines RECIPE=mine.toml` passes it to preflight: the Turing check takes its island sites from it, and a
    broken recipe is one line there, before any step."""
    from sd35trt.cli.main import main

    mine = tmp_path / "mine.toml"
    mine.write_text((REPO / "calibration" / "fp8.toml").read_text().replace('upcast = ["transformer_blocks.35"]', ""))
    assert main(["preflight", "--model", "sd3.5-large", "--gpu", "turing", "--config", str(mine)]) == 0
    assert "builds no FP32 GEMM" in capsys.readouterr().out  # no recipe island: the census's note, not a refusal
    broken = tmp_path / "broken.toml"
    broken.write_text("[transformer\n")
    code, err = run_cli(capsys, ["preflight", "--model", "tiny", "--gpu", "ada", "--config", broken])
    assert_user_error(code, err, "recipe is not valid TOML")  # make passes RECIPE= to it: tests/test_calibrate.py
