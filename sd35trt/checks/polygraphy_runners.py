"""Polygraphy's runners over what sd35trt runs, for ``sd35trt compare``: a component runner (PyTorch, an engine
session) as a polygraphy runner, onnxruntime through polygraphy's ``OnnxrtRunner``, and polygraphy's own
``TrtRunner`` on a bundle's plans — the second, independent engine loader whose outputs and refusals ``compare
--bundle`` reports beside sd35trt's. ``polygraphy_trt`` binds polygraphy's TensorRT backend to TensorRT-RTX for a
block (polygraphy picks its TensorRT module once, at import)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sd35trt.core import trt_api

VERBOSE = False  # `compare --verbose`: polygraphy's per-iteration log at INFO (always on stderr)


@contextlib.contextmanager
def polygraphy_quiet():
    """Polygraphy prints its log with print() (stdout, which carries results only): send it to stderr, at
    WARNING unless --verbose, without colour codes."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.INFO if VERBOSE else G_LOGGER.WARNING
    G_LOGGER.colors = False
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        G_LOGGER.module_severity = old


def component_poly_runner(runner: Any, name: str):
    """A ComponentRunner as a polygraphy runner: PyTorch (polygraphy's PytRunner is CUDA-only and breaks on
    CPU) and sd35trt's engine sessions (their own buffers and CUDA graphs). Outputs are copied out: a session's
    buffers are reused by its next call."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    spec = runner.spec

    class ComponentPolyRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for tensor in spec.inputs:
                meta.add(tensor.name, dtype=np.dtype(tensor.dtype),
                         shape=tuple(-1 if isinstance(d, str) else d for d in tensor.shape))
            return meta

        def infer_impl(self, feed_dict):
            import torch

            start = time.perf_counter()
            out = runner(**{k: torch.from_numpy(np.asarray(v)) for k, v in feed_dict.items()})
            result = OrderedDict((k, v.detach().float().cpu().numpy().copy()) for k, v in out.items())
            self.inference_time = time.perf_counter() - start  # polygraphy sums these per runner
            return result

    return ComponentPolyRunner()


def ort_poly_runner(path: Path, name: str, provider: str):
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from sd35trt.core.onnx_utils import ort_session

    return OnnxrtRunner(lambda: ort_session(path, provider=provider), name=name)


_BOUND_BACKENDS: dict[str, dict[str, Any]] = {}  # polygraphy_trt's one import of polygraphy's TensorRT backend, per backend


@contextlib.contextmanager
def polygraphy_trt(backend: str) -> Iterator[Any]:

    """``polygraphy.backend.trt`` bound to ``backend``'s TensorRT module, for this block only.

    Polygraphy picks TensorRT or TensorRT-RTX once, when ``polygraphy.backend.trt`` is first imported
    (``config.USE_TENSORRT_RTX``), and imports it as ``tensorrt_rtx``, which the PyPI wheels name
    ``tensorrt_rtx_bindings``. Here the flag, an alias module and a fresh import of polygraphy's TensorRT
    backend are set up for the block (its lazy TensorRT module resolved inside it, so runners made here keep
    working), and the process's previous state is put back afterwards. The fresh import is made once per backend
    and kept: importing polygraphy's TensorRT backend twice registers its JSON encoders twice, which polygraphy
    refuses ("Duplicate serialization function")."""
    import importlib
    import importlib.util

    import polygraphy.backend
    import polygraphy.config as polygraphy_config

    prefix = "polygraphy.backend.trt"
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n == prefix or n.startswith(prefix + ".")}
    had_attr, old_attr = hasattr(polygraphy.backend, "trt"), getattr(polygraphy.backend, "trt", None)
    saved_flag, alias = polygraphy_config.USE_TENSORRT_RTX, False
    try:
        polygraphy_config.USE_TENSORRT_RTX = backend == "tensorrt-rtx"
        if backend == "tensorrt-rtx" and "tensorrt_rtx" not in sys.modules and importlib.util.find_spec("tensorrt_rtx") is None:
            sys.modules["tensorrt_rtx"], alias = importlib.import_module(trt_api.MODULES["tensorrt-rtx"]), True
        if backend in _BOUND_BACKENDS:
            sys.modules.update(_BOUND_BACKENDS[backend])
            module = sys.modules[prefix]
        else:
            module = importlib.import_module(prefix)
            for name in list(sys.modules):  # resolve every lazy TensorRT module of the fresh import while bound
                lazy = getattr(sys.modules[name], "trt", None) if name.startswith(prefix) else None
                if lazy is not None and type(lazy).__name__ == "LazyModule":
                    lazy.__version__  # noqa: B018
            _BOUND_BACKENDS[backend] = {n: m for n, m in sys.modules.items() if n == prefix or n.startswith(prefix + ".")}
        yield module
    finally:
        for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
            del sys.modules[name]
        sys.modules.update(saved)
        if had_attr:
            polygraphy.backend.trt = old_attr
        elif hasattr(polygraphy.backend, "trt"):
            del polygraphy.backend.trt
        if alias:
            sys.modules.pop("tensorrt_rtx", None)
        polygraphy_config.USE_TENSORRT_RTX = saved_flag


def chained_poly_runner(inners: list[Any], name: str, inputs: Sequence[str], outputs: Sequence[str] | None = None):
    """Polygraphy runners (``TrtRunner`` on a bundle's plans; any polygraphy runner in tests) run back to back
    like ``runners.ChainRunner``: each fed, cast to the dtypes it reports, the inputs it names from what the
    component's inputs and the earlier parts gave; float32 out, like sd35trt's runners. ``inputs``: the
    component's own inputs (the chain's metadata); ``outputs``: what the chain returns (default: everything the
    parts produced)."""
    from polygraphy.backend.base import BaseRunner

    class ChainedRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)
            self.inners = inners

        def activate_impl(self):
            for inner in self.inners:
                inner.activate()

        def deactivate_impl(self):
            for inner in self.inners:
                inner.deactivate()

        def get_input_metadata_impl(self):
            # polygraphy DataTypes, not numpy dtypes (the default of 0.53.6), or Comparator.run fails coercing feeds
            from polygraphy.common import TensorMetadata

            meta = TensorMetadata()
            for inner in self.inners:
                for key, value in inner.get_input_metadata(use_numpy_dtypes=False).items():
                    if key in inputs and key not in meta:
                        meta.add(key, dtype=value.dtype, shape=value.shape)
            return meta

        def infer_impl(self, feed_dict):
            known, self.inference_time = dict(feed_dict), 0.0
            for inner in self.inners:
                meta = inner.get_input_metadata(use_numpy_dtypes=False)
                feeds = OrderedDict((k, np.asarray(known[k]).astype(meta[k].dtype.numpy())) for k in meta)
                known.update((k, np.array(v)) for k, v in inner.infer(feeds).items())
                self.inference_time += inner.last_inference_time()
            names = outputs or tuple(k for k in known if k not in feed_dict)
            return OrderedDict((k, np.asarray(known[k], dtype=np.float32)) for k in names)

    return ChainedRunner()


def polygraphy_trt_runner(plans: list[tuple[Path, str, int]], backend: str, name: str, inputs: Sequence[str],
                          outputs: Sequence[str] | None = None):
    """Polygraphy's own ``TrtRunner`` on a bundle's plans (``(path, sha256, bytes)``, one per part, chained): the
    second, independent engine runner ``compare --bundle`` checks sd35trt's against. The bytes polygraphy
    deserializes are checked against the manifest's sha256 first. TensorRT-RTX bundles use polygraphy's RTX mode,
    scoped to this call (``polygraphy_trt``)."""
    def verified(path: Path, sha256: str, size: int) -> bytes:
        from sd35trt.core.artifacts import check_mapped

        data = path.read_bytes()
        check_mapped(path, data, sha256, size)
        return data

    with polygraphy_trt(backend) as trt_backend:
        inners = [trt_backend.TrtRunner(trt_backend.EngineFromBytes(lambda plan=plan: verified(*plan)),
                                        name=f"{name}:part{k}") for k, plan in enumerate(plans)]
    return chained_poly_runner(inners, name, inputs, outputs)


def engine_twin(runner: Any, name: str) -> Any:
    """Polygraphy's own ``TrtRunner`` on the plans an engine runner (or a chain of part runners) loads, by their
    paths in the bundle; None for a runner that is not an engine."""
    from sd35trt.runtime.runners import ChainRunner

    engines = runner.parts if isinstance(runner, ChainRunner) else [runner]
    if not all(getattr(e, "kind", None) == "engine" and e.plan_file is not None for e in engines):
        return None
    return polygraphy_trt_runner([(e.plan, e.plan_file.sha256, e.plan_file.bytes) for e in engines], engines[0].backend,
                                 name, runner.spec.input_names, runner.spec.output_names)


def twin_refusal(plan: Path, backend: str, sha256: str, size: int) -> str | None:
    """What polygraphy's ``TrtRunner`` says when it activates on ``plan`` (None: it loaded): the second engine
    loader whose refusal ``compare --bundle`` reports beside sd35trt's own (``runners.check_bundle_host``)."""
    runner = polygraphy_trt_runner([(plan, sha256, size)], backend, "polygraphy-twin", ())
    try:
        with polygraphy_quiet():
            runner.activate()
    except Exception as exc:  # noqa: BLE001 - polygraphy raises its own exception type, with the runtime's words
        words = " ".join(str(exc).split())
        return words[:400] or type(exc).__name__
    runner.deactivate()
    return None
