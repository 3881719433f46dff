"""Turn a legacy-exported ModelOpt FP8 graph into standard ONNX Q/DQ with FP8 weights, streaming.

``torch.onnx.export(dynamo=False)`` of a ModelOpt-quantised module emits ``trt::TRT_FP8QuantizeLinear`` /
``TRT_FP8DequantizeLinear`` pairs that onnxruntime and ``onnx.checker`` reject. ModelOpt's own
``FP8QuantExporter`` fixes that but works on the whole model in memory (graphsurgeon import, constant
folding), which is what costs tens of GiB at SD3.5 size. This rewrite touches one tensor at a time:

* weight Q/DQ pairs (Q fed by an initializer) are folded: the weight is quantised once to a
  ``FLOAT8E4M3FN`` initializer feeding a standard ``DequantizeLinear`` (half the bytes of FP16 weights, so
  half of what the TensorRT builder must hold in memory);
* activation pairs become standard ``QuantizeLinear(saturate=1)`` / ``DequantizeLinear`` with an FP8 zero
  point, so the graph loads in onnxruntime and passes ``onnx.checker``;
* the ``trt`` opset import and stale ``value_info`` (typed uint8 by the custom ops) are removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sd35trt.core.errors import ArtifactError

FP8_MAX = 448.0


def _zero_point(name: str):
    import onnx

    zp = onnx.TensorProto()
    zp.name = name
    zp.data_type = onnx.TensorProto.FLOAT8E4M3FN
    zp.raw_data = b"\x00"
    return zp


def _constant_values(model) -> dict:
    """Outputs of Constant nodes (the scales ModelOpt's symbolic emits) as numpy arrays."""
    import onnx
    from onnx import numpy_helper

    values = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                # Scales are inline scalars; large constants may live in external data and are not needed.
                if attr.name == "value" and attr.t.data_location != onnx.TensorProto.EXTERNAL:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def rewrite_fp8_qdq(model_path: Path) -> dict[str, int]:
    """Rewrite ``model_path`` in place (its folder is a temp folder owned by the caller). Returns counts."""
    import onnx
    from onnx import helper

    from sd35trt.core.onnx_utils import save_streaming

    folder = model_path.parent
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = _constant_values(model)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    zp_name = "sd35trt_fp8_zero_point"
    graph.initializer.append(_zero_point(zp_name))
    counts = {"weights_folded": 0, "activation_qdq": 0}
    drop_nodes, drop_inits = [], set()
    for node in list(graph.node):
        if node.op_type != "TRT_FP8QuantizeLinear":
            continue
        dq_nodes = consumers.get(node.output[0], [])
        if len(dq_nodes) != 1 or dq_nodes[0].op_type != "TRT_FP8DequantizeLinear":
            raise ArtifactError(f"unexpected FP8 graph: {node.name} does not feed exactly one dequantize",
                                path=model_path, hint="report this; the ModelOpt version may have changed its export")
        dq = dq_nodes[0]
        source = node.input[0]
        scale_name = node.input[1]
        if source in initializers and scale_name in constants and len(consumers.get(source, [])) == 1:
            packed = _fp8_weight(initializers[source], constants[scale_name], folder)
            graph.initializer.append(packed)
            drop_inits.add(source)
            drop_nodes.append(node)
            dq.input[0] = packed.name
            counts["weights_folded"] += 1
        else:
            node.op_type, node.domain = "QuantizeLinear", ""
            del node.input[2:]
            node.input.append(zp_name)
            node.attribute.append(helper.make_attribute("saturate", 1))
            counts["activation_qdq"] += 1
        dq.op_type, dq.domain = "DequantizeLinear", ""
        del dq.input[2:]
        dq.input.append(zp_name)

    _prune(model, drop_nodes, drop_inits)
    leftovers = [n.name for n in graph.node if n.domain == "trt"]
    if leftovers:
        raise ArtifactError(f"{len(leftovers)} TensorRT custom ops left after the FP8 rewrite", path=model_path,
                            hint="report this; the ModelOpt version may have changed its export")
    save_streaming(model, model_path, source_dir=folder)
    _drop_unreferenced_data(model_path)
    onnx.checker.check_model(str(model_path))
    return counts


def _fp8_weight(weight: Any, scale_value: Any, folder: Path) -> Any:
    """A weight initializer quantized to FP8 E4M3 with its (per-tensor) scale: the ``<name>_fp8`` initializer the
    DequantizeLinear reads in place of the FP32/FP16 weight and its QuantizeLinear."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    array = numpy_helper.to_array(weight, base_dir=str(folder))
    scale = float(np.asarray(scale_value, dtype=np.float32).reshape(-1)[0])
    scaled = torch.from_numpy(np.asarray(array, dtype=np.float32)) / scale
    fp8 = scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    packed = onnx.TensorProto()
    packed.name = weight.name + "_fp8"
    packed.data_type = onnx.TensorProto.FLOAT8E4M3FN
    packed.dims.extend(array.shape)
    packed.raw_data = fp8.tobytes()
    return packed


def _prune(model: Any, drop_nodes: list, drop_inits: set[str]) -> None:
    """Drop the folded weights' quantize nodes and original initializers, the stale value infos (shapes are
    inferred again) and TensorRT's custom opset."""
    graph = model.graph
    kept_nodes = [n for n in graph.node if all(n is not d for d in drop_nodes)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept_inits = [t for t in graph.initializer if t.name not in drop_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.value_info[:]
    opsets = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(opsets)


def _drop_unreferenced_data(model_path: Path) -> None:
    """Remove data files of the folder that the rewritten model no longer references."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    model = onnx.load(str(model_path), load_external_data=False)
    used = {ExternalDataInfo(t).location for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL}
    for path in model_path.parent.iterdir():
        if path.is_file() and path != model_path and path.name not in used and not path.name.endswith(".json"):
            path.unlink()
