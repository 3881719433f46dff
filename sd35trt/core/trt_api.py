"""Which TensorRT module the engine code uses, and its logger: one place for both backends.

sd35trt drives TensorRT (module ``tensorrt``, or its lean runtime ``tensorrt_lean``) and TensorRT-RTX (``tensorrt_rtx``,
published on PyPI as ``tensorrt_rtx_bindings``) through one API. At run time ``load`` imports the module a bundle or a
build names. For a type checker, ``trt`` is the stub package of ``typings/`` (the real TensorRT 11.4 and TensorRT-RTX
1.7 bindings, made with pybind11-stubgen): ``make lint`` runs mypy once as it is (TensorRT 11.4) and once with
``--always-true CHECK_RTX`` (TensorRT-RTX). Engine code takes the module as::

    if TYPE_CHECKING:
        from sd35trt.core.trt_api import trt
    ...
        if not TYPE_CHECKING:  # the backend's own module; mypy reads the stubs
            trt = trt_api.load(module_name)

and guards TensorRT-RTX-only calls with ``if CHECK_RTX or not TYPE_CHECKING:``, or types them with ``trt_rtx``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sd35trt.core import log

CHECK_RTX = False

if TYPE_CHECKING:
    import tensorrt_rtx_bindings as trt_rtx  # noqa: F401  (TensorRT-RTX-only calls, checked in both runs)

    if CHECK_RTX:
        import tensorrt_rtx_bindings as trt  # noqa: F401  (re-exported for the engine code's annotations)
    else:
        import tensorrt_bindings as trt  # noqa: F401

# the Python module of each backend's builder and full runtime (the lean runtime: core.portability.RUNTIME_MODULES)
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
KEPT = 50  # problems a logger keeps (a process-wide runtime logger lives as long as the process)


def load(module_name: str) -> Any:
    """The backend's module (``ImportError`` when it is not installed: callers turn that into their install hint)."""
    return importlib.import_module(module_name)


def make_logger(trt: Any, module_name: str, *, forward_warnings: bool = False) -> Any:
    """A TensorRT logger that keeps what sd35trt reports: ``errors`` (the last five, for the one-line error that
    names the runtime's own words), ``problems`` (warnings and errors with their severity, the last ``KEPT``) and
    ``layer_reports`` (the builder's DETAILED per-layer report, VERBOSE). ``forward_warnings``: warnings also go to
    sd35trt's log (a runtime's, not a builder's, which records them in the manifest instead)."""

    class KeepingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.problems: list[str] = []
            self.layer_reports: list[str] = []

        def log(self, severity, msg):  # noqa: A003 - TensorRT's interface
            if "LayerType:" in msg:
                self.layer_reports.append(msg)
                return
            if severity <= trt.ILogger.Severity.WARNING:
                self.problems = [*self.problems[-(KEPT - 1):], f"{severity.name}: {msg}"]
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors = [*self.errors[-4:], msg]
            elif severity <= trt.ILogger.Severity.WARNING and forward_warnings:
                log.warn(f"{module_name}: {msg}")

    return KeepingLogger()
