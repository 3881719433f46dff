"""ModelOpt quantizer state: the scales of a calibrated network, saved and restored in another process.

``calibrate`` writes the state, ``export`` restores it into an FP16 network to trace the FP8 ONNX; both import
this module, so neither imports the other. The same holds for the 4-bit formats' state (``FourBitState``: INT4's AWQ
layers, NVFP4's layer list, the mixed recipe's choice), what each Linear got, and its files.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35trt.core.artifacts import save_torch, write_json_atomic
from sd35trt.core.errors import CalibrationError
from sd35trt.core.numerics import Island
from sd35trt.core.specs import SPECS
from sd35trt.producers.mixed import MixedPlan
from sd35trt.producers.recipe import Recipe


def is_quantizer(module: Any) -> bool:
    """A ModelOpt quantizer: TensorQuantizer or a subclass (INT4's blocks are StaticBlockScaleQuantizer)."""
    return any(cls.__name__ == "TensorQuantizer" for cls in type(module).__mro__)


def collect_scales(model: Any) -> dict[str, float]:
    """amax of every enabled quantizer, by name (the calibrated state the determinism test compares)."""
    scales = {}
    for name, module in model.named_modules():
        if is_quantizer(module) and module.is_enabled and module.amax is not None:
            scales[name] = float(module.amax.float().max())
    return scales


def quant_state(networks: Any) -> dict[str, Any]:
    """ModelOpt's own state of the quantized ModuleDict (quantizer placement and config) and every amax:
    what ``restore_quantized`` needs to rebuild the same fake-quant networks in another process."""
    import modelopt.torch.opt as mto

    return {"modelopt_state": mto.modelopt_state(networks),
            "amax": {k: v.detach().cpu() for k, v in networks.state_dict().items() if k.endswith("_amax")},
            "attrs": list(networks.keys())}


def restore_quantized(pipe: Any, state_path: Path) -> Any:
    """Put the calibrated quantizers back into ``pipe``'s networks (any dtype); returns the ModuleDict."""
    import modelopt.torch.opt as mto
    import torch

    state = torch.load(state_path, map_location="cpu", weights_only=False)
    networks = torch.nn.ModuleDict({attr: getattr(pipe, attr) for attr in state["attrs"]})
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        # "Could not identify the device for TensorQuantizer states": the networks are on their device already.
        warnings.simplefilter("ignore", UserWarning)
        mto.restore_from_modelopt_state(networks, state["modelopt_state"])
    result = networks.load_state_dict(state["amax"], strict=False)
    if result.unexpected_keys:
        raise CalibrationError(f"calibration state does not fit this model ({result.unexpected_keys[0]})",
                               path=state_path, hint="re-run `sd35trt calibrate --force` for this model")
    return networks


def restore_4bit(pipe: Any, calibration: Path, fmt: Any) -> dict[str, list[str]]:
    """The 4-bit layers of a calibration swapped into ``pipe``'s FP16 networks (``weight_quant.QuantizedLinear``):
    INT4 from ``int4_state.pt`` (AWQ scales and block amax), NVFP4 from ``nvfp4_layers.json`` (its weights give its
    scales). Returns the layers swapped, by pipeline attribute."""
    import json

    import torch

    from sd35trt.producers.weight_quant import Int4Layer, swap_in

    swapped = {}
    if fmt.value == "int4":
        state = torch.load(calibration / INT4_STATE, map_location="cpu", weights_only=True)
        for attr, layers in state.items():
            network = getattr(pipe, attr)
            missing = [n for n in layers if n not in dict(network.named_modules())]
            if missing:
                raise CalibrationError(f"the INT4 state names layer {missing[0]}, which this model does not have",
                                       path=calibration, hint="re-run `sd35trt calibrate --force` for this model")
            swapped[attr] = swap_in(network, {n: Int4Layer.from_state(v) for n, v in layers.items()}, "int4")
    else:
        for attr, names in json.loads((calibration / NVFP4_LAYERS).read_text()).items():
            swapped[attr] = swap_in(getattr(pipe, attr), {n: None for n in names}, "nvfp4")
    return swapped


# --- the 4-bit state calibrate keeps ------------------------------------------------------------------------


@dataclass
class FourBitState:
    """What a 4-bit calibration keeps (by pipeline attribute, then layer name): INT4's AWQ layers (``Int4Layer``),
    or the layers NVFP4 quantizes (weight-only: a function of the weights, faked by swapping them in)."""

    int4: dict[str, Any] = field(default_factory=dict)
    nvfp4: dict[str, list[str]] = field(default_factory=dict)
    mixed: MixedPlan | None = None  # mixed: the budget's choice (``int4`` holds the chosen layers only)

    @contextlib.contextmanager
    def faked(self, pipe: Any):
        """The fake-quant networks for the block where ModelOpt's quantizers are not all of it: NVFP4's layers, and
        mixed's INT4 layers inside the FP8 network, swapped for ``QuantizedLinear`` and back."""
        from sd35trt.producers.weight_quant import swapped

        with contextlib.ExitStack() as stack:
            for attr, names in self.nvfp4.items():
                stack.enter_context(swapped(getattr(pipe, attr), {name: None for name in names}, "nvfp4"))
            for attr, layers in (self.int4 if self.mixed is not None else {}).items():
                stack.enter_context(swapped(getattr(pipe, attr), layers, "int4"))
            yield

    def layer_formats(self, pipe: Any, components: tuple[str, ...], recipe: Recipe,
                      islands: dict[str, list[Island]]) -> dict[str, dict[str, str]]:
        """What each GEMM (Linear) of the calibrated networks got and why, for the report: its 4-bit format and
        block, or FP16/FP32 with the reason it was left out."""
        import torch

        table: dict[str, dict[str, str]] = {}
        for name in components:
            attr = SPECS[name].pipeline_attr
            network = getattr(pipe, attr)
            wanted = set(recipe.quantizable(name, network, islands.get(name, [])))
            inside = [i.module for i in islands.get(name, [])]
            rows = {}
            for layer, module in network.named_modules():
                if not isinstance(module, torch.nn.Linear) or not layer:
                    continue
                if layer in self.int4.get(attr, {}):
                    cost = f", {self.mixed.delta[layer]:+.3g} rel-L2 {self.mixed.measured(layer)}" \
                        if self.mixed is not None else ""
                    rows[layer] = f"int4 (AWQ, block {self.int4[attr][layer].block}{cost})"
                elif layer in self.nvfp4.get(attr, ()):
                    rows[layer] = "nvfp4 (E2M1, FP8 scale per 16)"
                elif layer not in wanted:
                    rows[layer] = left_out(layer, inside)
                elif self.mixed is not None:
                    cost = self.mixed.delta.get(layer)
                    rows[layer] = "fp8 (E4M3)" + (f": kept, {cost:+.3g} rel-L2 as INT4 "
                                                  f"{self.mixed.measured(layer)}" if cost is not None else
                                                  ": its input width takes no 4-bit block")
                else:
                    rows[layer] = "fp16: its input width takes no 4-bit block"
            table[name] = rows
        return table

    def save(self, folder: Path) -> None:
        if self.int4:
            save_torch({attr: {name: layer.to_state() for name, layer in layers.items()}
                        for attr, layers in self.int4.items()}, folder / INT4_STATE)
        if self.nvfp4:
            write_json_atomic(folder / NVFP4_LAYERS, self.nvfp4)


INT4_STATE, NVFP4_LAYERS = "int4_state.pt", "nvfp4_layers.json"


def int4_layers_of(networks: Any) -> dict[str, Any]:
    """The INT4 layers of the calibrated networks, by pipeline attribute, then layer name."""
    from sd35trt.producers.weight_quant import int4_layers_of as layers_of

    found: dict[str, dict[str, Any]] = {}
    for name, layer in layers_of(networks).items():
        attr, _, module = name.partition(".")
        found.setdefault(attr, {})[module] = layer
    return found


def undo_awq(networks: Any) -> None:
    """AWQ-lite multiplies each layer's weight by 1/s and scales its input by s (``pre_quant_scale``): put the weights
    back and switch the input scale off, so the networks are the model again (the scales are kept in the state)."""
    import torch

    with torch.no_grad():
        for module in networks.modules():
            quantizer = getattr(module, "input_quantizer", None)
            scale = getattr(quantizer, "pre_quant_scale", None)
            if scale is not None:
                module.weight.mul_(scale.to(module.weight.dtype).view(1, -1))
                quantizer._enable_pre_quant_scale = False


def left_out(layer: str, islands: list[str]) -> str:
    """Why a Linear the recipe does not quantize keeps its precision, for the reports."""
    if any(layer == m or layer.startswith(m + ".") for m in islands):
        return "fp32: inside an FP32 island"
    return "fp16: the recipe keeps it out (embedders, norm_out, proj_out; the text encoders' projections)"


def int8_layers(network: Any, component: str, recipe: Recipe, islands: list[Island]) -> dict[str, str]:
    """What ``--int8`` gives each Linear of ``network``: INT8 to every one the recipe quantizes (its excludes, the
    embedders and projections both NVIDIA recipes keep precise, and the FP32 islands left out; the excludes it marks
    ``weight_only``, out of FP8 for their activations, taken), and why not to the others."""
    from sd35trt.producers.weight_quant import linear

    wanted = set(recipe.quantizable(component, network, islands, weight_only=True))
    fp8 = set(recipe.quantizable(component, network, islands))
    inside = [i.module for i in islands]

    def why(layer: str) -> str:
        if layer not in wanted:
            return left_out(layer, inside)
        return "int8 (weight-only, a scale per output channel)" + (
            "" if layer in fp8 else "; FP8 keeps it out for its activations' range, which INT8 weights leave in FP16")

    return {layer: why(layer) for layer, module in network.named_modules() if layer and linear(module)}


def nvfp4_layers(pipe: Any, components: tuple[str, ...], recipe: Recipe, islands: dict[str, list[Island]]) -> dict[str, list[str]]:
    """The layers NVFP4 quantizes: every Linear the recipe quantizes (its excludes and the islands left out) whose
    width takes FP4's blocks of 16."""
    from sd35trt.producers.weight_quant import nvfp4_quantizable

    found = {}
    for name in components:
        network = getattr(pipe, SPECS[name].pipeline_attr)
        modules = dict(network.named_modules())
        found[SPECS[name].pipeline_attr] = [layer for layer in recipe.quantizable(name, network, islands.get(name, []))
                                            if nvfp4_quantizable(modules[layer])]
    return found
