"""Export's checks: an ONNX against its PyTorch reference in onnxruntime, at a shape other than the traced one and
on calibrate's held-out pipeline traffic against the FP32 reference outputs (TF32 off), within the spec's tolerance
for its precision. A failure is one error naming the likely cause (the module past FP16's range outside the FP32
islands, from the census) and what to do.

The held-out check at SD3.5 size is bounded by memory (``plan_traffic_check``): on the CPU provider the attention of
a whole held-out call can take tens of GiB, so it keeps whole prompts within ``CHECK_MEMORY_GIB`` and says how many
rows it checked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core import log
from sd35trt.core.errors import ExportValidationError
from sd35trt.core.manifests import WorkDir
from sd35trt.core.metrics import error_stats, summarize
from sd35trt.core.numerics import Island, hottest_module
from sd35trt.core.probes import EXPORT_CHECK_SEED
from sd35trt.core.specs import ComponentSpec, PipeDims, Precision
from sd35trt.producers.calibration_state import CalibrationManifest

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Traffic:
    """Held-out pipeline inputs of one component and the FP32 reference outputs on them (from calibrate)."""

    calls: list[dict[str, Any]]
    reference: list[list[Any]]
    census: dict[str, Any]
    islands: list[Island]
    heads: int = 0  # attention heads of the network (the check's memory estimate)


# What onnxruntime's activations may take during export's checks on the CPU provider: at SD3.5 size a held-out
# transformer call (8 rows at 1024^2: 4 prompts with guidance) makes attention-score tensors of 8 x 24 x 4429^2
# floats, which is what peaked export at 45 GiB on the Medium FP8 check. The check keeps whole prompts (their
# negative and positive rows) until the estimate fits, and records how many rows it checked.
CHECK_MEMORY_GIB = 8.0


def check_budget(provider: str) -> tuple[float, str]:
    """(GiB, where) the held-out check's activations may take: ``CHECK_MEMORY_GIB`` of host memory on the CPU
    provider; on CUDA half of what the GPU has free with the network and the session's weights loaded (onnxruntime's
    arena grows into it; a 24 GB card checks fewer rows than an H200, never runs out)."""
    if provider != "cuda":
        return CHECK_MEMORY_GIB, "host memory"
    import torch

    torch.cuda.empty_cache()  # the torch reference's cached blocks go back before onnxruntime's arena grows
    free, _ = torch.cuda.mem_get_info()
    return free / 2 / 2**30, "GPU memory (half of what is free)"


@dataclass(frozen=True)
class CheckPlan:
    """Which rows of each held-out call export checks, and why."""

    rows: tuple[int, ...] | None  # None: every row
    why: str

    def select(self, tensor: Any) -> Any:
        return tensor if self.rows is None else tensor[list(self.rows)]


def plan_traffic_check(spec: ComponentSpec, call: dict[str, Any], heads: int, budget_gib: float = CHECK_MEMORY_GIB,
                       where: str = "host memory") -> CheckPlan:
    """Rows of a held-out ``call`` to run: all when its attention scores fit ``budget_gib`` (estimated 3 x rows x
    heads x tokens^2 floats: scores, softmax, their product), else as many whole prompts (a negative row and its
    positive row) as fit, at least one. Text encoders and the VAE are checked whole."""
    if spec.name != "transformer" or not heads:
        return CheckPlan(None, "every row of every held-out call")
    rows = call["hidden_states"].shape[0]
    tokens = (call["hidden_states"].shape[2] // 2) * (call["hidden_states"].shape[3] // 2) + call["encoder_hidden_states"].shape[1]
    per_row = 3 * heads * tokens**2 * 4
    if rows * per_row <= budget_gib * 2**30:
        return CheckPlan(None, f"every row ({rows}) of every held-out call: about {rows * per_row / 2**30:.1f} GiB of attention")
    pairs = rows // 2 if rows % 2 == 0 else 0  # guidance: negatives first, then positives
    keep = max(1, int(budget_gib * 2**30 // (2 * per_row))) if pairs else 0
    chosen = tuple(range(min(keep, pairs))) + tuple(pairs + i for i in range(min(keep, pairs))) if pairs else (0,)
    if pairs and 2 * per_row > budget_gib * 2**30:
        chosen = (0, pairs)  # one whole prompt even past the budget: a check of real traffic is never skipped
    return CheckPlan(tuple(sorted(chosen)), f"{len(chosen)} of {rows} rows of each held-out call (whole prompts: "
                                            f"negative and positive), about {len(chosen) * per_row / 2**30:.1f} GiB of "
                                            f"attention; all {rows} would need {rows * per_row / 2**30:.0f} GiB "
                                            f"(budget {budget_gib:.3g} GiB of {where})")


def validate_onnx(module: torch.nn.Module, spec: ComponentSpec, pipe_dims: PipeDims, onnx_path: Path,
                  dims: dict[str, int], precision: Precision, provider: str = "auto",
                  traffic: Traffic | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run torch and onnxruntime on the same dummy inputs at ``dims`` and check every output; then run the
    same session on ``traffic`` against its FP32 reference outputs. Raises with all failures at once.

    ``auto`` validates on onnxruntime's CUDA execution provider when onnxruntime-gpu and a GPU are present:
    at SD3.5 size an FP16 graph on the CPU provider costs ~3× its weight bytes of host memory."""
    import torch

    from sd35trt.core.onnx_utils import ort_session, run_ort, session_provider

    device = next(module.parameters()).device
    inputs = spec.dummy_inputs(pipe_dims, dims, seed=EXPORT_CHECK_SEED)
    start = time.perf_counter()
    with torch.no_grad():
        expected = module(*[inputs[n].to(device) for n in spec.input_names])
    expected = expected if isinstance(expected, tuple) else (expected,)
    expected = [e.float().cpu().numpy() for e in expected]
    twin = None
    if precision is Precision.NVFP4:  # onnxruntime has no FP4 DequantizeLinear: its FP4 weights decoded to FP16
        import tempfile

        from sd35trt.producers.weight_quant import nvfp4_ort_twin

        twin = tempfile.TemporaryDirectory(prefix=".nvfp4-twin-", dir=onnx_path.parent.parent)
        onnx_path = nvfp4_ort_twin(onnx_path, Path(twin.name))
    session = ort_session(onnx_path, provider=provider)
    used = session_provider(session)
    actual = run_ort(session, {k: v.numpy() for k, v in inputs.items()})
    tol = spec.tolerances[precision]
    results, failures = {}, []
    for name, ref in zip(spec.output_names, expected):
        stats = error_stats(ref, actual[name])
        results[name] = stats.to_dict() | {"passed": stats.passes(tol)}
        if not stats.passes(tol):
            failures.append(f"{name}: {stats} (allowed rel-L2 {tol.rel_l2:g}, max-abs "
                            f"{tol.scaled_max_abs(stats.ref_absmax):.3g})")
    if failures:
        raise ExportValidationError(
            f"{spec.name} {precision.value} ONNX differs from its PyTorch reference at dims {dims}: "
            + "; ".join(failures), path=onnx_path, hint=_validation_hint(precision, traffic, spec.name))
    validation = {"dims": dims, "provider": used, "reference": _reference_label(precision, module),
                  "outputs": results, "tolerance": {"rel_l2": tol.rel_l2, "max_abs": tol.max_abs},
                  "seconds": round(time.perf_counter() - start, 3)}
    if twin is not None:
        validation["onnx_checked"] = ("an onnxruntime twin: every FP4 weight decoded from the ONNX's own FLOAT4E2M1 "
                                      "codes and FP8 scales to FP16 (onnxruntime has no FP4 DequantizeLinear)")
    checked = check_traffic(session, spec, onnx_path, precision, traffic) if traffic is not None else None
    del session
    if twin is not None:
        twin.cleanup()
    return validation, checked


