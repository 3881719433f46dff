"""The mixed FP8/INT4 recipe (``calibrate --format mixed``): which transformer layers store INT4 weights (AWQ,
weight-only) instead of FP8, so that the transformer's weights fit a size budget at the least measured error.

Calibrate runs both ModelOpt calibrations on the same prompts (INT4 AWQ on a copy of the transformer, then FP8)
and this module decides, on the held-out traffic:

1. sizes: the transformer's weights as the engine stores them — FP8 1 byte, INT4 ½ byte plus an FP16 scale per
   block and the FP16 AWQ input scale, FP32 islands 4 bytes, every other parameter and buffer FP16 (``pos_embed``
   cropped to the engine's shape range, as export does) — with every candidate layer in FP8 and in INT4 (checked
   against the budget before minutes of calibration);
2. sensitivity: each candidate alone swapped to its INT4 form inside the FP8 network, the transformer's output
   rel-L2 against the FP32 reference on the held-out calls, minus the all-FP8 error (its measured cost); above
   ``GROUPED_ABOVE`` candidates (SD3.5 size) each block's candidates together first, then one by one only in the
   block where the budget is crossed (a whole-transformer forward per block, not per layer);
3. the choice: candidates by measured cost per byte saved, cheapest first, until the weights fit the budget;
4. the brackets: the same error with the chosen mix and with every candidate INT4.

ModelOpt's ``auto_quantize`` searches formats per layer too, but by gradient scores through a loss and its ONNX
exporter fails on the SD3 transformer for INT4 (ENVIRONMENT.md), so the choice is made here, on measured errors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sd35trt.core.errors import CalibrationError, InvalidInputError
from sd35trt.core.numerics import Island

GIB = 2**30


@dataclass(frozen=True)
class Sizes:
    """The transformer's weight bytes with every candidate in FP8 (``fp8``), and what INT4 saves per candidate."""

    fp8: int
    saved: dict[str, int]

    @property
    def int4(self) -> int:
        return self.fp8 - sum(self.saved.values())


def int4_bytes(out_features: int, in_features: int, block: int) -> int:
    """An INT4 layer's weight as stored: packed codes, an FP16 scale per block, the FP16 AWQ input scale."""
    return out_features * in_features // 2 + out_features * (in_features // block) * 2 + in_features * 2


def transformer_sizes(network: Any, quantizable: list[str], islands: list[Island]) -> Sizes:
    """The weights of ``network`` in the engine's storage, with the recipe's ``quantizable`` layers in FP8 and the
    candidates (those Linear layers whose width takes an INT4 block) priced in INT4 too."""
    from sd35trt.producers.weight_quant import int4_block_of

    modules = dict(network.named_modules())
    fp8_weights = {f"{name}.weight" for name in quantizable}
    inside = tuple(f"{i.module}." for i in islands)
    total = 0
    for name, param in network.named_parameters():
        width = 4 if name.startswith(inside) else 1 if name in fp8_weights else 2
        total += param.numel() * width
    total += sum(buffer.numel() * 2 for buffer in network.buffers())  # pos_embed (calibrate sizes it cropped as exported)
    saved = {}
    for name in quantizable:
        block = int4_block_of(modules[name])
        if block is not None:
            out_features, in_features = modules[name].weight.shape
            saved[name] = out_features * in_features - int4_bytes(out_features, in_features, block)
    return Sizes(total, saved)


