"""Hostile inputs through the real entry point: every one ends in exit code 2, one `error:` line (the last
line on stderr), no traceback, and artifacts that existed before are byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from sd35trt.cli.main import main
from tests.conftest import needs_rtx


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, match: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert match.lower() in lines[-1].lower(), lines[-1]


@pytest.fixture()
def prompts_dir(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("a café\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02prompt\n")
    (tmp_path / "two.txt").write_text("one prompt\nanother prompt\n")
    (tmp_path / "bad.toml").write_text("[transformer\nexclude = [")
    (tmp_path / "unknown.toml").write_text('[unet]\nexclude = ["x"]\n')
    (tmp_path / "typo.toml").write_text('[transformer]\nexclude = ["proj_outt"]\n')
    (tmp_path / "a_file").write_text("x")
    return tmp_path


def _model_dir(tmp_path: Path, *, folders=True, index="{}") -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "model_index.json").write_text(index)
    if folders:
        for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "tokenizer",
                     "tokenizer_2", "tokenizer_3", "scheduler"):
            (root / name).mkdir()
    return root


EXPORT_CASES = [
    (["--model", "sdxl"], "unknown model 'sdxl'"),
    (["--components", "transformer,unet"], "unknown component(s) unet"),
    (["--height", "1000"], "not divisible by 16"),
    (["--height", "4096"], "outside"),
    (["--width", "abc:def"], "not N, MIN:MAX"),
    (["--height", "1024:512"], "not ordered"),
    (["--batch", "0:1:4"], "--batch"),
    (["--batch", "1:1:64"], "outside 1..16"),
    (["--opset", "9"], "--opset 9"),
    (["--opset", "abc"], "--opset"),
    (["--t5-tokens", "300"], "--t5-tokens"),
    (["--precision", "fp64"], "--precision 'fp64'"),
    (["--precision", "fp8"], "no FP8 calibration"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--provider", "tensorrt"], "--provider 'tensorrt'"),
    (["--no-such-option"], "no such option"),
]


@pytest.mark.parametrize("args,match", EXPORT_CASES, ids=[" ".join(a) for a, _ in EXPORT_CASES])
def test_export_bad_options(capsys, tmp_path, args, match):
    code, err = run_cli(capsys, ["export", "--out", tmp_path / "out", *args])
    assert_user_error(code, err, match)
    assert not (tmp_path / "out" / "onnx").exists()


def test_export_cuda_without_gpu(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    code, err = run_cli(capsys, ["export", "--out", tmp_path, "--device", "cuda", "--components", "clip_l"])
    assert_user_error(code, err, "sees no CUDA GPU")


def test_provider_cuda_without_cuda_ep(capsys, calibrated, tmp_path):
    """--provider cuda needs onnxruntime-gpu and a GPU: refused before any export or session, in one line."""
    from sd35trt.core.onnx_utils import _cuda_ep_usable

    why = _cuda_ep_usable()
    if why is None:
        pytest.skip("onnxruntime's CUDA execution provider runs on this host")
    code, err = run_cli(capsys, ["export", "--out", tmp_path / "o", "--provider", "cuda", "--components", "clip_l"])
    assert_user_error(code, err, "--provider cuda cannot run")
    assert not (tmp_path / "o" / "onnx").exists()
    out, _ = calibrated
    for command in (["generate", "--prompt", "x", "--out", tmp_path / "x.png"], ["bench"],
                    ["compare", "--out", tmp_path / "cmp"]):
        code, err = run_cli(capsys, [*command, "--onnx", out, "--provider", "cuda"])
        assert_user_error(code, err, why)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "cmp" / "compare.json").exists()


def test_export_model_paths(capsys, tmp_path, prompts_dir):
    code, err = run_cli(capsys, ["export", "--model", prompts_dir / "a_file", "--out", tmp_path / "o"])
    assert_user_error(code, err, "not a directory")
    code, err = run_cli(capsys, ["export", "--model", prompts_dir, "--out", tmp_path / "o"])
    assert_user_error(code, err, "model_index.json is missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text("{}")
    (partial / "transformer").mkdir()
    code, err = run_cli(capsys, ["export", "--model", partial, "--out", tmp_path / "o"])
    assert_user_error(code, err, "lacks component folder")
    broken = _model_dir(tmp_path, index="{not json")
    code, err = run_cli(capsys, ["export", "--model", broken, "--out", tmp_path / "o", "--components", "clip_l"])
    assert_user_error(code, err, "model_index.json is not valid JSON")  # found when the model is named, before loading


def test_export_unwritable_out(capsys, prompts_dir):
    code, err = run_cli(capsys, ["export", "--out", prompts_dir / "a_file", "--components", "clip_l"])
    assert_user_error(code, err, "output")
    code, err = run_cli(capsys, ["export", "--out", prompts_dir / "a_file" / "sub", "--components", "clip_l"])
    assert_user_error(code, err, "a_file is a file, not a directory")


def test_a_refused_build_leaves_no_empty_out_folder(capsys, tmp_path):
    (tmp_path / "nothing").mkdir()
    code, err = run_cli(capsys, ["build", "--onnx", tmp_path / "nothing", "--out", tmp_path / "engines"])
    assert_user_error(code, err, f"no exported ONNX found ({tmp_path / 'nothing'}): run `sd35trt calibrate --out")
    assert not (tmp_path / "engines").exists()
    if os.geteuid() != 0:  # root ignores permission bits
        locked = prompts_dir / "locked"
        locked.mkdir(mode=0o500)
        code, err = run_cli(capsys, ["export", "--out", locked, "--components", "clip_l"])
        assert_user_error(code, err, "not writable")


CALIBRATE_CASES = [
    (lambda d: ["--prompts", d / "missing.txt"], "prompts file not found"),
    (lambda d: ["--prompts", d], "not a file"),
    (lambda d: ["--prompts", d / "empty.txt"], "prompts file is empty"),
    (lambda d: ["--prompts", d / "latin1.txt"], "not UTF-8 (line 1"),
    (lambda d: ["--prompts", d / "binary.txt"], "binary"),
    (lambda d: ["--prompts", d / "two.txt", "--num-prompts", "8"], "has 2 prompts, 10 needed"),
    (lambda d: ["--steps", "0"], "--steps 0"),
    (lambda d: ["--steps", "-3"], "--steps -3"),
    (lambda d: ["--num-prompts", "0"], "--num-prompts 0"),
    (lambda d: ["--guidance", "nan"], "--guidance nan"),
    (lambda d: ["--config", d / "missing.toml"], "FP8 recipe not found"),
    (lambda d: ["--config", d / "bad.toml"], "not valid TOML"),
    (lambda d: ["--config", d / "unknown.toml"], "unknown key(s) unet"),
    (lambda d: ["--components", "vae_decoder"], "not supported by --components"),
    (lambda d: ["--dtype", "fp64"], "--dtype 'fp64'"),
    (lambda d: ["--height", "520"], "not divisible by 16"),
]


@pytest.mark.parametrize("make_args,match", CALIBRATE_CASES, ids=[m for _, m in CALIBRATE_CASES])
def test_calibrate_bad_inputs(capsys, prompts_dir, tmp_path, make_args, match):
    code, err = run_cli(capsys, ["calibrate", "--out", tmp_path / "w", *make_args(prompts_dir)])
    assert_user_error(code, err, match)
    assert not (tmp_path / "w" / "calibration").exists()


def test_calibrate_recipe_typo_fails_before_any_export(capsys, prompts_dir, tmp_path):
    code, err = run_cli(capsys, ["calibrate", "--out", tmp_path / "w", "--config", prompts_dir / "typo.toml",
                                 "--num-prompts", "2", "--steps", "1", "--height", "512", "--width", "512"])
    assert_user_error(code, err, "'proj_outt' matches no module")
    assert not (tmp_path / "w" / "onnx-fp16").exists()


BUILD_CASES = [
    (["--gpu", "voodoo"], "unknown GPU target 'voodoo'"),
    (["--backend", "directml"], "unknown backend 'directml'"),
    (["--precision", "int4"], "no int4 ONNX for transformer"),
    (["--precision", "fp8", "--gpu", "ampere"], "runs no FP8 GEMM"),
    (["--precision", "fp8", "--gpu", "turing"], "runs no FP8 GEMM"),
    (["--components", "unet"], "unknown component"),
]


@pytest.mark.parametrize("args,match", BUILD_CASES, ids=[m for _, m in BUILD_CASES])
def test_build_bad_options(capsys, calibrated, tmp_path, args, match):
    out, _ = calibrated
    code, err = run_cli(capsys, ["build", "--onnx", out, "--out", tmp_path, *args])
    assert_user_error(code, err, match)


@needs_rtx
def test_build_bad_artifacts_keep_previous_bundle(capsys, work_copy, tmp_path):
    engines = tmp_path / "engines"
    assert run_cli(capsys, ["build", "--onnx", work_copy, "--out", engines, "--components", "clip_l,t5"])[0] == 0
    before = tree_digest(engines)
    fp16 = work_copy / "onnx-fp16"

    code, err = run_cli(capsys, ["build", "--onnx", tmp_path / "nowhere", "--out", engines])
    assert_user_error(code, err, "ONNX directory not found")
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, ["build", "--onnx", tmp_path / "empty", "--out", engines])
    assert_user_error(code, err, "no exported ONNX found")

    # ONNX bytes changed after export: refused by sha256, naming the file
    model = fp16 / "t5" / "model.onnx"
    original = model.read_bytes()
    model.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    code, err = run_cli(capsys, ["build", "--onnx", work_copy, "--out", engines, "--components", "clip_l,t5", "--force"])
    assert_user_error(code, err, "sha256 differs")
    assert str(model) in err

    # truncated ONNX whose manifest was "fixed" to match: the parser refuses it
    from sd35trt.core.artifacts import sha256_file

    model.write_bytes(original[: len(original) // 2])
    manifest = json.loads((fp16 / "t5" / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256_file(model), "bytes": model.stat().st_size}
    (fp16 / "t5" / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, ["build", "--onnx", work_copy, "--out", engines, "--components", "t5", "--force"])
    assert_user_error(code, err, "cannot parse the ONNX")

    (fp16 / "clip_l" / "manifest.json").write_text("{ truncated")
    code, err = run_cli(capsys, ["build", "--onnx", work_copy, "--out", engines, "--components", "clip_l"])
    assert_user_error(code, err, "not valid JSON")

    manifest = json.loads((work_copy / "onnx" / "clip_g" / "manifest.json").read_text())
    manifest["component"] = "clip_l"
    (work_copy / "onnx" / "clip_g" / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, ["build", "--onnx", work_copy, "--out", engines, "--components", "clip_g"])
    assert_user_error(code, err, "expected clip_g/fp32")

    untouched = ["--components", "transformer"]
    code, err = run_cli(capsys, ["build", "--onnx", work_copy, "--out", engines, "--gpu", "hopper", *untouched])
    assert_user_error(code, err, "no backend here can build hopper")
    code, err = run_cli(capsys, ["build", "--onnx", work_copy, "--out", engines, "--backend", "tensorrt", *untouched])
    assert_user_error(code, err, "tensorrt backend is not installed")
    assert tree_digest(engines) == before, "a failed build must leave the previous bundle untouched"


@needs_rtx
def test_bundle_verify_and_doctor_bad_inputs(capsys, calibrated, tmp_path):
    out, _ = calibrated
    engines = tmp_path / "engines"
    assert run_cli(capsys, ["build", "--onnx", out, "--out", engines, "--components", "clip_l"])[0] == 0
    bundle = engines / "tiny" / "ada-tensorrt-rtx"

    code, err = run_cli(capsys, ["bundle", "verify", tmp_path / "nothing"])
    assert_user_error(code, err, "bundle manifest not found")
    plan = bundle / "clip_l.plan"
    good = plan.read_bytes()
    plan.write_bytes(good[:100])
    code, err = run_cli(capsys, ["bundle", "verify", bundle])
    assert_user_error(code, err, "truncated or replaced")
    plan.write_bytes(good[:-1] + b"X")
    code, err = run_cli(capsys, ["bundle", "verify", bundle])
    assert_user_error(code, err, "sha256 differs")
    plan.write_bytes(good)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "kind": "onnx"}))
    code, err = run_cli(capsys, ["bundle", "verify", bundle])
    assert_user_error(code, err, "not an engine bundle manifest")
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "components": {"clip_l": {"file": "clip_l.plan"}}}))
    code, err = run_cli(capsys, ["bundle", "verify", bundle])
    assert_user_error(code, err, "lacks 'components.clip_l.sha256'")
    (bundle / "manifest.json").write_text("\x00\x01binary")
    code, err = run_cli(capsys, ["bundle", "verify", bundle])
    assert_user_error(code, err, "not valid JSON")

    code, err = run_cli(capsys, ["doctor", tmp_path / "nothing"])
    assert_user_error(code, err, "bundle folder not found")
    code, err = run_cli(capsys, ["doctor", tmp_path])
    assert_user_error(code, err, "no bundle manifest found")


GENERATE_CASES = [
    (["--torch", "--steps", "0"], "--steps 0"),
    (["--torch", "--guidance", "nan"], "--guidance nan"),
    (["--torch", "--guidance", "-1"], "--guidance -1"),
    (["--torch", "--height", "1000"], "try 1024"),
    (["--torch", "--batch", "0"], "--batch 0"),
    (["--torch", "--onnx", "."], "exactly one of"),
    ([], "exactly one of"),
    (["--torch", "--out", "image.jpg"], "must end in .png"),
    (["--onnx", "/nonexistent/dir"], "ONNX directory not found"),
    (["--torch", "--dtype", "int8"], "--dtype 'int8'"),
]


@pytest.mark.parametrize("args,match", GENERATE_CASES, ids=[m for _, m in GENERATE_CASES])
def test_generate_bad_inputs(capsys, tmp_path, args, match):
    out = [] if "--out" in args else ["--out", tmp_path / "x.png"]
    code, err = run_cli(capsys, ["generate", "--prompt", "a cat", *out, *args])
    assert_user_error(code, err, match)
    assert not (tmp_path / "x.png").exists()


def test_generate_against_artifacts(capsys, calibrated, tmp_path):
    out, _ = calibrated
    code, err = run_cli(capsys, ["generate", "--onnx", out, "--prompt", "x", "--height", "2048", "--width", "2048",
                                 "--out", tmp_path / "x.png"])
    assert_user_error(code, err, "outside the exported/engine shape ranges")
    code, err = run_cli(capsys, ["generate", "--onnx", out, "--model", "sd3.5-medium", "--prompt", "x",
                                 "--out", tmp_path / "x.png"])
    assert_user_error(code, err, "built from model 'tiny'")
    code, err = run_cli(capsys, ["generate", "--onnx", out, "--precision", "int3", "--prompt", "x",
                                 "--out", tmp_path / "x.png"])
    assert_user_error(code, err, "--precision 'int3'")
    for variant, hint in (("int8", "export --out"), ("int4", "calibrate --out")):  # FP16 everywhere is not what was asked
        code, err = run_cli(capsys, ["generate", "--onnx", out, "--precision", variant, "--prompt", "x",
                                     "--out", tmp_path / "x.png"])
        assert_user_error(code, err, f"no {variant} ONNX for any component")
        assert hint in err
    assert not (tmp_path / "x.png").exists()


@needs_rtx
def test_generate_bundle_on_host_without_gpu(capsys, calibrated, tmp_path):
    from sd35trt.core.host import local_compute_capability

    if local_compute_capability() is not None:
        pytest.skip("this host has a GPU")
    out, _ = calibrated
    assert run_cli(capsys, ["build", "--onnx", out, "--out", tmp_path, "--components", "clip_l"])[0] == 0
    bundle = tmp_path / "tiny" / "ada-tensorrt-rtx"
    code, err = run_cli(capsys, ["generate", "--bundle", bundle, "--prompt", "x", "--out", tmp_path / "x.png"])
    assert_user_error(code, err, "run the same loop on the bundle's ONNX instead: --onnx")
    code, err = run_cli(capsys, ["compare", "--bundle", bundle, "--out", tmp_path / "cmp"])
    assert_user_error(code, err, "cannot run on this host")
    code, err = run_cli(capsys, ["bench", "--bundle", bundle])
    assert_user_error(code, err, "cannot run on this host")


COMPARE_CASES = [
    (["--variants", "fp4"], "unknown variant(s) fp4"),
    (["--prompts", "0"], "must be ≥ 1"),
    (["--onnx", "/nonexistent"], "ONNX directory not found"),
]


@pytest.mark.parametrize("args,match", COMPARE_CASES, ids=[m for _, m in COMPARE_CASES])
def test_compare_bad_inputs(capsys, tmp_path, args, match):
    onnx = [] if "--onnx" in args else ["--onnx", tmp_path]
    code, err = run_cli(capsys, ["compare", "--out", tmp_path / "cmp", *onnx, *args])
    assert_user_error(code, err, match)


def test_compare_needs_exactly_one_source(capsys, tmp_path):
    code, err = run_cli(capsys, ["compare", "--out", tmp_path])
    assert_user_error(code, err, "exactly one of --onnx and --bundle")


def test_debug_env_shows_tracebacks(monkeypatch):
    from sd35trt.core.errors import Sd35TrtError

    monkeypatch.setenv("SD35TRT_DEBUG", "1")
    with pytest.raises(Sd35TrtError):
        main(["export", "--model", "sdxl"])


# --- path tricks: these must work, and must not damage what is there ---------------------------------


def test_paths_with_spaces_symlinks_and_relative(capsys, tmp_path, monkeypatch):
    spaced = tmp_path / "dir with spaces" / "out"
    assert run_cli(capsys, ["export", "--out", spaced, "--components", "clip_l"])[0] == 0
    assert (spaced / "onnx-fp16" / "clip_l" / "model.onnx").is_file()
    link = tmp_path / "link"
    link.symlink_to(spaced, target_is_directory=True)
    before = tree_digest(spaced)
    assert run_cli(capsys, ["export", "--out", link, "--components", "clip_l"])[0] == 0  # same inputs: skipped
    assert tree_digest(spaced) == before
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, ["export", "--out", "dir with spaces/out", "--components", "clip_l"])[0] == 0
    assert tree_digest(spaced) == before


@needs_rtx
def test_build_output_inside_its_input_dir(capsys, work_copy):
    before = {k: v for k, v in tree_digest(work_copy).items() if k.startswith("onnx")}
    assert run_cli(capsys, ["build", "--onnx", work_copy, "--out", work_copy, "--components", "clip_l"])[0] == 0
    after = {k: v for k, v in tree_digest(work_copy).items() if k.startswith("onnx")}
    assert after == before and (work_copy / "tiny" / "ada-tensorrt-rtx" / "clip_l.plan").is_file()


@needs_rtx
def test_plan_write_failure_keeps_previous_bundle(capsys, calibrated, tmp_path):
    """The builder process cannot write its plan (here: a 1 MB file-size limit, inherited by the child that
    builds): one line, exit 2, and the previous bundle is untouched."""
    import resource

    out, _ = calibrated
    engines = tmp_path / "engines"
    assert run_cli(capsys, ["build", "--onnx", out, "--out", engines, "--components", "clip_l"])[0] == 0
    before = tree_digest(engines)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        code, err = run_cli(capsys, ["build", "--onnx", out, "--out", engines, "--components", "clip_l", "--force"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_user_error(code, err, "file too large")
    assert tree_digest(engines) == before
    assert not list((engines / "tiny").glob(".*tmp-*"))


def test_library_prints_go_to_stderr_and_results_stay_on_stdout(capsys, monkeypatch):
    """ModelOpt prints "Loading extension modelopt_cuda_ext_fp8..." when its CUDA kernels load (seen on the GPU
    machine in the middle of `selftest --json`): while a command runs only its results reach stdout."""
    import json

    import sd35trt.checks.doctor as doctor

    real = doctor.diagnose

    def noisy(path):
        print("Loading extension modelopt_cuda_ext_fp8...")
        return real(path)

    monkeypatch.setattr(doctor, "diagnose", noisy)
    from sd35trt.cli.main import main

    assert main(["doctor"]) == 0
    captured = capsys.readouterr()
    assert "host" in json.loads(captured.out)
    assert "Loading extension" in captured.err
    assert main(["--help"]) == 0 and "Usage" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [(["GPU=foo"], "unknown GPU target 'foo'"),
                                          (["MODEL=/nonexistent"], "no such model directory '/nonexistent'"),
                                          (["T5=0", "QUANTIZE=transformer,t5"], "QUANTIZE=... names t5 but T5=0"),
                                          (["BATCH=1:x:1"], "--batch '1:x:1' is not N, MIN:MAX or MIN:OPT:MAX"),
                                          (["DEVICE=gpu"], "--device 'gpu' is not one of auto, cpu, cuda")])
def test_make_engines_refuses_bad_options_before_any_step(tmp_path, args, message):
    """`make engines` runs preflight first: a bad target or model is one line before calibrate starts."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run(["make", "engines", *args, "SYSTEM_PYTHON=1", f"PYTHON={sys.executable}",
                           f"WORK={tmp_path / 'work'}", f"ENGINES={tmp_path / 'engines'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert " calibrate " not in done.stdout and not (tmp_path / "work").exists(), "nothing ran after the check"


def test_cuda_out_of_memory_is_one_line_naming_what_holds_the_gpu():
    """torch's message from a real out-of-memory (round 17 on the H200: a Large export while two other runs held
    the card) becomes one line: what was asked, what was free, who holds the rest, what to do."""
    from sd35trt.cli.main import gpu_oom_line

    log = Path(__file__).resolve().parent.parent / "bench/results/2026-12-05-h200-r17/make-sd3.5-large-int4-clip-fit.log"
    message = next(line for line in log.read_text().splitlines() if line.startswith("torch.OutOfMemoryError"))
    line = gpu_oom_line(message.split(": ", 1)[1])
    assert line == ("CUDA out of memory: 92.00 MiB asked with 31.94 MiB free of 139.80 GiB; this process holds 55.20 GiB, "
                    "other processes 84.5 GiB: free the GPU of the other processes (84.5 GiB) or run the step on the CPU "
                    "(--device cpu; make engines DEVICE=cpu; slower)")
    assert gpu_oom_line("CUDA error: an illegal memory access was encountered") is None  # not torch's OOM: a bug
