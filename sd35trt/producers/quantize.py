"""ModelOpt quantizer state: the scales of a calibrated network, saved and restored in another process.

``calibrate`` writes the state, ``export`` restores it into an FP16 network to trace the FP8 ONNX; both import
this module, so neither imports the other.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

from sd35trt.core.errors import CalibrationError


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
        state = torch.load(calibration / "int4_state.pt", map_location="cpu", weights_only=True)
        for attr, layers in state.items():
            network = getattr(pipe, attr)
            missing = [n for n in layers if n not in dict(network.named_modules())]
            if missing:
                raise CalibrationError(f"the INT4 state names layer {missing[0]}, which this model does not have",
                                       path=calibration, hint="re-run `sd35trt calibrate --force` for this model")
            swapped[attr] = swap_in(network, {n: Int4Layer.from_state(v) for n, v in layers.items()}, "int4")
    else:
        for attr, names in json.loads((calibration / "nvfp4_layers.json").read_text()).items():
            swapped[attr] = swap_in(getattr(pipe, attr), {n: None for n in names}, "nvfp4")
    return swapped
