"""TensorRT and TensorRT-RTX backends behind one builder.

Both expose the same Python API (Builder, OnnxParser, IBuilderConfig, ILogger); what differs is small and
lives in the two ``Backend`` classes: which module to import, which compute capabilities it can target and
how (RTX: ahead of time for a list of SMs without a GPU; TensorRT: the local GPU), and whether a timing
cache exists (RTX's timing-cache calls are no-ops). Everything else (parsing, profiles, logging, per-layer
precision) is shared in ``build_engine``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core import log, trt_api
from sd35trt.core.errors import BuildError, MissingDependencyError
from sd35trt.core.host import local_compute_capability
from sd35trt.core.targets import RTX_CCS, Backend, TargetInfo
from sd35trt.producers.layer_report import parse_inspector_json, parse_layers

if TYPE_CHECKING:  # `make lint` checks the engine code against these stubs (core.trt_api)
    from sd35trt.core.trt_api import trt


class TrtBackend:
    kind: Backend
    module_name: str
    install_hint: str
    has_timing_cache: bool

    def __init__(self):
        self._trt = None

    @property
    def trt(self) -> Any:
        if self._trt is None:
            try:
                self._trt = trt_api.load(self.module_name)
            except ImportError as exc:
                raise MissingDependencyError(f"{self.kind.value} backend is not installed ({exc.msg})",
                                             hint=self.install_hint) from None
        return self._trt

    def available(self) -> bool:
        try:
            self.trt  # noqa: B018
        except MissingDependencyError:
            return False
        return True

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    def buildable_ccs(self, target: TargetInfo) -> tuple[tuple[int, int], ...]:
        raise NotImplementedError

    def configure(self, config: Any, ccs: tuple[tuple[int, int], ...]) -> None:
        raise NotImplementedError


class TensorRTRTXBackend(TrtBackend):
    kind = Backend.TENSORRT_RTX
    module_name = trt_api.MODULES["tensorrt-rtx"]
    install_hint = "pip install 'sd35trt[rtx]' (tensorrt-rtx-cu13-libs and -bindings 1.7.1.116)"
    has_timing_cache = False  # "Timing cache operations are no-ops in TensorRT-RTX"

    def buildable_ccs(self, target: TargetInfo) -> tuple[tuple[int, int], ...]:
        ccs = tuple(cc for cc in target.compute_capabilities if cc in RTX_CCS)
        local = local_compute_capability()
        if not ccs and local is not None and local in target.compute_capabilities:
            # a GPU TensorRT-RTX has no target for (Hopper): it builds for the GPU it runs on (CURRENT), so the
            # engines reach the runtime, whose own words then say whether it runs them (selftest on an H100/H200)
            log.warn(f"TensorRT-RTX has no ahead-of-time target for SM{local[0]}{local[1]}: building for this GPU "
                     "(ComputeCapability.CURRENT); its runtime decides whether the engines run here")
            return (local,)
        if not ccs:
            raise BuildError(
                f"TensorRT-RTX cannot build for {target.target.value} ({', '.join(target.sm_names)})",
                hint="use --backend tensorrt on a host with that GPU (pip install 'sd35trt[tensorrt]')")
        skipped = [f"SM{a}{b}" for a, b in target.compute_capabilities if (a, b) not in ccs]
        if skipped:
            log.warn(f"TensorRT-RTX builds {target.target.value} for "
                     f"{', '.join(f'SM{a}{b}' for a, b in ccs)} only; {', '.join(skipped)} needs --backend tensorrt")
        return ccs

    def configure(self, config: Any, ccs: tuple[tuple[int, int], ...]) -> None:
        if TYPE_CHECKING:  # TensorRT-RTX's own API, whichever stubs the rest is checked with
            from sd35trt.core.trt_api import trt_rtx as trt
        else:
            trt = self.trt
        config.num_compute_capabilities = len(ccs)
        for index, (major, minor) in enumerate(ccs):
            named = getattr(trt.ComputeCapability, f"SM{major}{minor}", None)  # none for Hopper/B200: the local GPU
            config.set_compute_capability(named if named is not None else trt.ComputeCapability.CURRENT, index)


class TensorRTBackend(TrtBackend):
    kind = Backend.TENSORRT
    module_name = trt_api.MODULES["tensorrt"]
    install_hint = ("pip install 'sd35trt[tensorrt]' on a host with an NVIDIA GPU of the target architecture "
                    "(the tensorrt wheels come from NVIDIA's package index)")
    has_timing_cache = True

    def buildable_ccs(self, target: TargetInfo) -> tuple[tuple[int, int], ...]:
        # Full TensorRT builds for the GPU it runs on; it cannot cross-compile to another architecture.
        local = local_compute_capability()
        if local is None:
            raise BuildError(f"TensorRT needs a GPU of the target architecture to build {target.target.value} engines, "
                             "and this host has none",
                             hint=f"run the build on a {target.example_gpus} host, or use --backend tensorrt-rtx "
                                  "for ada/ampere/turing/blackwell (SM120)")
        if local not in target.compute_capabilities:
            raise BuildError(f"this host's GPU is SM{local[0]}{local[1]}, target {target.target.value} needs "
                             f"{', '.join(target.sm_names)}",
                             hint=f"build on a {target.example_gpus} host, or pass --gpu auto for this GPU")
        return (local,)

    def configure(self, config: Any, ccs: tuple[tuple[int, int], ...]) -> None:
        return None


BACKENDS: dict[Backend, type[TrtBackend]] = {Backend.TENSORRT: TensorRTBackend, Backend.TENSORRT_RTX: TensorRTRTXBackend}


def choose_backend(requested: Backend, target: TargetInfo) -> TrtBackend:
    """``auto``: TensorRT when it is installed and a GPU of the target is here; else TensorRT-RTX if it can."""
    if requested is not Backend.AUTO:
        backend = BACKENDS[requested]()
        backend.trt  # noqa: B018  (fail early with the install hint)
        return backend
    trt_backend, rtx_backend = TensorRTBackend(), TensorRTRTXBackend()
    local = local_compute_capability()
    if trt_backend.available() and local in target.compute_capabilities:
        return trt_backend
    if any(cc in RTX_CCS for cc in target.compute_capabilities) or \
            (local in target.compute_capabilities and rtx_backend.available()):
        rtx_backend.trt  # noqa: B018
        return rtx_backend
    raise BuildError(
        f"no backend here can build {target.target.value} ({', '.join(target.sm_names)}): TensorRT-RTX does not "
        f"target it and full TensorRT {'is not installed' if not trt_backend.available() else 'needs that GPU here'}",
        hint=f"run `make engines GPU={target.target.value}` on a {target.example_gpus} host with "
             "pip install 'sd35trt[tensorrt]'")


# --- the shared builder --------------------------------------------------------------------------------


@dataclass
class BuiltEngine:
    plan_bytes: int  # the plan itself is on disk at the path the build was given
    layers: list[dict[str, Any]]
    warnings: list[str]
    timing_cache: bytes | None
    memory: dict[str, Any] = field(default_factory=dict)  # builder process RSS after parse, peak, plan size
    layer_source: str = "builder log"  # or "engine inspector" (full TensorRT)


def inspect_layers(trt: Any, logger: Any, plan_path: Path) -> list[dict[str, Any]]:
    """Per-layer dtypes from the engine inspector's JSON (full TensorRT builds on the GPU it targets, so the
    plan can be deserialized right after the build). Any failure gives [] — "unknown", never a failed build."""
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            return []
        text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        return parse_inspector_json(text)
    except Exception:  # noqa: BLE001 - the report is informative; check_layer_report treats [] as unknown
        return []


def build_engine(backend: TrtBackend, onnx_path: Path, profile: dict[str, list[list[int]]],
                 ccs: tuple[tuple[int, int], ...], plan_path: Path, *, timing_cache: bytes | None = None,
                 workspace_gib: float | None = None, stream: bool = True, version_compatible: bool = False,
                 hardware_compat: str = "none", weight_streaming: bool = False, refit: str = "none") -> BuiltEngine:
    """Parse ``onnx_path`` into a strongly typed network, build a serialized engine for ``ccs`` and write it to
    ``plan_path``: streamed by the builder (``build_serialized_network_to_stream``), or with ``stream=False``
    from the builder's ``IHostMemory`` (buffer protocol, no copy). ``memory`` records where the peak lies."""
    if not TYPE_CHECKING:  # `make lint` checks this against the stubs' ``trt`` (TensorRT 11.4, TensorRT-RTX 1.7)
        trt = backend.trt
    logger = trt_api.make_logger(trt, backend.module_name)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))[:400]
        raise BuildError(f"{backend.kind.value} cannot parse the ONNX: {errors}", path=onnx_path,
                         hint="re-export it; if it persists, report the manifest")
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    for name, (shape_min, shape_opt, shape_max) in profile.items():
        opt_profile.set_shape(name, trt.Dims(shape_min), trt.Dims(shape_opt), trt.Dims(shape_max))
    config.add_optimization_profile(opt_profile)
    cache = _configure(backend, config, ccs, timing_cache=timing_cache, workspace_gib=workspace_gib,
                       version_compatible=version_compatible, hardware_compat=hardware_compat,
                       weight_streaming=weight_streaming, refit=refit)
    parsed_gib = _RssSampler.read().get("VmRSS", 0.0)
    sampler = _RssSampler()
    streamed = stream and hasattr(builder, "build_serialized_network_to_stream")
    try:
        if streamed:
            ok, size = _build_streamed(trt, builder, network, config, plan_path)
        else:
            serialized = builder.build_serialized_network(network, config)
            ok, size = serialized is not None, 0
            del network, parser, builder  # the builder's copy of the weights, before the plan is written
            if serialized is not None:
                with open(plan_path, "wb") as handle:
                    # IHostMemory has the buffer protocol (not in the stubs): no copy
                    handle.write(memoryview(serialized))  # type: ignore[arg-type]
                size = serialized.nbytes
            del serialized
    except OSError:
        sampler.stop()
        raise
    if not ok:
        sampler.stop()
        plan_path.unlink(missing_ok=True)
        raise _build_failure(backend, logger.problems, onnx_path, refit)
    layers, layer_source = parse_layers(logger.layer_reports), "builder log"
    if backend.kind is Backend.TENSORRT:  # full TensorRT: the engine inspector, not log lines that change per version
        inspected = inspect_layers(trt, logger, plan_path)
        if inspected:
            layers, layer_source = inspected, "engine inspector"
    memory = {"rss_after_parse_gib": round(parsed_gib, 3), "peak_rss_gib": round(_peak_rss_gib(), 3),
              **sampler.stop(), "plan_gib": round(size / 2**30, 3), "streamed": streamed}
    return BuiltEngine(plan_bytes=size, layers=layers, warnings=logger.problems[-20:],
                       timing_cache=_cache_bytes(cache), memory=memory, layer_source=layer_source)


