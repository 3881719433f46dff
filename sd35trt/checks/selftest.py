"""``sd35trt selftest``: the test CI cannot run, for users' build and deploy hosts.

On a host with an NVIDIA GPU: calibrate and export the tiny model, build its engines for the local GPU with
whichever backend is installed, generate an image through the engines and compare them with PyTorch, then the
same comparison for engines built in parts (``build --parts``: chained engines). Each
step is a row of a PASS/FAIL table and of ``selftest.json``; the first failure stops the run with its real
reason. Without a GPU: one line, exit 2 (nothing here can execute an engine).
"""

from __future__ import annotations

import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35trt import __version__
from sd35trt.core import log
from sd35trt.core.errors import RuntimeUnavailableError, Sd35TrtError


@dataclass
class SelftestReport:
    steps: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = True

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "selftest", "toolkit": __version__, "host": platform.node(), "passed": self.passed,
                "steps": self.steps}

    def table(self) -> str:
        lines = [f"{'step':<10} {'result':<6} {'seconds':>8}  detail"]
        lines += [f"{s['step']:<10} {'PASS' if s['passed'] else 'FAIL':<6} {s['seconds']:>8.1f}  {s['detail']}"
                  for s in self.steps]
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def run_selftest(out: Path) -> SelftestReport:
    from sd35trt.core.host import local_compute_capability

    if local_compute_capability() is None:
        raise RuntimeUnavailableError("selftest needs an NVIDIA GPU and this host has none",
                                      hint="run it on the build or deploy host; `make test` is the CPU suite")
    run = _Selftest(out)
    steps = (("target", run.target), ("calibrate", run.calibrate), ("export", run.export), ("build", run.build),
             ("generate", run.generate), ("compare", run.compare), ("parts", run.parts))
    for index, (name, action) in enumerate(steps):
        if not run.step(name, action):
            run.report.steps += [{"step": later, "passed": False, "seconds": 0.0,
                                  "detail": f"not run (after {name} failed)"} for later, _ in steps[index + 1:]]
            break
    from sd35trt.core.artifacts import write_json_atomic

    write_json_atomic(out / "selftest.json", run.report.to_dict() | ({"tracebacks": run.tracebacks} if run.tracebacks else {}))
    return run.report


