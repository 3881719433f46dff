"""GPU targets, backends, and the one table that decides each component's precision.

Precision is decided here and nowhere else: ``plan_precisions`` reads the target's capabilities, the
ONNX variants that exist, and the per-component preference table, and returns for every component the
precision it gets and why. The FP16 fallback on GPUs without FP8 is a row of that table, not an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from sd35trt.core.errors import BuildError, InvalidInputError
from sd35trt.core.specs import ARTIFACT_PRECISIONS, Precision

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

# Where each backend runs each quantized GEMM, by compute capability (NVIDIA's support matrices; ENVIRONMENT.md):
# TensorRT-RTX: FP8 on 8.9 and 12.x, INT4 weight-only on 8.6, 8.9 and 12.x (SM75 and SM80 refuse it: "HW-specific
# datatypes: int4"), FP4 on 12.x only. Full TensorRT: FP8 from 8.9, INT4 weight-only from 7.5, FP4 on Blackwell.
QUANT_SUPPORT: dict[Backend, dict[Precision, Callable[[tuple[int, int]], bool]]] = {
    Backend.TENSORRT_RTX: {
        Precision.FP8: lambda cc: cc in ((8, 9), (12, 0), (12, 1)),
        Precision.INT4: lambda cc: cc in ((8, 6), (8, 9), (12, 0), (12, 1)),
        Precision.NVFP4: lambda cc: cc in ((12, 0), (12, 1)),
        Precision.MIXED: lambda cc: cc in ((8, 9), (12, 0), (12, 1)),  # FP8 and INT4 both
        Precision.INT8: lambda cc: cc in RTX_CCS,  # weight-only: built for SM75 to SM121 (measured on the CPU box)
    },
    Backend.TENSORRT: {
        Precision.FP8: lambda cc: cc >= (8, 9),
        Precision.INT4: lambda cc: cc >= (7, 5),
        Precision.NVFP4: lambda cc: cc >= (10, 0),
        Precision.MIXED: lambda cc: cc >= (8, 9),
        Precision.INT8: lambda cc: cc >= (7, 5),
    },
}
# What each quantized format is called in a reason.
QUANT_NAMES = {Precision.FP8: "FP8", Precision.INT4: "INT4 weight-only", Precision.NVFP4: "FP4 (NVFP4)",
               Precision.MIXED: "mixed FP8/INT4", Precision.INT8: "INT8 weight-only"}

# Preference per component, best first: its calibrated format (the work dir's calibration: fp8, int4, nvfp4, mixed)
# where the GPU runs it, then INT8 weight-only for the components --int8 names, FP16 as the fallback, FP32 as last
# resort. The VAE decoder is convolution-bound and never calibrated: FP16.
CALIBRATED_FORMAT = Precision.FP8  # stands for "the calibrated format" in the table below
PRECISION_PREFERENCE: dict[str, tuple[Precision, ...]] = {
    "transformer": (CALIBRATED_FORMAT, Precision.INT8, Precision.FP16, Precision.FP32),
    "clip_l": (CALIBRATED_FORMAT, Precision.INT8, Precision.FP16, Precision.FP32),
    "clip_g": (CALIBRATED_FORMAT, Precision.INT8, Precision.FP16, Precision.FP32),
    "t5": (CALIBRATED_FORMAT, Precision.INT8, Precision.FP16, Precision.FP32),
    "vae_decoder": (Precision.FP16, Precision.FP32),
}


def likely_backend(target: TargetInfo) -> Backend:
    """The backend `make engines` uses for ``target`` on a build box without that GPU: TensorRT-RTX where it can
    build the target ahead of time, else full TensorRT (on a host with that GPU)."""
    return Backend.TENSORRT_RTX if any(cc in RTX_CCS for cc in target.compute_capabilities) else Backend.TENSORRT


def buildable(target: TargetInfo, backend: Backend) -> tuple[tuple[int, int], ...]:
    """The target's compute capabilities ``backend`` builds for (TensorRT-RTX: those it targets ahead of time)."""
    ccs = target.compute_capabilities
    return tuple(cc for cc in ccs if cc in RTX_CCS) or ccs if backend is Backend.TENSORRT_RTX else ccs


