"""What a built engine holds, read from TensorRT's own words: the builder's DETAILED per-layer report (TensorRT-RTX,
and full TensorRT) or the engine inspector's JSON (full TensorRT), parsed into one shape of layer rows, and the
summary every manifest carries (GEMMs by input type, FP8 tensors, 4-bit weight tensors, GEMMs inside FP32 islands).
Pure text: no TensorRT module is imported here."""

from __future__ import annotations

import re
from typing import Any

_LAYER = re.compile(r"Name: (?P<name>.*?), LayerType: (?P<type>[^,]+), Inputs: \[(?P<inputs>.*?)\], Constants: "
                    r"\[(?P<consts>.*?)\], Outputs:")
_DTYPE = re.compile(r"Datatype: (\w+)")


def parse_layers(reports: list[str]) -> list[dict[str, Any]]:
    """Per-layer type and input/constant dtypes from the builder's DETAILED layer report."""
    layers = []
    for report in reports:
        for chunk in re.split(r"\nName: ", "\n" + report.split("Layers:", 1)[-1]):
            match = _LAYER.search("Name: " + chunk.strip())
            if not match:
                continue
            layers.append({"name": match["name"], "type": match["type"].strip(),
                           "input_dtypes": _DTYPE.findall(match["inputs"]),
                           "weight_dtypes": _DTYPE.findall(match["consts"])})
    return layers


_INSPECTOR_DTYPES = (("FP8", "FP8"), ("E4M3", "FP8"), ("BF16", "BFloat16"), ("BFLOAT16", "BFloat16"),
                     ("FP16", "Half"), ("HALF", "Half"), ("FP32", "Float"), ("FLOAT", "Float"), ("INT8", "Int8"),
                     ("INT32", "Int32"), ("INT64", "Int64"), ("BOOL", "Bool"))


def _inspector_dtype(text: str) -> str:
    """``"Row major linear FP16 format"`` → ``Half`` (the builder log's names, which summarize_layers reads)."""
    upper = text.upper()
    return next((name for token, name in _INSPECTOR_DTYPES if token in upper), text or "unknown")


def parse_inspector_json(text: str) -> list[dict[str, Any]]:
    """Layers of ``IEngineInspector.get_engine_information(JSON)`` at DETAILED verbosity, in ``parse_layers``'
    shape; [] when the JSON holds layer names only (a plan built without detailed profiling) or is unreadable."""
    import json

    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return []
    layers = []
    for layer in data.get("Layers", []) if isinstance(data, dict) else []:
        if not isinstance(layer, dict):
            return []
        found = layer.get("Weights")
        weights: dict[str, Any] = found if isinstance(found, dict) else {}
        layers.append({"name": str(layer.get("Name", "")), "type": str(layer.get("LayerType", "")),
                       "input_dtypes": [_inspector_dtype(str(t.get("Format/Datatype", "")))
                                        for t in layer.get("Inputs", []) if isinstance(t, dict)],
                       "weight_dtypes": [_inspector_dtype(str(weights["Type"]))] if "Type" in weights else []})
    return layers


def island_scope(module: str) -> str:
    """A module path as it appears in ONNX node (and so TensorRT layer) names: ``encoder.block.23`` →
    ``/encoder/block.23/`` (the legacy exporter joins module names with '/', keeping ``list.index``)."""
    parts: list[str] = []
    for part in module.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/"


def is_gemm(layer: dict[str, Any]) -> bool:
    """A GEMM layer: TensorRT's MatrixMultiply/Gemm, TensorRT-RTX's ``gemm``, and RTX's ``runtime_fusion`` layers
    whose fused name starts with ``Fc`` (a GEMM with its bias/residual add, e.g. ``__myl_FcAddSilu_myl0_2``)."""
    kind = layer["type"]
    if kind in ("gemm", "MatrixMultiply", "Gemm") or "gemm" in kind.lower():
        return True
    return kind == "runtime_fusion" and re.search(r"(^|_)Fc[A-Z_]", layer["name"] + "_") is not None


def summarize_layers(layers: list[dict[str, Any]], islands: list[str] | None = None) -> dict[str, int]:
    gemms = [l for l in layers if is_gemm(l)]
    fp8 = [l for l in gemms if l["input_dtypes"][:1] == ["FP8"]]
    half = [l for l in gemms if l["input_dtypes"][:1] in (["Half"], ["BFloat16"])]
    scopes = [island_scope(m) for m in islands or []]
    inside = [l for l in gemms if any(s in l["name"] for s in scopes)]
    return {"layers": len(layers), "gemm": len(gemms), "gemm_fp8": len(fp8), "gemm_fp16": len(half),
            "gemm_other": len(gemms) - len(fp8) - len(half),
            "fp8_tensors": sum(l["input_dtypes"].count("FP8") + l["weight_dtypes"].count("FP8") for l in layers),
            # 4-bit weights: layers holding INT4 / FP4 (E2M1) constants. TensorRT-RTX 1.7 keeps them 4-bit in the plan
            # and dequantizes them in generated kernels ("kgen CastMulCast") ahead of the GEMMs, which its layer
            # report lists as FP16 GEMMs: these counts say how many 4-bit weight tensors the engine holds.
            "int4_weights": sum(l["weight_dtypes"].count("Int4") for l in layers),
            "fp4_weights": sum(l["weight_dtypes"].count("FP4E2M1") for l in layers),
            "int8_weights": sum(l["weight_dtypes"].count("Int8") for l in layers),  # --int8: the same, 8-bit
            "island_gemm": len(inside), "island_gemm_fp32": sum(l["input_dtypes"][:1] == ["Float"] for l in inside)}