def resolve_budget(max_gib: float | None, sizes: Sizes) -> tuple[float, str]:
    """The budget in GiB and where it came from: ``--max-transformer-gib``, or midway between all-FP8 and
    every-candidate-INT4. One line when no mix can meet it, or when FP8 alone does."""
    fp8, int4 = sizes.fp8 / GIB, sizes.int4 / GIB
    if max_gib is None:
        return (fp8 + int4) / 2, f"default: midway between all FP8 ({fp8:.4g} GiB) and every 4-bit-able layer INT4 ({int4:.4g} GiB)"
    if max_gib < int4:
        raise InvalidInputError(f"--max-transformer-gib {max_gib:g} is below this transformer's smallest mix "
                                f"({int4:.4g} GiB, every 4-bit-able layer INT4)",
                                hint=f"raise it to at least {int4:.4g}, or use --format int4")
    if max_gib >= fp8:
        raise InvalidInputError(f"--max-transformer-gib {max_gib:g} holds the whole FP8 transformer ({fp8:.4g} GiB): "
                                "no layer needs INT4", hint=f"use --format fp8, or a budget below {fp8:.4g}")
    return max_gib, "--max-transformer-gib"


@contextlib.contextmanager
def ranking_compute(device: str) -> Iterator[str]:
    """The compute of the ranking's runs, named: FP32 on a CPU; FP32 with TF32 matmuls on CUDA (a candidate's cost is
    one forward of the whole transformer: several hundred of them at SD3.5 size, minutes with TF32 instead of most of
    an hour without; the same TF32 in the all-FP8 run they are measured against). TF32 is off again afterwards."""
    if not device.startswith("cuda"):
        yield "fp32"
        return
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield "fp32 with TF32 matmuls (CUDA)"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class MixedPlan:
    """The choice and its evidence: per candidate layer its measured cost (``delta``: output rel-L2 change when it
    alone is INT4) and bytes saved; the chosen ones; sizes and errors of all-FP8, the mix and all-INT4."""

    budget_gib: float
    budget_from: str
    delta: dict[str, float]
    saved: dict[str, int]
    chosen: list[str]
    bytes: dict[str, int]
    error: dict[str, float] = field(default_factory=dict)
    compute: str = "fp32"  # of the ranking's runs (``ranking_compute``)
    ranked_as: dict[str, str] = field(default_factory=dict)  # layer → the block it was measured with (large models)

    def measured(self, layer: str) -> str:
        """How a layer's cost was measured, in words."""
        block = self.ranked_as.get(layer, layer)
        return "alone" if block == layer else f"with all of {block}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_gib": self.budget_gib, "budget_from": self.budget_from,
            "estimated_gib": {k: v / GIB for k, v in self.bytes.items()},
            "error": {k: round(v, 8) for k, v in self.error.items()},
            "error_is": f"transformer output rel-L2 vs the FP32 reference (TF32 off), mean over the held-out calls; "
                        f"the quantized runs in {self.compute}",
            "ranking": ("by block, then layer: each block's layers INT4 together inside the FP8 network (their "
                        "output rel-L2 change, shared), whole blocks cheapest per byte saved until one crosses the "
                        "budget, then that block's layers one by one" if self.ranked_as else
                        "each layer alone INT4 inside the FP8 network: its output rel-L2 change per byte saved, "
                        "cheapest first until the weights fit the budget"),
            "layers": {name: {"format": "int4" if name in self.chosen else "fp8", "delta_rel_l2": self.delta[name],
                              "saved_bytes": self.saved[name],
                              **({"measured_with": self.ranked_as[name]} if self.ranked_as.get(name, name) != name
                                 else {})} for name in self.delta},
        }


def choose(delta: dict[str, float], sizes: Sizes, budget_gib: float) -> list[str]:
    """The fewest-cost candidates to INT4 so the weights fit ``budget_gib``: by cost per byte saved, ties by name."""
    order = sorted(delta, key=lambda n: (delta[n] / max(sizes.saved[n], 1), n))
    total, chosen = sizes.fp8, []
    for name in order:
        if total <= budget_gib * GIB:
            break
        chosen.append(name)
        total -= sizes.saved[name]
    return chosen


# Above this many candidates (SD3.5-Medium has 385, Large 515) the ranking goes by transformer block first: one
# whole-transformer forward per block instead of per layer, then the layers of the one block at the margin.
GROUPED_ABOVE = 64


