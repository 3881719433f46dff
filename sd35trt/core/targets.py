"""GPU targets, backends, and the one table that decides each component's precision.

Precision is decided here and nowhere else: ``plan_precisions`` reads the target's capabilities, the
ONNX variants that exist, and the per-component preference table, and returns for every component the
precision it gets and why. The FP16 fallback on GPUs without FP8 is a row of that table, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from sd35trt.core.errors import BuildError, InvalidInputError
from sd35trt.core.specs import Precision

E = TypeVar("E", bound=Enum)


class GpuTarget(str, Enum):
    HOPPER = "hopper"
    ADA = "ada"
    BLACKWELL = "blackwell"
    AMPERE = "ampere"
    TURING = "turing"
    AUTO = "auto"


class Backend(str, Enum):
    AUTO = "auto"
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"


@dataclass(frozen=True)
class TargetInfo:
    target: GpuTarget
    compute_capabilities: tuple[tuple[int, int], ...]
    example_gpus: str

    @property
    def has_fp8(self) -> bool:
        # FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x). Every CC of the target must have it.
        return all(cc >= (8, 9) for cc in self.compute_capabilities)

    @property
    def sm_names(self) -> list[str]:
        return [f"SM{a}{b}" for a, b in self.compute_capabilities]


TARGETS: dict[GpuTarget, TargetInfo] = {
    GpuTarget.HOPPER: TargetInfo(GpuTarget.HOPPER, ((9, 0),), "H100, H200, GH200"),
    GpuTarget.ADA: TargetInfo(GpuTarget.ADA, ((8, 9),), "L4, L40S, RTX 4090, RTX 6000 Ada"),
    GpuTarget.BLACKWELL: TargetInfo(GpuTarget.BLACKWELL, ((10, 0), (12, 0)), "B200, GB200 (SM100); RTX 5090, RTX PRO 6000 (SM120)"),
    GpuTarget.AMPERE: TargetInfo(GpuTarget.AMPERE, ((8, 0), (8, 6)), "A100 (SM80); A10, A40, RTX 3090 (SM86)"),
    GpuTarget.TURING: TargetInfo(GpuTarget.TURING, ((7, 5),), "T4, RTX 2080"),
}

# Compute capabilities each backend can build engines for.
RTX_CCS = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))  # TensorRT-RTX 1.7, ahead of time, no GPU needed

# Preference per component, best first. FP8 needs an FP8 target and a calibrated FP8 ONNX; FP16 is the
# fallback; FP32 is last resort. The VAE decoder is convolution-bound and not calibrated: FP16.
PRECISION_PREFERENCE: dict[str, tuple[Precision, ...]] = {
    "transformer": (Precision.FP8, Precision.FP16, Precision.FP32),
    "clip_l": (Precision.FP8, Precision.FP16, Precision.FP32),
    "clip_g": (Precision.FP8, Precision.FP16, Precision.FP32),
    "t5": (Precision.FP8, Precision.FP16, Precision.FP32),
    "vae_decoder": (Precision.FP16, Precision.FP32),
}


def _parse(kind: type[E], name: str, what: str) -> E:
    try:
        return kind(name.lower())
    except ValueError:
        raise InvalidInputError(f"unknown {what} '{name}'",
                                hint=f"choose one of {', '.join(m.value for m in kind)}") from None


def parse_target(name: str) -> GpuTarget:
    return _parse(GpuTarget, name, "GPU target")


def parse_backend(name: str) -> Backend:
    return _parse(Backend, name, "backend")


def target_for_cc(cc: tuple[int, int]) -> GpuTarget | None:
    for target, info in TARGETS.items():
        if cc in info.compute_capabilities:
            return target
    return None


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision
    reason: str


def plan_precisions(target: TargetInfo, components: tuple[str, ...], available: dict[str, set[Precision]],
                    requested: Precision | None = None) -> dict[str, PrecisionChoice]:
    """Which precision each component is built in, and why (recorded in the bundle manifest).

    ``available`` maps component → ONNX variants present. ``requested`` (``--precision``) forces one
    precision for every component that has it; FP8 on a target without FP8 is refused, since that is
    the hard error other tools give late, at build time.
    """
    if requested is Precision.FP8 and not target.has_fp8:
        raise InvalidInputError(
            f"FP8 requested for target {target.target.value} ({', '.join(target.sm_names)}), which has no FP8 tensor cores",
            hint="drop --precision to get the automatic FP16 fallback, or target ada/hopper/blackwell")
    plan = {}
    for name in components:
        have = available.get(name, set())
        if requested is not None:
            if requested not in have:
                raise InvalidInputError(f"--precision {requested.value} requested but no {requested.value} ONNX for {name}",
                                        hint="run `sd35trt calibrate` then `sd35trt export --precision <it>` first")
            plan[name] = PrecisionChoice(requested, f"--precision {requested.value}")
            continue
        for precision in PRECISION_PREFERENCE[name]:
            if precision is Precision.FP8 and not target.has_fp8:
                continue
            if precision in have:
                plan[name] = PrecisionChoice(precision, _reason(name, precision, target, have))
                break
        else:
            raise BuildError(f"no usable ONNX for {name} (have: {', '.join(sorted(p.value for p in have)) or 'none'})",
                             hint="run `sd35trt calibrate` then `sd35trt export` for this model first")
    return plan


# --- the same policy for ONNX variants (export produces them, runners and compare pick among them) --------

EXPORT_VARIANTS = ("auto", "fp32", "fp16", "fp8")
# --precision of a runner on a work dir: "auto" takes the engines' preference order (the best variant the work
# dir has); "fp8" falls back to FP16 where a component was not calibrated, as engines do; the others are exact.
RUNNER_VARIANTS: dict[str, tuple[Precision, ...]] = {
    "auto": (Precision.FP8, Precision.FP16, Precision.FP32), "fp8": (Precision.FP8, Precision.FP16),
    "fp16": (Precision.FP16,), "fp32": (Precision.FP32,)}


def exported_variants(requested: str, components: tuple[str, ...], calibrated: set[str],
                      target: TargetInfo | None = None) -> list[tuple[str, Precision]]:
    """(component, precision) pairs ``export --precision`` produces: ``auto`` (what engines use) is FP16 for
    every component and FP8 for the calibrated ones whose preference has FP8; with a ``target`` (``--gpu``), just
    the one variant per component that ``plan_precisions`` gives that target's engines (an FP8 target skips the
    FP16 twin of an FP8 component: 15 GB and minutes at SD3.5-Large size; an FP16 target skips the FP8 ONNX);
    otherwise the named ones (FP8 only where calibrated). Ordered FP32, FP16, FP8."""
    from sd35trt.core.errors import check_choice

    names = [v.strip() for v in requested.split(",") if v.strip()]
    for name in names:
        check_choice("--precision", name, EXPORT_VARIANTS)
    wanted = {Precision.FP16, Precision.FP8} if "auto" in names else {Precision(n) for n in names}
    pairs = []
    for precision in (Precision.FP32, Precision.FP16, Precision.FP8):
        if precision not in wanted:
            continue
        for name in components:
            if precision is Precision.FP8 and (name not in calibrated or Precision.FP8 not in PRECISION_PREFERENCE[name]):
                continue
            pairs.append((name, precision))
    if target is not None and "auto" in names:
        offered = {c: {p for n, p in pairs if n == c} for c in components}
        chosen = plan_precisions(target, components, offered)
        pairs = [(c, p) for c, p in pairs if chosen[c].precision is p or p is Precision.FP32]
    return pairs


def runner_variant(component: str, requested: str, have: set[Precision]) -> Precision | None:
    """The variant a runner uses for ``component`` under ``--precision requested`` (None: none of them)."""
    order = RUNNER_VARIANTS[requested]
    if requested == "auto":
        order = tuple(p for p in PRECISION_PREFERENCE[component] if p in order) + (Precision.FP32,)
    return next((p for p in order if p in have), None)


def _reason(name: str, precision: Precision, target: TargetInfo, have: set[Precision]) -> str:
    if precision is Precision.FP8:
        return f"FP8 tensor cores on {', '.join(target.sm_names)}; calibrated FP8 ONNX"
    if precision is Precision.FP16:
        if Precision.FP8 in have and not target.has_fp8:
            return f"fallback: {', '.join(target.sm_names)} has no FP8 tensor cores"
        if not target.has_fp8 and Precision.FP8 in PRECISION_PREFERENCE[name]:
            return f"{', '.join(target.sm_names)} has no FP8 tensor cores"
        if Precision.FP8 in PRECISION_PREFERENCE[name] and Precision.FP8 not in have:
            return "not calibrated to FP8 (FP16 is this component's default; calibrate --components adds it)"
        return "recipe: FP16 for this component"
    return "no FP16 ONNX available"