def _build_streamed(module: Any, builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig,
                    plan_path: Path) -> tuple[bool, int]:
    """Build with the plan streamed to ``plan_path`` as the builder serializes it (no second copy in memory);
    (built, bytes written). A write error is the OSError of the file, the partial plan removed."""
    with open(plan_path, "wb") as handle:
        writer = _plan_writer(module, handle)
        ok = builder.build_serialized_network_to_stream(network, config, writer)
    if writer.error is not None:
        plan_path.unlink(missing_ok=True)
        raise OSError(writer.error.errno, writer.error.strerror, str(plan_path))
    return bool(ok), writer.written


def _configure(backend: TrtBackend, config: trt.IBuilderConfig, ccs: tuple[tuple[int, int], ...], *, timing_cache: bytes | None,
               workspace_gib: float | None, version_compatible: bool, hardware_compat: str, weight_streaming: bool,
               refit: str) -> Any:
    """The builder config's options (layer detail for the report, workspace, timing cache, target compute
    capabilities, portability, weight streaming, refit); returns the timing cache, None where the backend has none."""
    if not TYPE_CHECKING:  # as in build_engine
        trt = backend.trt
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache = None
    if backend.has_timing_cache:
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, False)
    backend.configure(config, ccs)
    if version_compatible:  # plans for the lean runtime of this version (sd35trt.core.portability)
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if hardware_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if weight_streaming:  # the deploy host may then stream weights under a budget (the VRAM plan's streaming mode)
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if refit != "none":  # REFIT: refit with other weights (a LoRA); REFIT_IDENTICAL would only allow the same ones
        config.set_flag(trt.BuilderFlag.REFIT)
        if refit == "stripped":
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    return cache