def group_of(layer: str) -> str:
    """The block a layer belongs to (``transformer_blocks.7.attn.to_q`` → ``transformer_blocks.7``), or itself."""
    parts = layer.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else layer


def _finite(cost: float) -> float:
    return cost if math.isfinite(cost) else math.inf  # a layer that overflows as INT4 goes last


def _rank(candidates: list[str], sizes: Sizes, budget_gib: float, base: float,
          measure: Callable[[list[str]], float]) -> tuple[dict[str, float], list[str], dict[str, str]]:
    """Step 2 and 3: each candidate's measured cost and the choice. Up to ``GROUPED_ABOVE`` candidates, each alone
    INT4; above, each block's candidates INT4 together (their cost, shared), whole blocks cheapest per byte saved
    until one crosses the budget, then that block's layers one by one inside the blocks already taken.
    Returns (cost by layer, chosen layers, the block a layer was ranked with)."""
    if len(candidates) <= GROUPED_ABOVE:
        delta = {name: _finite(measure([name]) - base) for name in candidates}
        return delta, choose(delta, sizes, budget_gib), {}
    groups: dict[str, list[str]] = {}
    for name in candidates:
        groups.setdefault(group_of(name), []).append(name)
    group_cost = {g: _finite(measure(members) - base) for g, members in groups.items()}
    taken = choose(group_cost, Sizes(sizes.fp8, {g: sum(sizes.saved[n] for n in m) for g, m in groups.items()}),
                   budget_gib)
    delta = {name: group_cost[group_of(name)] for name in candidates}
    ranked_as = {name: group_of(name) for name in candidates}
    if not taken:
        return delta, [], ranked_as
    whole = [n for g in taken[:-1] for n in groups[g]]
    margin = groups[taken[-1]]
    inside = measure(whole)
    for name in margin:
        delta[name] = _finite(measure([*whole, name]) - inside)
        ranked_as[name] = name
    left = Sizes(sizes.fp8 - sum(sizes.saved[n] for n in whole), {n: sizes.saved[n] for n in margin})
    return delta, whole + choose({n: delta[n] for n in margin}, left, budget_gib), ranked_as


def plan_mix(candidates: list[str], sizes: Sizes, budget: tuple[float, str], measure: Callable[[list[str]], float],
             compute: str = "fp32") -> MixedPlan:
    """Steps 2-4: ``measure(layers)`` is the transformer's error on the held-out calls with ``layers`` INT4 and the
    rest FP8 (run in ``compute``, ``ranking_compute``); ``candidates`` the layers that have INT4 weights."""
    candidates = sorted(n for n in candidates if n in sizes.saved)
    priced = Sizes(sizes.fp8, {n: sizes.saved[n] for n in candidates})
    base = measure([])
    delta, chosen, ranked_as = _rank(candidates, priced, budget[0], base, measure)
    mixed, every = measure(chosen), measure(candidates)
    size = priced.fp8 - sum(priced.saved[n] for n in chosen)
    if size > budget[0] * GIB:  # ModelOpt left some priced layer without INT4 weights: the budget is out of reach
        raise CalibrationError(f"the transformer's weights reach {size / GIB:.4g} GiB at best ({len(candidates)} layers "
                               f"took INT4 weights), above the budget of {budget[0]:.4g} GiB",
                               hint=f"use --max-transformer-gib {math.ceil(size / GIB * 1000) / 1000:g} or more")
    if not math.isfinite(mixed):
        raise CalibrationError("the mixed FP8/INT4 transformer gives NaN/Inf on the held-out calls",
                               hint="try a larger --max-transformer-gib, or --format fp8")
    return MixedPlan(budget[0], budget[1], delta, priced.saved, chosen,
                     {"fp8": priced.fp8, "mixed": size, "int4": priced.int4}, {"fp8": base, "mixed": mixed, "int4": every},
                     compute, ranked_as)
