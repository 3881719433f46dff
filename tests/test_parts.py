"""Engine parts (sd35trt.producers.parts): a component cut into graphs that build one at a time must compute exactly what
the whole graph computes, carry only activations between parts, and build into a bundle the runners chain."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sd35trt.core.errors import BuildError, InvalidInputError
from sd35trt.core.manifests import OnnxManifest, WorkDir
from sd35trt.core.specs import COMPONENTS, SPECS, Precision
from sd35trt.producers.bundle import BuildConfig, parse_parts
from sd35trt.producers.parts import MAX_PARTS, PEAK_RSS_FACTOR, builder_need, plan_part_counts
from tests.conftest import needs_rtx

GIB = 2**30


def _whole_and_parts(root, precision, name, count, tmp_path):
    from sd35trt.producers.parts import write_parts

    manifest = OnnxManifest.load(WorkDir(root).onnx_folder(precision, name), name, precision)
    return manifest, write_parts(manifest.onnx_path, count, manifest.profile, tmp_path / f"{name}-{count}")


def _feeds(manifest, point=1, seed=0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    feeds = {}
    for entry in manifest.inputs:
        shape = manifest.profile[entry["name"]][point]
        if entry["dtype"].startswith("int"):
            feeds[entry["name"]] = torch.randint(0, 99, shape, generator=generator, dtype=torch.int64)
        else:
            feeds[entry["name"]] = torch.randn(shape, generator=generator)
    return feeds


@pytest.mark.parametrize(("name", "count"), [(name, 2) for name in COMPONENTS] + [("transformer", 3), ("t5", 3)])
def test_parts_chained_compute_exactly_what_the_whole_graph_computes(calibrated, tmp_path, name, count):
    """Every component's FP32 ONNX, cut in 2 and 3: the parts chained through ChainRunner (onnxruntime under
    each part) give bit-identical outputs to the whole graph, at the profile's min and opt shapes."""
    import torch

    from sd35trt.runtime.runners import ChainRunner, ort_runner

    root, _ = calibrated
    manifest, parts = _whole_and_parts(root, Precision.FP32, name, count, tmp_path)
    assert [p.index for _, p in parts] == list(range(count))
    whole = ort_runner(SPECS[name], manifest.onnx_path, Precision.FP32, "cpu", manifest.profile)
    chain = ChainRunner(SPECS[name], [ort_runner(SPECS[name], path, Precision.FP32, "cpu", plan.profile, inputs=plan.inputs,
                                                 outputs=plan.outputs) for path, plan in parts])
    for point in (0, 1):  # min and opt (max is 8 images at 1536², minutes of CPU attention)
        feeds = _feeds(manifest, point)
        expected, got = whole(**feeds), chain(**feeds)
        assert set(got) == set(SPECS[name].output_names)
        for out in SPECS[name].output_names:
            assert torch.equal(expected[out], got[out]), f"{name} in {count} parts: {out} differs"


def test_parts_carry_activations_with_profiles_and_split_the_weights(calibrated, tmp_path):
    """What crosses a cut is an activation with a min/opt/max profile read from shape inference, never shape
    arithmetic (recomputed); every weight byte is in exactly one part; graph inputs go where they are used."""
    import onnx

    root, _ = calibrated
    manifest, parts = _whole_and_parts(root, Precision.FP16, "transformer", 2, tmp_path)
    (first_path, first), (second_path, second) = parts
    assert first.inputs == tuple(n for n in SPECS["transformer"].input_names if n in first.inputs)
    assert second.outputs == ("noise_pred",)
    carried = [n for n in second.inputs if n not in SPECS["transformer"].input_names]
    assert carried and set(carried) <= set(first.outputs)
    batch = [p[0] for p in manifest.profile["hidden_states"]]
    for tensor in carried:
        low, opt, high = second.profile[tensor]
        assert len(low) == len(high) and low[0] == batch[0] and high[0] == batch[2]  # batch from the profile
    model = onnx.load(str(second_path), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert all(types[n] in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) for n in carried)
    onnx.checker.check_model(str(first_path))
    whole_bytes = sum(e["bytes"] for e in manifest.files.values())
    assert abs(first.weight_bytes + second.weight_bytes - whole_bytes) < 0.01 * whole_bytes + (1 << 20)
    # the parts reference the component's own external data (a link to the same file), no weight is copied
    for data in (p for p in first_path.parent.iterdir() if p.name.endswith(".data")):
        assert data.samefile(manifest.folder / data.name)