def _reference_label(precision: Precision, module: Any) -> str:
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    if precision is Precision.FP8:
        return f"the ModelOpt fake-quant network ({dtype})"
    if precision is Precision.MIXED:
        return (f"the mixed fake-quant network ({dtype}: ModelOpt's FP8 quantizers, and the ONNX's own INT4 weights "
                "dequantized in the layers the budget chose)")
    if precision is Precision.INT8:
        return f"the INT8-weight network ({dtype} activations, the ONNX's own INT8 weights dequantized)"
    if precision.quantized:
        return f"the {precision.value} fake-quant network ({dtype} activations, the ONNX's own 4-bit weights dequantized)"
    return f"the PyTorch network in {dtype}" + (" (TF32 off)" if dtype == "float32" else "")


def _validation_hint(precision: Precision, traffic: Traffic | None, component: str = "") -> str:
    """What to do about a failed check, naming the real cause: the module past FP16's range outside the islands
    (the recipe's upcast list takes it; the recipe is part of calibrate's inputs, so calibrate then re-runs with
    it), else a precision error without an overflow (FP32 is the export that needs no islands)."""
    if precision is Precision.FP32:
        return "report this with the manifest (the exporter mis-traced an op); try another --opset"
    hot = hottest_module(traffic.census, traffic.islands) if traffic is not None else None
    if hot is not None and hot[1] > 2.0**14:
        return (f"{hot[0]} reaches {hot[1]:.4g} outside the FP32 islands (FP16 max 65504): add it to "
                f"[{component or 'its component'}] upcast in calibration/fp8.toml, then run make engines again")
    return (f"no activation outside the FP32 islands leaves FP16 range, so this is {precision.value} rounding: "
            "export this component with --precision fp32, and report it with the manifest")


