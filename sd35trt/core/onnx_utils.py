"""ONNX helpers: one external-data file per model, onnxruntime sessions, Q/DQ clean-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35trt.core.errors import ArtifactError, InvalidInputError, RuntimeUnavailableError, check_choice

if TYPE_CHECKING:
    import onnx

TWO_GB = 2**31 - 1
DATA_SUFFIX = ".data"


def consolidate_external_data(model_path: Path) -> None:
    """Rewrite per-tensor external-data files (what the legacy exporter writes past 2 GB) into one file."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    model = onnx.load(str(model_path), load_external_data=False)
    external = [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external or all(ExternalDataInfo(t).location == model_path.name + DATA_SUFFIX for t in external):
        return
    save_streaming(model, model_path, source_dir=model_path.parent)


def save_streaming(model: onnx.ModelProto, model_path: Path, *, source_dir: Path | None) -> None:
    """Save ``model`` with every large tensor in one ``<name>.data`` file, streaming tensor by tensor.

    Tensors may be inline (``raw_data``) or still external in ``source_dir`` (loaded with
    ``load_external_data=False``): either way each is copied once into the new file, so peak memory is
    one tensor plus what is already inline, never the whole model twice. Small models are saved inline.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    tensors = list(_get_all_tensors(model))
    has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors)
    if not has_external and model.ByteSize() < TWO_GB - (64 << 20):
        onnx.save(model, str(model_path))
        return
    data_name = model_path.name + DATA_SUFFIX
    partial = model_path.parent / (data_name + ".partial")
    stale: set[Path] = set()
    with open(partial, "wb") as out:
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                blob = read_external(tensor, source_dir or model_path.parent)
                stale.add((source_dir or model_path.parent) / ExternalDataInfo(tensor).location)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                blob = tensor.raw_data
                tensor.ClearField("raw_data")
            else:
                continue
            out.write(b"\0" * ((-out.tell()) % 64))  # 64-byte alignment for mmap-friendly loading
            offset = out.tell()
            out.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
    os.replace(partial, model_path.parent / data_name)
    onnx.save(model, str(model_path))
    for old in stale:
        if old.parent == model_path.parent and old.name != data_name and old.exists():
            old.unlink()


def read_external(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    """The bytes of one tensor stored in an external-data file, read directly (onnx's own loader refuses a data
    file with several hard links, which is what ``sd35trt.producers.parts`` makes beside the parts while they build)."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    with open(base_dir / info.location, "rb") as handle:
        handle.seek(info.offset or 0)
        return handle.read(info.length) if info.length else handle.read()


def has_float8(model_path: Path) -> bool:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    f8 = {onnx.TensorProto.FLOAT8E4M3FN}
    return any(t.data_type in f8 for t in model.graph.initializer) or any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


LEAN_BYTES = 1 << 30
PROVIDERS = ("auto", "cpu", "cuda")
# CUDA: TF32 off (an FP32 check must run in FP32: TF32 alone moves the Medium transformer 1.9e-4 rel-L2, past
# the FP32 tolerance) and cuDNN's heuristic convolution choice (exhaustive search costs seconds and workspace).
_EP: dict[str, list[Any]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": [("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]}


def _cuda_ep_usable() -> str | None:
    """None when onnxruntime's CUDA execution provider can run here, else why not (one phrase)."""
    import torch  # first: loads the CUDA 13 / cuDNN libraries onnxruntime-gpu links against

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime {ort.__version__} has no CUDA execution provider (it is not onnxruntime-gpu)"
    return None


def resolve_provider(provider: str) -> str:
    """``cpu`` or ``cuda`` for an onnxruntime session. ``auto``: CUDA when onnxruntime-gpu and a GPU are
    present, else CPU; an explicit ``cuda`` that cannot run is a user error. FP8 Q/DQ graphs run on CUDA too:
    onnxruntime's CUDA provider has float8 QuantizeLinear/DequantizeLinear kernels from opset 19 (the graphs
    here are opset 19), and the matmuls between them run in FP16 there."""
    if check_choice("--provider", provider, PROVIDERS) == "cpu":
        return "cpu"
    why = _cuda_ep_usable()
    if provider == "cuda" and why:
        raise InvalidInputError(f"--provider cuda cannot run: {why}",
                                hint="install onnxruntime-gpu on a CUDA host, or use --provider cpu")
    return "cpu" if why else "cuda"


def ort_session(path: Path, *, provider: str = "cpu", threads: int | None = None):
    """An onnxruntime session on ``provider`` (see ``resolve_provider``).

    Graph optimisations are disabled for FP8 Q/DQ graphs (ORT's fusions break on float8). On CPU, for
    models with more than 1 GiB of external weights, constant folding is too: ORT runs FP16 nodes through
    inserted Casts there, and its constant folding would materialise an FP32 copy of every FP16 weight
    (measured: 16 GiB peak RSS for the 4.9 GB SD3.5-Medium FP16 transformer), so each Cast runs per
    inference instead. On CUDA the FP16 nodes run natively and the weights live in GPU memory.
    """
    import onnxruntime as ort

    float8 = has_float8(path)
    device = resolve_provider(provider)
    options = ort.SessionOptions()
    # fatal only: on CUDA, cuDNN's frontend logs "No execution plans support the graph" at error level for each
    # VAE convolution it then runs another way (142 red lines in a passing SD3.5 export); real failures raise.
    ort.set_default_logger_severity(4)  # those come through onnxruntime's default logger, not the session's
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
    data = path.with_name(path.name + DATA_SUFFIX)
    disabled = []
    if float8:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif device == "cpu" and data.is_file() and data.stat().st_size > LEAN_BYTES:
        # Not ORT_DISABLE_ALL: ORT then fails to type its own inserted FP16 casts (seen at SD3.5-Medium size).
        disabled = ["ConstantFolding"]
        options.enable_cpu_mem_arena = False
    try:
        session = ort.InferenceSession(str(path), options, providers=_EP[device], disabled_optimizers=disabled or None)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise ArtifactError(f"onnxruntime cannot load the model ({first})", path=path,
                            hint="the ONNX is corrupt or was produced by another toolkit version; re-export it") from None
    if device == "cuda" and session_provider(session) != "cuda":
        # onnxruntime falls back to CPU silently when the CUDA/cuDNN libraries fail to load.
        raise RuntimeUnavailableError("onnxruntime could not start its CUDA execution provider", path=path,
                                      hint="its CUDA 13 / cuDNN 9 libraries were not found; import torch (cu13x) "
                                           "in the same environment or use --provider cpu")
    return session


def session_provider(session: Any) -> str:
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def run_ort(session: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    outputs = session.run(names, {k: v for k, v in feeds.items() if k in inputs})
    return dict(zip(names, outputs))
