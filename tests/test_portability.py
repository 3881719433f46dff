"""What a bundle needs at run time: the ``runtime`` record, the deploy host's check against it, the combinations
the backends refuse, and the build-box memory check. Pure parts run here; a version-compatible TensorRT build
needs full TensorRT, which cannot be installed on this machine."""

from __future__ import annotations

import pytest

from sd35trt.core.errors import InvalidInputError
from sd35trt.core.manifests import RuntimeRecord
from sd35trt.core.portability import check_portability, runtime_fit, runtime_module
from sd35trt.core.targets import Backend, GpuTarget
from sd35trt.producers.bundle import BuildConfig, build_bundle
from sd35trt.producers.parts import check_memory
from tests.conftest import needs_rtx
from tests.test_bad_inputs import assert_user_error, run_cli

PLAIN = RuntimeRecord("tensorrt", "11.4.0.106", False, "none", ("8.9",))
PORTABLE = RuntimeRecord("tensorrt", "11.4.0.106", True, "none", ("8.9",))
AMPERE_PLUS = RuntimeRecord("tensorrt", "11.4.0.106", True, "ampere+", ("8.0",))


@pytest.mark.parametrize("record, installed, cc, ok, why", [
    (PLAIN, {"tensorrt": "11.4.0.106"}, "8.9", True, "runs on tensorrt 11.4.0.106"),
    (PLAIN, {"tensorrt_lean": "11.4.0.106"}, "8.9", False, "need tensorrt 11.4.0.106"),
    (PLAIN, {"tensorrt": "11.5.0.1"}, "8.9", False, "need that exact version"),
    (PLAIN, {"tensorrt": "11.4.0.106"}, "9.0", False, "built for compute capability 8.9, this GPU is 9.0"),
    (PORTABLE, {"tensorrt_lean": "11.4.0.106"}, "8.9", True, "runs on tensorrt_lean 11.4.0.106 (version-compatible"),
    (PORTABLE, {"tensorrt_lean": "11.3.0.1"}, "8.9", False, "runtime (lean or full)"),
    (AMPERE_PLUS, {"tensorrt_lean": "11.4.0.106"}, "12.0", True, "runs on tensorrt_lean"),
    (AMPERE_PLUS, {"tensorrt": "11.4.0.106"}, "7.5", False, "Ampere-and-newer"),
    (PLAIN, {"tensorrt": "11.4.0.106"}, None, False, "no CUDA GPU"),
])
def test_runtime_fit(record, installed, cc, ok, why):
    fits, reason = runtime_fit(record, installed, cc)
    assert fits is ok and why in reason, reason
    if ok:
        assert reason.startswith(f"runs on {runtime_module(record, installed)} ")


def test_runtime_record_round_trip_and_older_bundles():
    data = PORTABLE.to_dict()
    assert data["runs_on"] == ["tensorrt 11.4.0.106", "tensorrt_lean 11.4.0.106"] and data["lean_runtime_in_plan"] is False
    assert RuntimeRecord.from_dict(data) == PORTABLE
    # a bundle from before the runtime record existed: plain engines of its backend
    older = RuntimeRecord.recorded({}, "tensorrt-rtx", "1.7.1.116", ["8.9"])
    assert older == RuntimeRecord("tensorrt-rtx", "1.7.1.116", False, "none", ("8.9",))
    assert RuntimeRecord.recorded(data, "tensorrt-rtx", "1.7.1.116", ["8.9"]) == PORTABLE


def test_refused_combinations():
    with pytest.raises(InvalidInputError, match="TensorRT-RTX engines already run"):
        check_portability("tensorrt-rtx", True, "none", fp8_components=[], build_cc=None)
    with pytest.raises(InvalidInputError, match="Ampere, which has no FP8 \\(transformer would be FP8\\)"):
        check_portability("tensorrt", False, "ampere+", fp8_components=["transformer"], build_cc=(9, 0))
    with pytest.raises(InvalidInputError, match="needs an Ampere or newer GPU to build on"):
        check_portability("tensorrt", True, "ampere+", fp8_components=[], build_cc=(7, 5))
    with pytest.raises(InvalidInputError, match="--hardware-compat 'turing\\+' is not one of"):
        check_portability("tensorrt", False, "turing+", fp8_components=[], build_cc=None)
    check_portability("tensorrt", True, "ampere+", fp8_components=[], build_cc=(9, 0))  # what it is for


def test_memory_check_refuses_in_one_line_before_the_build():
    with pytest.raises(InvalidInputError, match=r"needs about 17\.0 GiB \(2\.0x its 8\.0 GiB of weights, measured, "
                                                r"besides the mapped ONNX itself\), 16\.0 GiB available: .*--no-memory-check"):
        check_memory(8 << 30, "the transformer engine", 16 << 30)
    check_memory(8 << 30, "the transformer engine", 18 << 30)
    check_memory(8 << 30, "the transformer engine", None)  # no /proc/meminfo: no opinion


def test_build_refuses_ampere_plus_fp8_in_one_line(capsys, calibrated, tmp_path):
    out, _ = calibrated
    code, err = run_cli(capsys, ["build", "--gpu", "ada", "--onnx", out, "--out", tmp_path, "--hardware-compat", "ampere+"])
    assert_user_error(code, err, "must also run on Ampere, which has no FP8")
    assert not any(tmp_path.iterdir())


@needs_rtx
def test_rtx_bundle_records_its_runtime_and_refuses_portable(capsys, calibrated, tmp_path):
    out, _ = calibrated
    code, err = run_cli(capsys, ["build", "--gpu", "ada", "--onnx", out, "--out", tmp_path, "--portable"])
    assert_user_error(code, err, "TensorRT-RTX engines already run on every compute capability of their target")
    result = build_bundle(out, tmp_path, BuildConfig(target=GpuTarget.ADA, backend=Backend.TENSORRT_RTX,
                                                     components=("vae_decoder",)))
    runtime = result.manifest.data["runtime"]
    assert runtime["backend"] == "tensorrt-rtx" and runtime["version_compatible"] is False
    assert runtime["runs_on"] == [f"tensorrt_rtx_bindings {runtime['version']}"]
    from sd35trt.core.portability import bundle_fit

    host = {"compute_capability": "8.9", "runtimes": {"tensorrt_rtx_bindings": runtime["version"]}}
    assert bundle_fit(result.manifest, host) == (True, f"runs on tensorrt_rtx_bindings {runtime['version']}")
    assert bundle_fit(result.manifest, {**host, "compute_capability": "9.0"})[0] is False
