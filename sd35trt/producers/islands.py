"""Export's FP32-island probes: the islands calibrate found, checked on the inputs the engine will accept — the ends
of its shape and timestep ranges, beyond calibration's traffic — in the exported precision, growing until the probes
run clean (``probe_islands``). Calibrate's census already probes the default ranges; export probes when its ranges
differ, or when there is no calibration.
"""

from __future__ import annotations

from typing import Any

from sd35trt.core.errors import ExportValidationError
from sd35trt.core.models import ModelSource
from sd35trt.core.numerics import Island, fp32_islands, plan_islands
from sd35trt.core.shapes import ShapeRanges
from sd35trt.core.specs import ComponentSpec, PipeDims
from sd35trt.producers.quantize import is_quantizer

PROBE_ROUNDS = 4  # islands added by export's probes, one round after another, before it gives up


def probe_islands(network: Any, module: Any, spec: ComponentSpec, pipe_dims: PipeDims, ranges: ShapeRanges,
                  islands: list[Island], margin: float, low: Any, text: dict[str, Any] | None = None,
                  weights: dict[str, Any] | None = None) -> tuple[list[Island], list[str]]:
    """The islands of the network being exported, checked on the inputs its engine will accept (``range_probes``:
    the ends of the shape and timestep ranges, export's own check inputs), run in the exported precision with the
    islands in place. A module past the margin there, or the first to give NaN/Inf, becomes an island too (its unit),
    and an island output another island receives stays FP32, until the probes run clean. Returns the islands and
    the probe labels; a network that still overflows after ``PROBE_ROUNDS`` rounds is one line naming the module."""
    import math

    import torch

    from sd35trt.core.numerics import ActivationCensus, island_unit, natural_key
    from sd35trt.core.probes import range_probes

    probes = range_probes(spec, ranges, pipe_dims, text)
    names = [n for n, _ in network.named_modules()]
    islands = sorted(islands, key=lambda i: natural_key(i.module))
    for _ in range(PROBE_ROUNDS):
        census = ActivationCensus({spec.name: network})
        bad_probe = None
        try:
            with fp32_islands(network, islands, low, weights), torch.no_grad():
                for probe in probes:
                    out = module(*[probe.inputs[n].to(next(network.parameters()).device) for n in spec.input_names])
                    if bad_probe is None and not all(bool(o.isfinite().all()) for o in (out if isinstance(out, tuple) else (out,))):
                        bad_probe = probe.label
        finally:
            census.close()
        rows = census.result().get(spec.name, {})
        finite = {n: r for n, r in rows.items() if math.isfinite(r["in"])}  # downstream of an overflow: not its cause
        for row in finite.values():
            row["out"] = row["out"] if math.isfinite(row["out"]) else math.inf
        first = min((n for n, r in finite.items() if r["out"] == math.inf), key=lambda n: finite[n]["order"], default=None)
        upcast = tuple(i.module for i in islands) + ((island_unit(first, spec.island_units),) if first else ())
        found = plan_islands(finite, names, margin=margin, upcast=upcast, units=spec.island_units,
                             feeds=census.feeds().get(spec.name))
        merged = _merge_islands(islands, found, first)
        if merged == islands:
            if bad_probe is not None:
                raise ExportValidationError(
                    f"{spec.name} gives NaN/Inf on {bad_probe} even with FP32 islands "
                    f"{', '.join(i.module for i in islands) or '(none)'}; first non-finite module output: {first or 'unknown'}",
                    hint=f"add the module to [{spec.name}] upcast in calibration/fp8.toml, or export --precision fp32 "
                         "for this component; report it with the work dir's calibration/census.json")
            return islands, [p.label for p in probes]
        islands = merged
        for island in islands:  # an island is never quantized (an FP8 network's quantizers inside it are switched off)
            for inner in dict(network.named_modules())[island.module].modules():
                if is_quantizer(inner):
                    inner.disable()
    raise ExportValidationError(f"{spec.name}: FP32 islands did not settle after {PROBE_ROUNDS} rounds of probes "
                                f"({', '.join(i.module for i in islands)})",
                                hint=f"add the modules to [{spec.name}] upcast in calibration/fp8.toml, or export "
                                     "--precision fp32 for this component")


def _merge_islands(current: list[Island], found: list[Island], first: str | None) -> list[Island]:
    """``current`` islands with the outputs ``found`` keeps FP32 added, and ``found``'s new islands (why: export's
    probes), in module order; equal to ``current`` when the probes found nothing new."""
    from sd35trt.core.numerics import natural_key

    merged = {i.module: i for i in current}
    for island in found:
        old = merged.get(island.module)
        if old is None:
            first_here = first is not None and (first == island.module or first.startswith(island.module + "."))
            cause = f"{first} is the first module to give NaN/Inf in FP16" if first_here else island.why.removeprefix("census: ")
            merged[island.module] = Island(island.module, island.max_abs,
                                           f"export probe (inputs past calibration's traffic): {cause}", island.fp32_outputs)
        elif set(island.fp32_outputs) - set(old.fp32_outputs):
            outputs = tuple(sorted(set(old.fp32_outputs) | set(island.fp32_outputs)))
            merged[island.module] = Island(old.module, old.max_abs, old.why + f"; outputs {list(outputs)} stay FP32 "
                                           "(export probe)", outputs)
    return sorted(merged.values(), key=lambda i: natural_key(i.module))


def island_weights_for(source: ModelSource, spec: ComponentSpec, islands: list[Island], have: dict[str, Any],
                       device: str) -> tuple[dict[str, Any], str]:
    """``have`` plus the FP32 weights of the islands that have none there yet (``models.island_weights``)."""
    from sd35trt.core.models import island_weights

    missing = [i for i in islands if not any(k.startswith(i.module + ".") for k in have)]
    if not missing:
        return have, "no islands" if not islands else ""
    found, where = island_weights(source, spec.pipeline_attr, missing, device)
    return have | found, where