class _Selftest:
    """The steps of one selftest in ``out``, each a method that returns its detail line or raises; what a step
    makes (the model source, the bundle, its runners) is kept for the next."""

    def __init__(self, out: Path):
        self.out, self.work, self.engines = out, out / "work", out / "engines"
        self.report = SelftestReport()
        self.tracebacks: dict[str, str] = {}
        self.source: Any = None
        self.bundle: Path | None = None
        self.runners: Any = None
        self.ranges: Any = None

    def step(self, name: str, action: Callable[[], str]) -> bool:
        """Run one step as a PASS/FAIL row: a sd35trt error is its one line, a bug its traceback in the report."""
        start = time.perf_counter()
        log.info(f"[bold]→[/bold] selftest: {name}")
        try:
            detail, ok = action(), True
        except Sd35TrtError as err:
            detail, ok = str(err), False
        except Exception as err:  # noqa: BLE001 - a bug is a FAIL row with its traceback in the report
            detail, ok = f"{type(err).__name__}: {err}", False
            self.tracebacks[name] = traceback.format_exc()
        seconds = time.perf_counter() - start
        log.info(f"  {'[green]PASS[/green]' if ok else '[red]FAIL[/red]'} {name} ({seconds:.1f} s)")
        self.report.steps.append({"step": name, "passed": ok, "seconds": round(seconds, 2), "detail": detail[:500]})
        self.report.passed &= ok
        return ok

    def target(self) -> str:
        """The local GPU's target, and which backend can build it: a missing backend is the build step's FAIL
        (with its real reason), so calibration and export still run on this GPU."""
        from sd35trt.core.host import resolve_target
        from sd35trt.core.targets import Backend, GpuTarget
        from sd35trt.producers.trt_builder import choose_backend

        info = resolve_target(GpuTarget.AUTO)
        try:
            backend = choose_backend(Backend.AUTO, info)
        except Sd35TrtError as err:
            return f"{info.target.value} ({', '.join(info.sm_names)}); no backend here builds it: {err.what}"
        return f"{info.target.value} ({', '.join(info.sm_names)}), {backend.kind.value} {backend.version}"

    def calibrate(self) -> str:
        from sd35trt.core.models import resolve_model
        from sd35trt.producers.calibrate import CalibrationConfig, calibrate_model

        self.source = resolve_model("tiny")
        result = calibrate_model(self.source, self.work, CalibrationConfig(num_prompts=2, steps=2, height=512,
                                                                          width=512, batch=2), device="cuda")
        return f"{result.report['quantizers']['enabled']} FP8 quantizers"

    def export(self) -> str:
        from sd35trt.producers.export import ExportConfig, export_model

        results = export_model(self.source, self.work, ExportConfig(), device="cuda")
        return f"{len(results)} ONNX variants validated"

    def build(self) -> str:
        from sd35trt.core.targets import GpuTarget
        from sd35trt.producers.bundle import BuildConfig, build_bundle

        result = build_bundle(self.work, self.engines, BuildConfig(target=GpuTarget.AUTO), force=True)
        self.bundle = result.folder
        return ", ".join(f"{n} {e.precision}" for n, e in result.manifest.components.items())

    def generate(self) -> str:
        from sd35trt.core.assets import PipelineAssets
        from sd35trt.runtime.pipeline import Sd35Loop
        from sd35trt.runtime.request import GenerateRequest
        from sd35trt.runtime.runners import runners_from_bundle

        assert self.bundle is not None
        found = runners_from_bundle(self.bundle)
        self.runners, self.ranges = found.runners, found.ranges
        assert found.assets_folder is not None
        loop = Sd35Loop(PipelineAssets.load(found.assets_folder), found.runners, found.ranges)
        result = loop(GenerateRequest(prompt="a lighthouse at dusk", steps=4, height=512, width=512), progress=False)
        result.pil[0].save(self.out / "selftest.png")
        return f"{self.out / 'selftest.png'}, {result.timings['total_s']:.2f} s"

    def compare(self) -> str:
        psnr = self._compare_with_pytorch("engine", self.runners, self.bundle, "compare", "engines differ")
        return f"end to end {psnr:.1f} dB vs diffusers; per component within tolerance"

    def parts(self) -> str:
        """The transformer and T5 built in 2 parts each (``build --parts``), their chained engines compared like
        the whole ones: with PyTorch per component and end to end, and with polygraphy's chained TrtRunner."""
        from sd35trt.core.targets import GpuTarget
        from sd35trt.producers.bundle import BuildConfig, build_bundle
        from sd35trt.runtime.runners import runners_from_bundle

        built = build_bundle(self.work, self.out / "engines-parts", BuildConfig(target=GpuTarget.AUTO, parts=(
            ("transformer", 2), ("t5", 2))), force=True)
        psnr = self._compare_with_pytorch("engine-parts", runners_from_bundle(built.folder).runners, built.folder,
                                          "compare-parts", "engines built in parts differ")
        return f"transformer and t5 in 2 parts: end to end {psnr:.1f} dB vs diffusers; per component within tolerance"

    def _compare_with_pytorch(self, label: str, runners: Any, bundle: Path | None, folder: str, what: str) -> float:
        """``compare`` of ``runners`` with the PyTorch model (per component and end to end); its PSNR, or the
        failures as a RuntimeUnavailableError naming compare.json."""
        from sd35trt.checks.compare import CompareConfig, run_compare

        cfg = CompareConfig(prompts=1, steps=4, height=512, width=512)
        result = run_compare(self.source, self.out / folder, cfg, ["a koi pond in autumn, watercolor"],
                             {label: runners}, self.ranges, str(bundle))
        if not result:
            raise RuntimeUnavailableError(f"{what} from PyTorch: " + "; ".join(result.failures),
                                          path=self.out / folder / "compare.json", hint="report it with selftest.json")
        return float(result.data["end_to_end"][label]["min_image_psnr_db"])
