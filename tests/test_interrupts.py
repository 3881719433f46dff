"""Kill real export / calibrate / build processes mid-step: previous artifacts stay byte-for-byte intact,
no half file appears under a final name, and the re-run completes, reusing what was finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CALIB, REPO, needs_rtx
from tests.test_bad_inputs import tree_digest

CALIB_ARGS = ["--num-prompts", str(CALIB["num_prompts"]), "--steps", str(CALIB["steps"]), "--height", str(CALIB["height"]),
              "--width", str(CALIB["width"]), "--calib-batch", str(CALIB["batch"]), "--holdout", str(CALIB["holdout"])]


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "sd35trt", *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def kill_when(argv: list[str], ready, sig=signal.SIGKILL, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Start ``argv``; as soon as ``ready(stderr_so_far)`` is true, send ``sig``. Fails if the process ends first."""
    import threading

    # Ctrl-C's default disposition in the child, as in a user's terminal: a shell that started this test run in
    # the background (no job control) leaves SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            reader.join(5)
            pytest.fail(f"process ended (rc {proc.returncode}) before the kill point: {''.join(err_lines)[-2000:]}")
        if ready("".join(err_lines)):
            proc.send_signal(sig)
            proc.wait(timeout=120)
            reader.join(10)
            return subprocess.CompletedProcess(argv, proc.returncode, proc.stdout.read(), "".join(err_lines))
        time.sleep(0.05)
    proc.kill()
    pytest.fail("kill point never reached")


def temp_dirs(parent: Path, name: str) -> list[Path]:
    return list(parent.glob(f".{name}.tmp-*"))


def finals_only(root: Path) -> dict[str, str]:
    """Digest of every file that is not inside a temp folder (what consumers see)."""
    return {k: v for k, v in tree_digest(root).items() if ".tmp-" not in k and "/." not in "/" + k}


def test_export_killed_mid_write_keeps_previous_and_resumes(work_copy):
    before = finals_only(work_copy / "onnx")
    onnx = work_copy / "onnx"
    result = kill_when(cli("export", "--out", work_copy, "--components", "clip_l,vae_decoder", "--precision", "fp32",
                           "--force"),
                       lambda _err: any((d / "model.onnx").exists() for d in temp_dirs(onnx, "vae_decoder")))
    assert result.returncode == -signal.SIGKILL
    after = finals_only(onnx)
    assert after["vae_decoder/model.onnx"] == before["vae_decoder/model.onnx"], "previous ONNX untouched"
    assert set(after) == set(before), "no half file under a final name"
    resumed = subprocess.run(cli("export", "--out", work_copy, "--precision", "fp32"), env=env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "unchanged, skipped" in resumed.stderr
    assert not temp_dirs(onnx, "vae_decoder"), "the re-run removed the killed run's temp folder"
    assert finals_only(onnx)["vae_decoder/model.onnx"] == before["vae_decoder/model.onnx"]


def test_export_sigint_cleans_up(work_copy):
    onnx = work_copy / "onnx"
    before = finals_only(onnx)
    result = kill_when(cli("export", "--out", work_copy, "--components", "vae_decoder", "--precision", "fp32", "--force"),
                       lambda err: "→ export vae_decoder" in err and bool(temp_dirs(onnx, "vae_decoder")),
                       sig=signal.SIGINT)
    assert result.returncode == 130 and "interrupted" in result.stderr
    assert "Traceback" not in result.stderr
    assert not temp_dirs(onnx, "vae_decoder") and finals_only(onnx) == before


def test_calibrate_killed_keeps_previous_state_and_resumes(work_copy):
    before = finals_only(work_copy)
    result = kill_when(cli("calibrate", "--out", work_copy, *CALIB_ARGS, "--force"),
                       lambda err: "→ calibrate transformer" in err)  # mid-calibration: the long part
    assert result.returncode == -signal.SIGKILL
    after = finals_only(work_copy)
    for key in ("calibration/scales.json", "calibration/manifest.json", "calibration/quant_state.pt",
                "onnx-fp8/transformer/model.onnx"):
        assert after[key] == before[key], key
    resumed = subprocess.run(cli("calibrate", "--out", work_copy, *CALIB_ARGS), env=env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert finals_only(work_copy)["calibration/scales.json"] == before["calibration/scales.json"]


@needs_rtx
def test_build_killed_keeps_previous_bundle_and_resumes(work_copy, tmp_path):
    engines = tmp_path / "engines"
    first = subprocess.run(cli("build", "--onnx", work_copy, "--out", engines), env=env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    bundle_parent = engines / "tiny"
    before = finals_only(engines)
    result = kill_when(cli("build", "--onnx", work_copy, "--out", engines, "--force"),
                       lambda _err: any(list(d.glob("*.plan")) for d in temp_dirs(bundle_parent, "ada-tensorrt-rtx")))
    assert result.returncode == -signal.SIGKILL
    assert finals_only(engines) == before
    resumed = subprocess.run(cli("build", "--onnx", work_copy, "--out", engines), env=env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0 and "up to date" in resumed.stderr
    assert not temp_dirs(bundle_parent, "ada-tensorrt-rtx")
    verify = subprocess.run(cli("bundle", "verify", bundle_parent / "ada-tensorrt-rtx"), env=env(),
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