def check_traffic(session: Any, spec: ComponentSpec, onnx_path: Path, precision: Precision,
                  traffic: Traffic) -> dict[str, Any]:
    """The ONNX on held-out pipeline traffic vs the FP32 reference outputs, within the spec's tolerance for
    ``precision`` and finite; on failure one line names the module with the largest activation outside
    the FP32 islands (from the census), the likely cause."""
    import torch

    from sd35trt.core.onnx_utils import run_ort, session_provider

    per_call = []
    provider = session_provider(session)
    plan = plan_traffic_check(spec, traffic.calls[0], traffic.heads, *check_budget(provider)) if traffic.calls else \
        CheckPlan(None, "no calls")
    with log.progress("held-out traffic check", len(traffic.calls)) as advance:
        for call, ref in zip(traffic.calls, traffic.reference):
            outs = run_ort(session, {k: plan.select(v).numpy() for k, v in call.items()})
            per_call.append({n: error_stats(plan.select(torch.as_tensor(r)).numpy(), outs[n])
                             for n, r in zip(spec.output_names, ref)})
            advance()
    summary = summarize(per_call, spec.output_names, spec.tolerances[precision])
    summary["calls"] = len(per_call)
    summary["checked"] = plan.why
    summary["provider"] = provider
    summary["reference"] = "FP32 network (TF32 off) on held-out pipeline traffic recorded by calibrate"
    if not summary["passed"]:
        bad = next(n for n in spec.output_names if not summary[n]["passed"])
        s = summary[bad]
        what = (f"{s['nonfinite']} NaN/Inf" if s["nonfinite"] else
                f"rel-L2 {s['rel_l2_max']:.3g} > {summary['tolerance']['rel_l2']:g}")
        hot = hottest_module(traffic.census, traffic.islands)
        cause = f"; largest activation outside FP32 islands: {hot[0]} max |x| {hot[1]:.4g}" if hot else ""
        raise ExportValidationError(
            f"{spec.name} {precision.value} ONNX on held-out traffic: {bad} {what}{cause}", path=onnx_path,
            hint=_validation_hint(precision, traffic, spec.name))
    return summary


def load_traffic(work: WorkDir, calibration: CalibrationManifest | None) -> dict[str, Traffic]:
    if calibration is None:
        return {}
    import json

    import torch

    data = torch.load(work.calibration / "traffic.pt", map_location="cpu", weights_only=True)
    census = json.loads((work.calibration / "census.json").read_text())["components"]
    heads = _transformer_heads(calibration)
    return {c: Traffic(v["calls"], v["reference"], census.get(c, {}), calibration.islands.get(c, []),
                       heads if c == "transformer" else 0) for c, v in data.items()}


def _transformer_heads(calibration: CalibrationManifest) -> int:
    """The transformer's attention heads, from the model the calibration describes (preset config or directory)."""
    import json

    model = calibration.model
    config = model.get("config", {}).get("transformer") if model.get("config") else None
    if config is None and model.get("path"):
        try:
            config = json.loads((Path(model["path"]) / "transformer" / "config.json").read_text())
        except (OSError, ValueError):
            config = None
    return int(config.get("num_attention_heads", 0)) if config else 0
