"""Low-bit weights: INT4 (AWQ, block-wise), NVFP4 (E2M1 with FP8 block scales) and INT8 (per output channel),
computed, faked in torch and written as standard ONNX that TensorRT and TensorRT-RTX fuse into weight-only GEMMs.

ModelOpt calibrates INT4 with AWQ (``INT4_AWQ_CFG``: per-channel input scales found on real traffic, then block
amax), but its ONNX exporter fails on the SD3 transformer for every 4-bit format (ENVIRONMENT.md), so the ONNX is
written here, as ``fp8_onnx`` does for FP8. What calibrate keeps per quantized layer is small (``Int4Layer``: the
AWQ input scale and the block amax); export rebuilds the layer from the FP16 network with it:

* INT4: ``y = (x * s) @ DequantizeLinear(Wq, scale, axis=0, block_size=B) + b``, Wq signed 4-bit, ``scale =
  amax / 7`` per block of ``B`` input channels (128 where the width allows it), ``s`` AWQ's ``pre_quant_scale``
  (the weights were multiplied by ``1/s``); opset 21.
* NVFP4 (weight-only, W4A16): ``W ≈ e2m1 x fp8_e4m3(block scale) x global scale`` in blocks of 16 input
  channels: ``DequantizeLinear(W_fp4, DequantizeLinear(scale_fp8, global_fp32), axis=0, block_size=16)``, opset
  23; deterministic from the weights (no calibration data), so it runs on a CPU as well. Activations stay FP16:
  FP4 activations (W4A4) need TensorRT's dynamic-quantize op, which neither onnxruntime nor any machine here runs.
* INT8 (weight-only, ``--int8``): ``y = x @ DequantizeLinear(Wq, scale, axis=1) + b``, Wq signed 8-bit in -127..127,
  ``scale = amax / 127`` per output channel (torchao's ``int8_weight_only``); deterministic from the weights, no
  calibration; half the FP16 bytes. TensorRT-RTX 1.7 builds it for every CC it targets (SM75 to SM120).

Each quantized ``nn.Linear`` is swapped for a ``QuantizedLinear`` that computes exactly what the ONNX computes
(the fake-quant reference the ONNX is validated against) and traces to those nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

INT4_BLOCKS = (128, 64, 32, 16)  # the first that divides a layer's input width (128 for every SD3.5 layer)
NVFP4_BLOCK = 16
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 E2M1 magnitudes, by code 0..7 (code 8..15: negative)
FP8_MAX, FP4_MAX, INT8_MAX = 448.0, 6.0, 127
FP4_DQ = "FP4Dequantize"  # the traced placeholder, replaced by the double DequantizeLinear in ``rewrite_4bit``
DOMAIN = "sd35trt"


def int4_block(in_features: int) -> int | None:
    """INT4 block size for a layer (None: its width takes no block size TensorRT supports)."""
    return next((b for b in INT4_BLOCKS if in_features % b == 0), None)


@dataclass
class Int4Layer:
    """What AWQ calibration leaves for one layer: its input scale (``pre_quant_scale``, None without AWQ) and the
    amax of each block of its scaled weight, ``[out, in / block]``."""

    block: int
    amax: Any
    pre_quant_scale: Any | None = None

    def to_state(self) -> dict[str, Any]:
        return {"block": self.block, "amax": self.amax.detach().float().cpu(),
                "pre_quant_scale": None if self.pre_quant_scale is None else self.pre_quant_scale.detach().float().cpu()}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Int4Layer:
        return cls(int(data["block"]), data["amax"], data.get("pre_quant_scale"))


def int4_layers_of(networks: Any) -> dict[str, Int4Layer]:
    """The INT4 layers of ModelOpt-calibrated networks (a ModuleDict by pipeline attribute): block, amax and AWQ
    scale of every enabled 4-bit weight quantizer, by ``attr.module`` name."""
    found = {}
    for name, module in networks.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not quantizer.is_enabled or getattr(quantizer, "num_bits", None) != 4:
            continue
        out_features, in_features = module.weight.shape
        block = int((quantizer.block_sizes or {}).get(-1, in_features))
        pqs = getattr(module.input_quantizer, "pre_quant_scale", None)
        found[name] = Int4Layer(block, quantizer.amax.detach().float().reshape(out_features, in_features // block),
                                None if pqs is None else pqs.detach().float())
    return found


def quantize_int4(weight: torch.Tensor, layer: Int4Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): signed 4-bit codes ``[out, in]`` (int8 in -8..7) and FP32 scales ``[out, in / block]`` of the
    AWQ-scaled weight ``W / s``, as ModelOpt's fake quantizer rounds it (scale = amax / 7)."""
    import torch

    w = weight.detach().float()
    if layer.pre_quant_scale is not None:
        w = w / layer.pre_quant_scale.to(w.device).view(1, -1)
    out_features, in_features = w.shape
    scale = (layer.amax.to(w.device).float() / 7.0).clamp_min(torch.finfo(torch.float32).tiny)
    blocks = w.view(out_features, in_features // layer.block, layer.block)
    q = torch.round(blocks / scale.unsqueeze(-1)).clamp(-8, 7).to(torch.int8)
    return q.view(out_features, in_features), scale


def quantize_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, block_scales, global_scale) of NVFP4: E2M1 codes ``[out, in]`` (uint8 0..15, bit 3 the sign), FP8 E4M3
    block scales ``[out, in / 16]`` (FP32 tensors holding FP8-representable values) and one FP32 global scale, with
    ``W ≈ E2M1[code] x block_scale x global_scale`` (NVIDIA's two-level NVFP4 scaling)."""
    import torch

    w = weight.detach().float()
    out_features, in_features = w.shape
    blocks = w.view(out_features, in_features // NVFP4_BLOCK, NVFP4_BLOCK)
    global_scale = (w.abs().amax() / (FP4_MAX * FP8_MAX)).clamp_min(torch.finfo(torch.float32).tiny)
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = (block_amax / FP4_MAX / global_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
    effective = (block_scale * global_scale).clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    magnitudes = torch.tensor(E2M1, device=w.device)
    scaled = (blocks / effective).abs().clamp(max=FP4_MAX)
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    code = torch.bucketize(scaled, midpoints)  # nearest E2M1 magnitude (ties to the larger)
    code = code + 8 * (blocks < 0).to(code.dtype)
    return code.to(torch.uint8).view(out_features, in_features), block_scale, global_scale


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): signed 8-bit codes ``[out, in]`` in -127..127 and FP32 scales ``[out]``, symmetric per output
    channel (``scale = amax / 127``)."""
    import torch

    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale.unsqueeze(1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_nvfp4(codes: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    import torch

    magnitudes = torch.tensor(E2M1, device=codes.device)
    values = magnitudes[(codes & 7).long()] * torch.where(codes >= 8, -1.0, 1.0)
    out_features, in_features = codes.shape
    scale = (block_scale * global_scale).unsqueeze(-1)
    return (values.view(out_features, in_features // NVFP4_BLOCK, NVFP4_BLOCK) * scale).view(out_features, in_features)


def linear(module: Any) -> bool:
    """A Linear layer (ModelOpt's QuantLinear included): what weight quantization applies to."""
    import torch

    return isinstance(module, torch.nn.Linear)


def int4_block_of(module: Any) -> int | None:
    """INT4 block size for a module (None: not a Linear, or its width takes no block size TensorRT supports)."""
    return int4_block(module.in_features) if linear(module) else None


def nvfp4_quantizable(module: Any) -> bool:
    return linear(module) and module.in_features % NVFP4_BLOCK == 0


def quantized_linear(module: Any, fmt: str, layer: Int4Layer | None = None) -> Any:
    """The ``QuantizedLinear`` of an ``nn.Linear`` (ModelOpt's QuantLinear included) in ``fmt`` (int4 | nvfp4 |
    int8), in the dtype and on the device of its weight."""
    import torch

    class QuantizedLinear(torch.nn.Module):
        """``y = (x * s) @ dequantize(W)^T + b``: what the ONNX computes, weights stored as in the ONNX."""

        def __init__(self):
            super().__init__()
            weight = module.weight
            self.fmt, self.dtype = fmt, weight.dtype
            if fmt == "int4":
                assert layer is not None
                q, scale = quantize_int4(weight, layer)
                self.block = layer.block
                self.register_buffer("codes", q.t().contiguous())  # [in, out]: MatMul's B, blocks along axis 0
                self.register_buffer("scale", scale.t().contiguous().to(weight.dtype))  # [in / block, out]
                pqs = layer.pre_quant_scale
                self.register_buffer("input_scale", None if pqs is None else pqs.to(weight.device, weight.dtype))
            elif fmt == "int8":
                q, scale = quantize_int8(weight)
                self.register_buffer("codes", q.t().contiguous())  # [in, out]: MatMul's B, a scale per column
                self.register_buffer("scale", scale.to(weight.dtype))
                self.register_buffer("input_scale", None)
            else:
                codes, block_scale, global_scale = quantize_nvfp4(weight)
                self.block = NVFP4_BLOCK
                self.register_buffer("codes", codes.t().contiguous())
                self.register_buffer("scale", block_scale.t().contiguous())  # FP32 holding FP8 E4M3 values
                self.register_buffer("global_scale", global_scale.reshape(()).clone())
                self.register_buffer("input_scale", None)
            self.register_buffer("bias", None if module.bias is None else module.bias.detach().clone())

        def weight_t(self) -> torch.Tensor:
            """The dequantized weight, transposed ``[in, out]``, as the ONNX's DequantizeLinear gives it."""
            if self.fmt == "int4":
                return _Int4Dequantize.apply(self.codes, self.scale, self.block)
            if self.fmt == "int8":
                return _Int8Dequantize.apply(self.codes, self.scale)
            return _Fp4Dequantize.apply(self.codes, self.scale, self.global_scale, self.dtype)

        @property
        def weight(self) -> torch.Tensor:
            """The dequantized weight ``[out, in]``: networks read their Linear's ``weight.dtype`` (transformers' T5
            feed-forward casts its input to ``wo.weight.dtype``); a traced export drops it where nothing else uses it."""
            return self.weight_t().t()

        def forward(self, x):
            if self.input_scale is not None:
                x = x * self.input_scale
            y = torch.matmul(x, self.weight_t())
            return y + self.bias if self.bias is not None else y

    return QuantizedLinear()


def _int4_dequantize(codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    in_features, out_features = codes.shape
    blocks = codes.to(scale.dtype).view(in_features // block, block, out_features)
    return (blocks * scale.unsqueeze(1)).view(in_features, out_features)


def _make_dequantizers():
    import torch

    class Int4Dequantize(torch.autograd.Function):
        @staticmethod
        def forward(ctx, codes, scale, block):  # noqa: ARG004 - autograd's signature
            return _int4_dequantize(codes, scale, block)

        @staticmethod
        def symbolic(g, codes, scale, block):
            return g.op("DequantizeLinear", codes, scale, axis_i=0, block_size_i=block)

    class Int8Dequantize(torch.autograd.Function):
        @staticmethod
        def forward(ctx, codes, scale):  # noqa: ARG004
            return codes.to(scale.dtype) * scale

        @staticmethod
        def symbolic(g, codes, scale):
            return g.op("DequantizeLinear", codes, scale, axis_i=1)

    class Fp4Dequantize(torch.autograd.Function):
        @staticmethod
        def forward(ctx, codes, scale, global_scale, dtype):  # noqa: ARG004
            return dequantize_nvfp4(codes.t(), scale.t(), global_scale).t().to(dtype)

        @staticmethod
        def symbolic(g, codes, scale, global_scale, dtype):
            out = g.op(f"{DOMAIN}::{FP4_DQ}", codes, scale, global_scale, block_size_i=NVFP4_BLOCK)
            if isinstance(dtype, torch.dtype):  # the placeholder's type, so the exporter's shape inference is quiet
                out.setType(codes.type().with_dtype(dtype))
            return out


    return Int4Dequantize, Int8Dequantize, Fp4Dequantize


_Int4Dequantize, _Int8Dequantize, _Fp4Dequantize = _make_dequantizers()


def swap_in(network: Any, layers: dict[str, Any], fmt: str) -> list[str]:
    """Replace the named ``nn.Linear`` layers of ``network`` by their ``QuantizedLinear`` (``layers``: name → its
    ``Int4Layer`` for int4, anything for nvfp4). Returns the names swapped."""
    modules = dict(network.named_modules())
    for name, layer in layers.items():
        _put(network, modules, name, quantized_linear(modules[name], fmt, layer))
    return list(layers)


@contextlib.contextmanager
def swapped(network: Any, layers: dict[str, Any], fmt: str) -> Iterator[None]:
    """``swap_in`` for the block, the original layers put back after it (a fake-quant run of a network that stays
    the model)."""
    modules = dict(network.named_modules())
    saved = {name: modules[name] for name in layers}
    swap_in(network, layers, fmt)
    try:
        yield
    finally:
        current = dict(network.named_modules())
        for name, module in saved.items():
            _put(network, current, name, module)


def _put(network: Any, modules: dict[str, Any], name: str, module: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(modules[parent] if parent else network, child, module)


# --- the ONNX: 4-bit initializers --------------------------------------------------------------------------------


def _pack4(values: Any) -> bytes:
    """Two 4-bit values per byte, the first in the low nibble (ONNX's INT4/FLOAT4E2M1 raw layout)."""
    import numpy as np

    flat = np.asarray(values, dtype=np.uint8).reshape(-1) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def rewrite_4bit(model_path: Path) -> dict[str, int]:
    """Turn the traced graph's 4-bit weights into standard ONNX, in place: INT8 codes feeding a block-wise
    ``DequantizeLinear`` become INT4 initializers; each ``sd35trt::FP4Dequantize`` placeholder becomes a FLOAT4E2M1
    weight dequantized by FP8 E4M3 block scales, themselves dequantized by the FP32 global scale (opset 23).
    Returns counts for the manifest."""
    import numpy as np
    import onnx

    from sd35trt.core.onnx_utils import save_streaming

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    values = _GraphValues(model, model_path.parent)
    counts = {"int4_weights": 0, "nvfp4_weights": 0}
    new_nodes = []
    for node in list(graph.node):
        if node.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in node.attribute):
            codes = values.array(node.input[0])
            if codes.dtype == np.int8 and codes.min() >= -8 and codes.max() <= 7:
                values.replace(node.input[0], onnx.TensorProto.INT4, codes.shape, _pack4(codes))
                counts["int4_weights"] += 1
        elif node.op_type == FP4_DQ and node.domain == DOMAIN:
            new_nodes.append((node, _fp4_dequantize(values, node)))
            counts["nvfp4_weights"] += 1
    for old, replacements in new_nodes:
        index = list(graph.node).index(old)
        graph.node.remove(old)
        for offset, node in enumerate(replacements):
            graph.node.insert(index + offset, node)
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:  # the placeholders' codes and scales
        graph.initializer.remove(tensor)
    if counts["nvfp4_weights"]:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, 23)
        kept = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    del graph.value_info[:]
    save_streaming(model, model_path, source_dir=model_path.parent)
    return counts


def count_int8_weights(model_path: Path) -> dict[str, int]:
    """The INT8 weight tensors of an ONNX (``DequantizeLinear`` of an INT8 initializer), for the manifest; the
    traced graph is already standard ONNX, so nothing is rewritten (the weights' bytes are not read)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    return {"int8_weights": sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8)}


class _GraphValues:
    """A graph's constant values by name (initializers, external data included, and Constant nodes, through the
    Identity aliases the exporter adds to share equal initializers), read as arrays and replaced by initializers."""

    def __init__(self, model: Any, folder: Path):
        self.graph, self.folder = model.graph, folder
        self.inits = {t.name: t for t in self.graph.initializer}
        self.consts = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant"}
        self.aliases = {n.output[0]: n.input[0] for n in self.graph.node if n.op_type == "Identity"}

    def array(self, name: str) -> Any:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        from sd35trt.core.onnx_utils import read_external

        while name not in self.inits and name not in self.consts and name in self.aliases:
            name = self.aliases[name]
        if name in self.inits:
            tensor = self.inits[name]
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raw = read_external(tensor, self.folder)
                return np.frombuffer(raw, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tensor.dims)
            return numpy_helper.to_array(tensor)
        return numpy_helper.to_array(next(a.t for a in self.consts[name].attribute if a.name == "value"))

    def replace(self, name: str, data_type: int, dims: Any, raw: bytes) -> None:
        import onnx

        tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims), raw_data=raw)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
            return
        self.graph.initializer.append(tensor)
        self.inits[name] = self.graph.initializer[-1]
        if name in self.consts:  # a value the exporter folded into a Constant node becomes the initializer
            self.graph.node.remove(self.consts.pop(name))


def _fp4_dequantize(values: _GraphValues, node: Any) -> list[Any]:
    """The standard nodes for one ``FP4Dequantize`` placeholder: FLOAT4E2M1 weight, FP8 E4M3 block scales and the
    FP32 global scale as initializers; the scales dequantized by the global scale, the weight by the scales
    (blocks of 16 along its input axis), cast to FP16 under the placeholder's output name."""
    import numpy as np
    import onnx
    from onnx import helper

    codes, scales, global_scale = (values.array(n) for n in node.input)
    prefix = node.output[0]
    weight, block_scale, global_name = (f"{prefix}_fp4", f"{prefix}_scale_fp8", f"{prefix}_global_scale")
    values.replace(weight, onnx.TensorProto.FLOAT4E2M1, codes.shape, _pack4(codes))
    fp8 = np.asarray(scales, dtype=np.float32).astype(__import__("ml_dtypes").float8_e4m3fn)
    values.replace(block_scale, onnx.TensorProto.FLOAT8E4M3FN, scales.shape, fp8.tobytes())
    values.replace(global_name, onnx.TensorProto.FLOAT, (), np.asarray(global_scale, np.float32).tobytes())
    scale_out = f"{prefix}_scales"
    return [
        helper.make_node("DequantizeLinear", [block_scale, global_name], [scale_out], name=f"{prefix}_dq_scale"),
        helper.make_node("DequantizeLinear", [weight, scale_out], [f"{prefix}_fp32"], name=f"{prefix}_dq_weight",
                         axis=0, block_size=NVFP4_BLOCK),
        helper.make_node("Cast", [f"{prefix}_fp32"], [prefix], name=f"{prefix}_cast", to=onnx.TensorProto.FLOAT16),
    ]


def nvfp4_ort_twin(model_path: Path, dest: Path) -> Path:
    """The NVFP4 ONNX with each FP4 weight decoded from the graph itself (its FLOAT4E2M1 codes, FP8 block scales and
    FP32 global scale) into an FP16 initializer: onnxruntime 1.31 has no FP4 DequantizeLinear, so export validates
    this twin instead — what the 4-bit initializers encode, and everything around them, against the fake-quant
    network. Written to ``dest`` (never into the artifact)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from sd35trt.core.onnx_utils import read_external, save_streaming

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def raw(name: str) -> bytes:
        tensor = inits[name]
        return read_external(tensor, model_path.parent) if tensor.data_location == onnx.TensorProto.EXTERNAL \
            else tensor.raw_data

    magnitudes = np.asarray(E2M1, np.float32)
    produced = {out: node for node in graph.node for out in node.output}
    for cast in [n for n in graph.node if n.op_type == "Cast" and n.name.endswith("_cast")]:
        weight_dq = produced.get(cast.input[0])
        if weight_dq is None or weight_dq.op_type != "DequantizeLinear" or weight_dq.input[0] not in inits or \
                inits[weight_dq.input[0]].data_type != onnx.TensorProto.FLOAT4E2M1:
            continue
        scale_dq = produced[weight_dq.input[1]]
        codes_tensor = inits[weight_dq.input[0]]
        packed = np.frombuffer(raw(weight_dq.input[0]), np.uint8)
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[: int(np.prod(codes_tensor.dims))]
        values = magnitudes[codes & 7] * np.where(codes >= 8, -1.0, 1.0).astype(np.float32)
        import ml_dtypes

        scales = np.frombuffer(raw(scale_dq.input[0]), ml_dtypes.float8_e4m3fn).astype(np.float32)
        global_scale = np.frombuffer(raw(scale_dq.input[1]), np.float32)[0]
        rows, cols = codes_tensor.dims
        weight = (values.reshape(rows // NVFP4_BLOCK, NVFP4_BLOCK, cols)
                  * scales.reshape(rows // NVFP4_BLOCK, 1, cols) * global_scale).reshape(rows, cols)
        graph.initializer.append(numpy_helper.from_array(weight.astype(np.float16), cast.output[0]))
        for node in (cast, weight_dq, scale_dq):
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 21
    dest.mkdir(parents=True, exist_ok=True)
    save_streaming(model, dest / "model.onnx", source_dir=model_path.parent)
    return dest / "model.onnx"