def _build_failure(backend: TrtBackend, problems: list[str], onnx_path: Path, refit: str) -> BuildError:
    """The one-line error of a failed build: the builder's last words, with the hint its cause calls for."""
    detail = " | ".join(problems[-3:])[:500] or "no message"
    needs_gpu = "cudaError 35" in detail or "CUDA driver version is insufficient" in detail
    # TensorRT-RTX compiles some kernels on the host's own GPU while it builds (refittable plans); on a GPU it does
    # not support (Hopper, SM90) loading them fails with "CUDA error 222 loading a module"
    wrong_gpu = "CUDA error 222" in detail or "CUDAMod" in detail
    refused = re.search(r"Cannot compile operation '([^']+)' for [^(]*\((SM\d+)\): ([^.(]+)", detail)
    if refused:  # the cause; a driver error that follows it is the builder's cascade, not what to fix
        op, sm, why = refused.groups()
        return BuildError(f"{backend.kind.value} cannot build {op} for {sm}: {why.strip()}", path=onnx_path,
                          hint="this builder has no kernel for that operation on that GPU: report it with the ONNX "
                               "manifest; full TensorRT on a host with that GPU (--backend tensorrt) may build it")
    hint = ("this build needs a CUDA driver (TensorRT-RTX builds refittable or weight-stripped plans only on a GPU "
            "host): build there, or drop --refittable/--strip-weights" if needs_gpu and refit != "none" else
            "this build needs a CUDA driver: build on a GPU host" if needs_gpu else
            "TensorRT-RTX compiled kernels for this host's GPU while building and could not load them (it does not "
            "support this GPU, e.g. Hopper SM90): build on a host with an RTX-supported GPU (SM75-SM121, not SM90), "
            "or drop --refittable/--strip-weights" if wrong_gpu else
            "check the target supports this precision (FP8 needs ada/hopper/blackwell)")
    return BuildError(f"{backend.kind.value} engine build failed: {detail}", path=onnx_path, hint=hint)


