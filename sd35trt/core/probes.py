"""Inputs an engine accepts beyond the traffic calibration saw: the ends of its shape ranges and of the timestep
range, and the inputs export validates on. calibrate's activation census and export's island check run them, so
an FP16 overflow that only shows at another image size or timestep is found before an engine is built.

``export_dims`` is where export traces (the small end of every range) and where it validates (a shape that differs
in every dynamic dim, so a traced constant cannot pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sd35trt.core.shapes import ShapeRanges
    from sd35trt.core.specs import ComponentSpec, PipeDims

# Timesteps at the two ends of the flow-matching schedule (SD3 passes sigma x 1000): pure noise and nearly clean.
PROBE_TIMESTEPS = (1000.0, 1.0)
EXPORT_TRACE_SEED, EXPORT_CHECK_SEED, PROBE_SEED = 1, 2, 3


def export_dims(spec: ComponentSpec, ranges: ShapeRanges, pipe_dims: PipeDims) -> tuple[dict[str, int], dict[str, int]]:
    """(trace dims, check dims): trace at the small end of every range; validate at a shape that differs in every
    dim that can vary (what proves the axes are really dynamic)."""
    def pick(rng, step, prefer_other_than):
        for value in (rng.min + step, rng.max, rng.opt):
            if rng.min <= value <= rng.max and value != prefer_other_than:
                return value
        return prefer_other_than

    dims = spec.dim_ranges(ranges, pipe_dims)  # the component's own ranges (batch from 1, doubled with CFG)
    trace = spec.concrete_dims(pipe_dims, batch=dims["batch"].min, height=dims["height"].min,
                               width=dims["width"].min, t5_tokens=ranges.t5_tokens.opt)
    check = spec.concrete_dims(
        pipe_dims, batch=pick(dims["batch"], 1, dims["batch"].min), height=pick(dims["height"], 64, dims["height"].min),
        width=pick(dims["width"], 128, dims["width"].min), t5_tokens=pick(ranges.t5_tokens, -64, ranges.t5_tokens.opt))
    return trace, check


@dataclass(frozen=True)
class Probe:
    """One call of a network on inputs of the engine's range (``label`` says which)."""

    label: str
    inputs: dict[str, Any]


def _label(dims: dict[str, int]) -> str:
    return f"batch {dims['batch']} at {dims['height']}x{dims['width']}"


def range_probes(spec: ComponentSpec, ranges: ShapeRanges, pipe_dims: PipeDims,
                 text: dict[str, Any] | None = None) -> list[Probe]:
    """The probe calls of one network under ``ranges``: export's own trace and check inputs; for the transformer,
    the smallest and largest image at both ends of the timestep range, on real text embeddings when ``text`` (a
    recorded transformer call: its last row is a positive prompt) has the right shape, noise latents. (The VAE
    decoder is convolutions and one attention over the latent: its values do not grow with the image, and at
    1536 px one FP16 decode costs a minute on a CPU, so it is probed at export's shapes only.)"""
    import torch

    trace, check = export_dims(spec, ranges, pipe_dims)
    probes = [Probe(f"export's trace inputs, {_label(trace)}", spec.dummy_inputs(pipe_dims, trace, seed=EXPORT_TRACE_SEED)),
              Probe(f"export's check inputs, {_label(check)}", spec.dummy_inputs(pipe_dims, check, seed=EXPORT_CHECK_SEED))]
    dims = spec.dim_ranges(ranges, pipe_dims)
    corners = [(dims["height"].min, dims["width"].min), (dims["height"].max, dims["width"].max)]
    if spec.name == "transformer":
        for height, width in corners:
            at = spec.concrete_dims(pipe_dims, batch=1, height=height, width=width, t5_tokens=ranges.t5_tokens.max)
            base = spec.dummy_inputs(pipe_dims, at, seed=PROBE_SEED)
            if text is not None and tuple(text["encoder_hidden_states"].shape[1:]) == tuple(base["encoder_hidden_states"].shape[1:]):
                base["encoder_hidden_states"] = text["encoder_hidden_states"][-1:].float()
                base["pooled_projections"] = text["pooled_projections"][-1:].float()
                where = "real text"
            else:
                where = "random text"
            for timestep in PROBE_TIMESTEPS:
                probes.append(Probe(f"{_label(at)}, timestep {timestep:g}, {where}",
                                    base | {"timestep": torch.full((1,), timestep)}))
    return probes


def run_probes(module: Any, spec: ComponentSpec, probes: list[Probe]) -> None:
    """Run ``module`` (a spec wrapper) on every probe, on its own device and dtype (a census hooked to it records)."""
    import torch

    param = next(module.parameters())
    with torch.no_grad():
        for probe in probes:
            module(*[probe.inputs[n].to(param.device) for n in spec.input_names])
