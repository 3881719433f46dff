"""The VRAM plan of one run: which engines are resident while each stage runs, chosen for the GPU's memory.

* ``resident``: every network loaded for the whole run (fastest: nothing is loaded twice);
* ``sequential``: each network loaded for its own stage and released after (text encoders, then the
  transformer, then the VAE), as diffusers' model CPU offload and NVIDIA's demo ``--low-vram`` do;
* ``streaming``: sequential, with the transformer's weights streamed from host memory under a budget (an engine
  built with ``build --weight-streaming``: TensorRT's ``weight_streaming_budget_v2``).

What a stage needs is its weights (plan or parameter bytes) plus an activation estimate for the request
(``ComponentSpec.activation_bytes``, measured factors); the activation block is shared, so a resident run
needs the sum of the weights plus the largest activation. A pure function of those numbers, tested on
synthetic needs; ``doctor BUNDLE --vram GIB`` prints it for a bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sd35trt.core.errors import InvalidInputError

MODES = ("auto", "resident", "sequential", "streaming")
GIB = 2**30
# What the runtime itself holds besides engines and activations (CUDA context, cuBLAS/cuDNN workspaces, the
# loop's latents and embeddings): an allowance, not a measurement of any one GPU.
RUNTIME_OVERHEAD = 512 * 2**20
# Under weight streaming TensorRT keeps some weights resident that it cannot stream (reported exactly by
# ``streamable_weights_size`` once an engine loads); the plan assumes this fraction of the engine.
STREAMING_RESIDENT_FRACTION = 0.10


@dataclass(frozen=True)
class Need:
    """What one network needs on the GPU for one request."""

    component: str
    weights: int
    activations: int
    streamable: bool = False
    at_profile_max: bool = False  # activations for the profile's largest shapes (an engine's static allocation)

    @property
    def activations_at(self) -> str:
        return "the profile's largest shapes (static allocation)" if self.at_profile_max else "the request's shapes"

    @property
    def total(self) -> int:
        """Weights and activations: what the network needs while it runs alone."""
        return self.weights + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {"weights_gib": round(self.weights / GIB, 3), "activations_gib": round(self.activations / GIB, 3),
                "activations_at": self.activations_at, "streamable": self.streamable}


STAGES = (("clip_l", "clip_g", "t5"), ("transformer",), ("vae_decoder",))


def peak(mode: str, needs: dict[str, Need]) -> int | None:
    """Peak GPU memory of a plan (None when the plan does not apply: streaming without a streamable engine)."""
    if mode == "resident":
        return sum(n.weights for n in needs.values()) + max((n.activations for n in needs.values()), default=0) \
            + RUNTIME_OVERHEAD
    if mode == "sequential":
        return max((n.total for n in needs.values()), default=0) + RUNTIME_OVERHEAD
    if mode == "streaming":
        transformer = needs.get("transformer")
        if transformer is None or not transformer.streamable:
            return None
        others = max((n.total for k, n in needs.items() if k != "transformer"), default=0)
        floor = int(transformer.weights * STREAMING_RESIDENT_FRACTION) + transformer.activations
        return max(others, floor) + RUNTIME_OVERHEAD
    raise ValueError(mode)


def all_peaks(needs: dict[str, Need]) -> dict[str, int | None]:
    """Every plan's peak (``peak``), by mode."""
    return {m: peak(m, needs) for m in MODES[1:]}


def in_gib(peaks: dict[str, int | None]) -> dict[str, float | None]:
    return {m: None if p is None else round(p / GIB, 2) for m, p in peaks.items()}


@dataclass(frozen=True)
class VramPlan:
    mode: str
    budget: int
    peak: int
    needs: dict[str, Need]
    why: str
    streaming_budget: int | None = None  # bytes of transformer weights kept on the GPU (streaming only)
    peaks: dict[str, int | None] = field(default_factory=dict)  # every plan's peak, for reports

    @property
    def sequential(self) -> bool:
        return self.mode in ("sequential", "streaming")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "why": self.why, "budget_gib": round(self.budget / GIB, 2),
                "peak_gib": round(self.peak / GIB, 2),
                "streaming_budget_gib": None if self.streaming_budget is None else round(self.streaming_budget / GIB, 2),
                "plans_gib": in_gib(self.peaks),
                "needs": {k: v.to_dict() for k, v in self.needs.items()}}

    def summary(self) -> str:
        others = ", ".join(f"{m} {p / GIB:.1f}" if p is not None else f"{m} n/a" for m, p in self.peaks.items())
        return (f"VRAM plan {self.mode}: peak {self.peak / GIB:.1f} GiB of {self.budget / GIB:.1f} GiB ({self.why}; "
                f"plans in GiB: {others})")