def _cache_bytes(cache: Any) -> bytes | None:
    """The timing cache's bytes (``IHostMemory`` has the buffer protocol), or None without one."""
    return bytes(cache.serialize()) if cache is not None else None


def _plan_writer(trt: Any, handle: Any) -> Any:
    """An ``IStreamWriter`` that appends the builder's chunks to ``handle`` (TensorRT-RTX 1.7 hands over the
    whole plan in one chunk; the full TensorRT builder may stream it)."""

    class PlanWriter(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)
            self.written = 0
            self.error: OSError | None = None

        def write(self, data):  # noqa: D401 - TensorRT's interface
            # An exception cannot cross the builder's C++ frames (it would be lost and the build "succeed"
            # with a short file): keep it, report a short write, and raise it after the builder returns.
            if self.error is not None:
                return 0
            try:
                count = handle.write(data)
                handle.flush()
            except OSError as err:
                self.error = err
                return 0
            self.written += count
            return count

    return PlanWriter()


class _RssSampler:
    """Samples /proc/self/status while the builder runs and keeps the split at the RSS peak: anonymous memory
    (what the build really needs) and file-backed pages (the ONNX weights the parser maps: clean page cache the
    kernel can drop and re-read under pressure)."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.peak: dict[str, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def read() -> dict[str, float]:
        """This process's VmRSS, RssAnon and RssFile now, in GiB ({} where /proc cannot be read)."""
        found = {}
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "RssAnon", "RssFile"):
                        found[key] = int(value.split()[0]) / 2**20  # kB → GiB
        except (OSError, ValueError, IndexError):
            pass
        return found

    def _run(self, interval: float) -> None:
        while not self._done.wait(interval):
            now = self.read()
            if now.get("VmRSS", 0.0) >= self.peak.get("VmRSS", 0.0):
                self.peak = now

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join()
        if "RssAnon" not in self.peak:
            return {}
        return {"peak_anon_gib": round(self.peak["RssAnon"], 3), "peak_file_backed_gib": round(self.peak["RssFile"], 3)}


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _build_child(conn: Any, kind: str, args: tuple, kwargs: dict) -> None:
    """In a spawned process: run ``build_engine`` and send back ("ok", BuiltEngine) or the error's parts."""
    from sd35trt.core.errors import Sd35TrtError

    try:
        backend = BACKENDS[Backend(kind)]()
        conn.send(("ok", build_engine(backend, *args, **kwargs)))
    except Sd35TrtError as err:
        conn.send(("error", (type(err).__name__, err.what, str(err.path) if err.path else None, err.hint)))
    except OSError as err:
        conn.send(("oserror", (err.errno, err.strerror, err.filename)))
    except Exception:  # noqa: BLE001 - sd35trt's own bug in the child: sent back with its traceback, not a "crash"
        import traceback

        conn.send(("bug", traceback.format_exc()))