def runs_on(backend: Backend, precision: Precision, ccs: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The compute capabilities of ``ccs`` on which ``backend`` runs ``precision`` GEMMs (all of them for FP16/FP32)."""
    check = QUANT_SUPPORT.get(Backend.TENSORRT if backend is Backend.AUTO else backend, {}).get(precision)
    return tuple(ccs) if check is None else tuple(cc for cc in ccs if check(cc))


def narrow_for_format(target: TargetInfo, backend: Backend, quant: Precision,
                      ccs: tuple[tuple[int, int], ...]) -> tuple[tuple[tuple[int, int], ...], str | None]:
    """The compute capabilities to build for when ``quant`` runs on some of the target's but not all: the others are
    left out (one engine serves every CC it is built for, and an INT4 engine cannot be built for SM80 with
    TensorRT-RTX), with why. A format no CC of the target runs keeps every CC (its components fall back to FP16)."""
    supported = runs_on(backend, quant, ccs)
    if not quant.quantized or quant is Precision.FP8 or not supported or len(supported) == len(ccs):
        return ccs, None
    left = [f"SM{a}{b}" for a, b in ccs if (a, b) not in supported]
    return supported, (f"{', '.join(left)} left out: {backend.value} runs no {QUANT_NAMES[quant]} GEMM there "
                       f"(build {target.target.value} without QUANT={quant.value} for an FP16 bundle that runs on it)")


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
                    requested: Precision | None = None, *, backend: Backend | None = None,
                    ccs: tuple[tuple[int, int], ...] | None = None,
                    int8: tuple[str, ...] = ()) -> dict[str, PrecisionChoice]:
    """Which precision each component is built in, and why (recorded in the bundle manifest).

    ``available`` maps component → ONNX variants present: a calibrated component has its one quantized format
    (FP8, INT4 or NVFP4), used where ``backend`` runs it on every CC of ``ccs`` (the CCs built for; default: the
    target's), else INT8 weight-only for the components ``int8`` names (``--int8``; their INT8 ONNX must exist), else
    FP16. ``requested`` (``--precision``) forces one precision for every component that has it; a
    quantized format the GPU does not run is refused, since that is the hard error other tools give late, at build
    time."""
    backend = backend or likely_backend(target)
    ccs = ccs or target.compute_capabilities
    if requested is not None and requested.quantized and runs_on(backend, requested, ccs) != tuple(ccs):
        names = ", ".join(f"SM{a}{b}" for a, b in ccs)
        raise InvalidInputError(
            f"{QUANT_NAMES[requested]} requested for target {target.target.value} ({names}), where {backend.value} runs "
            f"no {QUANT_NAMES[requested]} GEMM", hint="drop --precision to get the automatic FP16 fallback, or target "
            "a GPU that has it (FP8 and mixed: ada/hopper/blackwell; INT4: ampere (SM86)/ada/blackwell; NVFP4: blackwell)")
    plan = {}
    for name in components:
        have = available.get(name, set())
        if requested is not None:
            if requested not in have:
                raise InvalidInputError(f"--precision {requested.value} requested but no {requested.value} ONNX for {name}",
                                        hint="run `sd35trt calibrate` then `sd35trt export --precision <it>` first")
            plan[name] = PrecisionChoice(requested, f"--precision {requested.value}")
            continue
        calibrated = [p for p in have if p.quantized] if PRECISION_PREFERENCE[name][0] is CALIBRATED_FORMAT else []
        order = [*calibrated, *[p for p in PRECISION_PREFERENCE[name]
                                if not p.quantized and (p is not Precision.INT8 or name in int8)]]
        for precision in order:
            if precision.low_bit and runs_on(backend, precision, ccs) != tuple(ccs):
                continue
            if precision is Precision.INT8 and precision not in have:
                raise InvalidInputError(f"--int8 names {name} but there is no int8 ONNX of it",
                                        hint=f"run `sd35trt export --int8 {','.join(int8)}` with the same --out first")
            if precision in have:
                plan[name] = PrecisionChoice(precision, _reason(name, precision, ccs, backend, have))
                break
        else:
            unusable = sorted(p.value for p in have if p.quantized)
            if unusable:  # e.g. an NVFP4 work dir built for ada: export the FP16 fallback for this target
                sms = ", ".join(f"SM{a}{b}" for a, b in ccs)
                raise InvalidInputError(
                    f"{name} has only a {'/'.join(unusable)} ONNX, which {backend.value} cannot run on {target.target.value} "
                    f"({sms})", hint=f"export its FP16 fallback for this target (`sd35trt export --gpu {target.target.value}` "
                    "with the same --out), or build for a GPU that runs it")
            raise BuildError(f"no usable ONNX for {name} (have: {', '.join(sorted(p.value for p in have)) or 'none'})",
                             hint="run `sd35trt calibrate` then `sd35trt export` for this model first")

    return plan


# --- the same policy for ONNX variants (export produces them, runners and compare pick among them) --------

EXPORT_VARIANTS = ("auto", "fp32", "fp16", "int8", "fp8", "int4", "nvfp4", "mixed")
# --precision of a runner on a work dir: "auto" takes the engines' preference order (the best variant the work
# dir has; INT8 after FP16, since engines take it only when --int8 asks: a work dir exported for one target with
# --int8 has no FP16 twin of those components); "fp8"/"int4"/"int8" fall back to FP16 where a component has no such
# ONNX, as engines do; the others are exact.
# onnxruntime has no FP4 DequantizeLinear (opset 23: NOT_IMPLEMENTED in 1.31), so NVFP4 is never a runner variant.
RUNNER_VARIANTS: dict[str, tuple[Precision, ...]] = {
    "auto": (Precision.FP8, Precision.INT4, Precision.MIXED, Precision.FP16, Precision.INT8, Precision.FP32),
    "fp8": (Precision.FP8, Precision.FP16), "int4": (Precision.INT4, Precision.FP16), "int8": (Precision.INT8, Precision.FP16),
    "mixed": (Precision.MIXED, Precision.FP16), "fp16": (Precision.FP16,), "fp32": (Precision.FP32,)}


def exported_variants(requested: str, components: tuple[str, ...], calibrated: set[str],
                      target: TargetInfo | None = None, quant: Precision = Precision.FP8,
                      int8: tuple[str, ...] = ()) -> list[tuple[str, Precision]]:
    """(component, precision) pairs ``export --precision`` produces: ``auto`` (what engines use) is FP16 for
    every component and the calibrated format ``quant`` for the calibrated ones whose preference has one; with a
    ``target`` (``--gpu``), just the one variant per component that ``plan_precisions`` gives that target's engines
    (a quantized target skips the FP16 twin of a quantized component: 15 GB and minutes at SD3.5-Large size; an FP16
    target skips the quantized ONNX); otherwise the named ones (quantized formats only where calibrated, and only
    the calibrated format), INT8 for the components ``int8`` names (``--int8``). Ordered FP32, FP16, INT8, then the
    quantized one."""
    from sd35trt.core.errors import check_choice

    names = [v.strip() for v in requested.split(",") if v.strip()]
    for name in names:
        check_choice("--precision", name, EXPORT_VARIANTS)
    wanted = {Precision.FP16, quant, Precision.INT8} if "auto" in names else {Precision(n) for n in names}
    pairs = []
    for precision in ARTIFACT_PRECISIONS:
        if precision not in wanted:
            continue
        for name in components:
            if precision is Precision.INT8 and name not in int8:
                continue
            if precision.quantized and (name not in calibrated or precision is not quant
                                        or PRECISION_PREFERENCE[name][0] is not CALIBRATED_FORMAT):
                continue
            pairs.append((name, precision))
    if target is not None and "auto" in names:
        offered = {c: {p for n, p in pairs if n == c} for c in components}
        backend = likely_backend(target)
        ccs, _ = narrow_for_format(target, backend, quant, buildable(target, backend))
        chosen = plan_precisions(target, components, offered, backend=backend, ccs=ccs, int8=int8)
        pairs = [(c, p) for c, p in pairs if chosen[c].precision is p or p is Precision.FP32]
    return pairs


def runner_variant(component: str, requested: str, have: set[Precision]) -> Precision | None:
    """The variant a runner uses for ``component`` under ``--precision requested`` (None: none of them)."""
    order = RUNNER_VARIANTS[requested]
    if requested == "auto" and PRECISION_PREFERENCE[component][0] is not CALIBRATED_FORMAT:
        order = tuple(p for p in order if not p.quantized)
    return next((p for p in order if p in have), None)


def _reason(name: str, precision: Precision, ccs: tuple[tuple[int, int], ...], backend: Backend,
            have: set[Precision]) -> str:
    sms = ", ".join(f"SM{a}{b}" for a, b in ccs)
    if precision.quantized:
        return f"{QUANT_NAMES[precision]} GEMMs on {sms} ({backend.value}); calibrated {precision.value} ONNX"
    calibrated = [p for p in have if p.quantized]  # the format this GPU passed over, if any
    fallback = f"fallback: {backend.value} runs no {QUANT_NAMES[calibrated[0]]} GEMM on {sms}" if calibrated else ""
    if precision is Precision.INT8:
        return (f"{fallback}; " if fallback else "") + \
            f"INT8 weight-only GEMMs on {sms} ({backend.value}): --int8, one scale per output channel"
    if precision is Precision.FP16:
        if fallback:
            return fallback
        if PRECISION_PREFERENCE[name][0] is CALIBRATED_FORMAT:
            if not runs_on(backend, Precision.FP8, ccs):  # never advice that cannot help on this GPU
                return f"FP16: {backend.value} runs no FP8 GEMM on {sms}"
            return "not calibrated (FP16 is this component's default; calibrate --components adds it)"

        return "recipe: FP16 for this component"
    return "no FP16 ONNX available"