def choose_plan(needs: dict[str, Need], budget: int, mode: str = "auto") -> VramPlan:
    """The fastest plan that fits ``budget`` bytes (resident, then sequential, then streaming), or the one
    named; one line naming the memory needed when nothing fits."""
    if mode not in MODES:
        raise InvalidInputError(f"--vram-plan {mode} is not one of {', '.join(MODES)}", hint="e.g. --vram-plan auto")
    peaks = all_peaks(needs)
    order = MODES[1:] if mode == "auto" else (mode,)
    for candidate in order:
        need = peaks[candidate]
        if need is None or need > budget:
            continue
        streaming = None
        if candidate == "streaming":
            transformer = needs["transformer"]
            room = budget - RUNTIME_OVERHEAD - transformer.activations
            streaming = max(int(transformer.weights * STREAMING_RESIDENT_FRACTION), min(room, transformer.weights))
        why = {"resident": "every engine fits at once",
               "sequential": f"all engines at once need {peaks['resident'] / GIB:.1f} GiB" if peaks["resident"] else "",
               "streaming": "one network at a time still does not fit; the transformer streams its weights"}[candidate]
        if mode != "auto":
            why = f"--vram-plan {mode}"
        return VramPlan(candidate, budget, need, needs, why, streaming, peaks)
    fits = [p for p in peaks.values() if p is not None]
    least = min(fits) if fits else 0
    named = "" if mode == "auto" else f" with --vram-plan {mode}"
    largest = max(needs.values(), key=lambda n: n.total)
    if largest.at_profile_max:  # an engine: the request's size does not change its share
        hint = ("its engines hold activation memory for their largest shapes: rebuild with ranges that end at your "
                "requests (make engines BATCH= HEIGHT= WIDTH=; `sd35trt doctor BUNDLE --vram N` names them and "
                "their plan)" + (", or build the transformer with `sd35trt build --weight-streaming`"
                                 if largest.component == "transformer" and peaks["streaming"] is None else ""))
    elif largest.component == "transformer" and peaks["streaming"] is None:
        hint = "build the transformer with `sd35trt build --weight-streaming`, or lower the image size or batch"
    elif largest.component == "t5":
        hint = "drop T5 (--no-t5 / make engines T5=0), or build T5 in FP8 (make engines QUANTIZE=transformer,t5)"
    else:
        hint = "lower the image size or batch (--vae-tiling on shrinks the VAE's share)"
    raise InvalidInputError(f"this run does not fit {budget / GIB:.1f} GiB of GPU memory{named}: it needs at least "
                            f"{least / GIB:.1f} GiB ({', '.join(f'{m} {p / GIB:.1f}' for m, p in peaks.items() if p)} GiB; "
                            f"the largest network is {largest.component}, "
                            f"{largest.total / GIB:.1f} GiB)", hint=hint)


def transformer_room(needs: dict[str, Need], budget: int) -> dict[str, int | None]:
    """The largest transformer engine the resident and the sequential plan fit in ``budget`` bytes, every other
    network and every activation as they are (None: the others alone do not fit): the size a mixed FP8/INT4
    transformer may take on this card (``calibrate --format mixed --max-transformer-gib``)."""
    transformer = needs.get("transformer")
    if transformer is None:
        return {}
    others = [n for k, n in needs.items() if k != "transformer"]
    resident = budget - RUNTIME_OVERHEAD - sum(n.weights for n in others) - max(n.activations for n in needs.values())
    sequential = budget - RUNTIME_OVERHEAD - transformer.activations
    if max((n.total for n in others), default=0) + RUNTIME_OVERHEAD > budget:
        sequential = -1
    return {"resident": resident if resident > 0 else None, "sequential": sequential if sequential > 0 else None}


def check_vram(requested_gib: float | None) -> None:
    """``--vram`` is a positive, finite number of GiB (a GPU with more than 16 TiB does not exist)."""
    import math

    if requested_gib is not None and (not math.isfinite(requested_gib) or not 0 < requested_gib <= 16384):
        raise InvalidInputError(f"--vram {requested_gib:g} must be a positive number of GiB", hint="e.g. --vram 8")


def gpu_budget(requested_gib: float | None) -> int | None:
    """``--vram GIB``, else the GPU's free memory now (None without a CUDA GPU: nothing to plan)."""
    if requested_gib is not None:
        check_vram(requested_gib)
        return int(requested_gib * GIB)
    from sd35trt.core.host import local_compute_capability

    if local_compute_capability() is None:
        return None
    import torch

    free, _ = torch.cuda.mem_get_info()
    return int(free)