def build_engine_isolated(backend: TrtBackend, onnx_path: Path, profile: dict[str, list[list[int]]],
                          ccs: tuple[tuple[int, int], ...], plan_path: Path, *, timing_cache: bytes | None = None,
                          workspace_gib: float | None = None, stream: bool = True, version_compatible: bool = False,
                          hardware_compat: str = "none", weight_streaming: bool = False,
                          refit: str = "none") -> BuiltEngine:
    """``build_engine`` in a child process: a builder that crashes (TensorRT-RTX 1.7 segfaults on some graphs)
    becomes one clear error instead of killing sd35trt, and the builder's memory is returned to the system
    after every engine."""
    import multiprocessing
    import signal

    from sd35trt.core import errors

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_build_child, daemon=True, args=(
        send, backend.kind.value, (onnx_path, profile, ccs, plan_path),
        {"timing_cache": timing_cache, "workspace_gib": workspace_gib, "stream": stream,
         "version_compatible": version_compatible, "hardware_compat": hardware_compat,
         "weight_streaming": weight_streaming, "refit": refit}))
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # the child died without answering
        result = None
    except BaseException:
        child.terminate()
        child.join()
        raise
    child.join()
    if result is None:
        code = child.exitcode or 0
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise BuildError(f"{backend.kind.value} {backend.version} crashed ({how}) while building this ONNX",
                         path=onnx_path, hint="a builder bug on this graph (an FP32 T5 attention inside FP16 is one); "
                                              "report it with the ONNX manifest; the previous bundle is untouched")
    status, payload = result
    if status == "bug":
        raise RuntimeError(f"the build process failed inside sd35trt (not a builder crash); its traceback:\n{payload}")
    if status == "oserror":
        raise OSError(*payload)
    if status == "error":
        kind, what, path, hint = payload
        raise errors.by_name(kind, BuildError)(what, path=path, hint=hint)
    return payload