def test_a_graph_with_no_allowed_cut_is_refused_in_one_line():
    """A graph whose every cut would carry an activation of unresolvable shape (reshaped by a runtime shape
    input) cannot be cut: one BuildError naming the tensor, never a broken part."""
    from onnx import TensorProto, helper, numpy_helper

    from sd35trt.producers.parts import plan_parts

    weights = [numpy_helper.from_array(np.ones((4, 4), np.float32), "w"),
               numpy_helper.from_array(np.ones((4, 4), np.float32), "w2")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4]),
                                           helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    with pytest.raises(BuildError, match="cannot cut this graph into 2 parts.*tensor h"):
        plan_parts(model, 2, {"x": [[1, 4], [2, 4], [4, 4]], "shape": [[2], [2], [2]]})


def test_part_counts_follow_the_flag_the_budget_and_the_host():
    weights = {"transformer": 8 * GIB, "t5": 9 * GIB, "clip_l": GIB // 4}
    explicit = plan_part_counts(weights, {"t5": 3}, None, None, memory_check=True)
    assert explicit["t5"].count == 3 and explicit["transformer"].count == 1 and explicit["t5"].reason == "--parts"
    budget = plan_part_counts(weights, {}, 16.0, None, memory_check=True)
    assert budget["transformer"].count == 2 and budget["clip_l"].count == 1
    assert builder_need(8 * GIB // 2, PEAK_RSS_FACTOR) <= 16 * GIB < builder_need(8 * GIB, PEAK_RSS_FACTOR)
    host = plan_part_counts(weights, {}, None, 12 * GIB, memory_check=True)  # a 12 GiB box builds T5 in parts
    assert host["t5"].count == 2 and "available" in host["t5"].reason and host["clip_l"].count == 1
    assert plan_part_counts(weights, {}, None, 12 * GIB, memory_check=False)["t5"].count == 1
    hopeless = plan_part_counts({"t5": 1000 * GIB}, {}, None, 12 * GIB, memory_check=True)
    assert hopeless["t5"].count == 1 and f"{MAX_PARTS} parts" in hopeless["t5"].reason


def test_bad_parts_flags_are_one_line_errors():
    assert parse_parts("transformer=2, t5=3") == (("transformer", 2), ("t5", 3))
    for text, match in (("transformer", "COMPONENT=COUNT"), ("transformer=two", "COMPONENT=COUNT")):
        with pytest.raises(InvalidInputError, match=match):
            parse_parts(text)
    with pytest.raises(InvalidInputError, match="a count from 1 to"):
        BuildConfig(parts=(("transformer", MAX_PARTS + 1),))
    with pytest.raises(InvalidInputError, match="a component being built"):
        BuildConfig(components=("clip_l",), parts=(("transformer", 2),))
    with pytest.raises(InvalidInputError, match="more than"):
        BuildConfig(max_build_memory_gib=0.5)


@needs_rtx
def test_build_in_parts_makes_a_bundle_the_runners_chain(work_copy):
    """`sd35trt build --parts`: real TensorRT-RTX builds of every part, the FP8 transformer keeps its FP8 GEMMs,
    the manifest lists each part's plan, I/O and builder memory, `bundle verify` checks every part, a re-run
    skips, and a different count rebuilds that component only."""
    from sd35trt.cli.main import app
    from sd35trt.core.manifests import BundleManifest

    engines = work_copy / "engines"
    runner = CliRunner()

    def build(*extra):
        result = runner.invoke(app, ["build", "--gpu", "ada", "--backend", "tensorrt-rtx", "--onnx", str(work_copy),
                                     "--out", str(engines), "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    whole = build("--components", "transformer", "--out", str(work_copy / "whole"))
    report = build("--parts", "transformer=2,t5=2")
    rows = report["components"]
    assert rows["transformer"]["parts"] == 2 and rows["t5"]["parts"] == 2 and rows["clip_l"]["parts"] == 1
    assert rows["transformer"]["gemm_fp8"] == whole["components"]["transformer"]["gemm_fp8"] > 0
    manifest = BundleManifest.load(engines / "tiny" / "ada-tensorrt-rtx")
    entry = manifest.components["transformer"]
    assert entry.parted and [p.file for p in entry.plans] == ["transformer.part1of2.plan", "transformer.part2of2.plan"]
    assert entry.plans[0].inputs is not None and entry.plans[-1].outputs == ("noise_pred",)
    assert all("peak_rss_gib" in p["builder_memory"] for p in entry.to_dict()["parts"])
    assert not list((engines / "tiny" / "ada-tensorrt-rtx").glob(".parts*"))
    result = runner.invoke(app, ["bundle", "verify", str(engines / "tiny" / "ada-tensorrt-rtx")])
    assert result.exit_code == 0, result.output
    assert build("--parts", "transformer=2,t5=2")["skipped"] is True
    again = build("--parts", "transformer=2,t5=3")
    assert again["rebuilt"] == ["t5"] and again["components"]["t5"]["parts"] == 3


@needs_rtx
def test_a_host_short_of_memory_builds_in_parts_instead_of_refusing(work_copy, monkeypatch):
    """Where MemAvailable + swap cannot hold a whole build (2.0x the weights + 1 GiB) but can hold half of one,
    `build` cuts the component into parts and says why in the manifest; with --no-memory-check it builds whole."""
    import sd35trt.producers.bundle as build
    from sd35trt.core.specs import Precision
    from sd35trt.producers.bundle import BuildConfig, build_bundle

    source = OnnxManifest.load(WorkDir(work_copy).onnx_folder(Precision.FP8, "transformer"), "transformer", Precision.FP8)
    weights = sum(e["bytes"] for e in source.files.values())
    monkeypatch.setattr(build, "available_memory", lambda: GIB + int(1.8 * weights))
    config = BuildConfig(components=("transformer",))
    entry = build_bundle(work_copy, work_copy / "engines", config).manifest.components["transformer"]
    assert len(entry.plans) == 2 and "available" in entry.to_dict()["parts_reason"]
    whole = build_bundle(work_copy, work_copy / "engines-whole", BuildConfig(components=("transformer",),
                                                                             memory_check=False))
    assert len(whole.manifest.components["transformer"].plans) == 1


def test_parts_of_an_external_data_onnx_link_its_weights_and_still_load(calibrated, tmp_path):
    """Real-size ONNX keep their weights in one external-data file. Parts link that file (a hard link on one file
    system, so onnxruntime, which refuses data resolving outside a model's folder, loads them) and compute
    exactly what the whole graph computes."""
    import onnx
    import torch

    from sd35trt.producers.parts import write_parts
    from sd35trt.runtime.runners import ChainRunner, ort_runner

    root, _ = calibrated
    manifest = OnnxManifest.load(WorkDir(root).onnx_folder(Precision.FP32, "transformer"), "transformer", Precision.FP32)
    source = tmp_path / "src"
    source.mkdir()
    onnx.save(onnx.load(str(manifest.onnx_path)), str(source / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    parts = write_parts(source / "model.onnx", 2, manifest.profile, tmp_path / "parts")
    link = tmp_path / "parts" / "model.onnx.data"
    assert link.samefile(source / "model.onnx.data") and not link.is_symlink()
    spec = SPECS["transformer"]
    whole = ort_runner(spec, source / "model.onnx", Precision.FP32, "cpu", manifest.profile)
    chain = ChainRunner(spec, [ort_runner(spec, path, Precision.FP32, "cpu", plan.profile, inputs=plan.inputs,
                                          outputs=plan.outputs) for path, plan in parts])
    feeds = _feeds(manifest, 0)
    assert torch.equal(whole(**feeds)["noise_pred"], chain(**feeds)["noise_pred"])


def test_shape_types_are_read_while_the_data_file_is_linked(calibrated, tmp_path):
    """While parts are built, the component's data file has a second hard link, which onnx's own external-data
    loader refuses. The planner reads its small tensors directly, so onnxruntime's symbolic shape inference still
    resolves what ONNX's own leaves open (T5's relative position bias, built from Range)."""
    import onnx

    from sd35trt.producers.parts import _infer_types, write_parts

    root, _ = calibrated
    manifest = OnnxManifest.load(WorkDir(root).onnx_folder(Precision.FP32, "t5"), "t5", Precision.FP32)
    source = tmp_path / "src"
    source.mkdir()
    onnx.save(onnx.load(str(manifest.onnx_path)), str(source / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=64)
    write_parts(source / "model.onnx", 2, manifest.profile, tmp_path / "parts")
    assert (source / "model.onnx.data").stat().st_nlink == 2
    model = onnx.load(str(source / "model.onnx"), load_external_data=False)
    types = _infer_types(model, {n: s[1] for n, s in manifest.profile.items()}, source)
    bias = [name for name in types if name.endswith("SelfAttention/Unsqueeze_8_output_0")]
    assert bias and all(None not in types[name][1] for name in bias)
