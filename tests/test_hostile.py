"""Hostile but realistic inputs (#32), by class: output options that would clobber files, the bundle as a trust
boundary (paths out of the bundle, manifests of the wrong shape), numbers out of range, operating-system errors,
non-finite results, and checks that were missing or misleading. The contract for every one: one line naming what,
where and what to do, a non-zero exit, no traceback, and nothing already built lost or half-overwritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_rtx
from tests.test_bad_inputs import assert_user_error, run_cli


@pytest.fixture(scope="module")
def bundle(calibrated, tmp_path_factory):
    """A real tiny bundle (TensorRT-RTX, SM89) of two engines, copied per test that edits it."""
    from sd35trt.producers.bundle import BuildConfig, build_bundle

    out, _ = calibrated
    return build_bundle(out, tmp_path_factory.mktemp("engines"), BuildConfig(components=("clip_l", "clip_g"))).folder


@pytest.fixture()
def bundle_copy(bundle, tmp_path):
    dest = tmp_path / "engines" / "tiny" / "ada-tensorrt-rtx"
    shutil.copytree(bundle, dest)
    return dest


def edit_manifest(folder, change):
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))


# --- data loss: an output option never clobbers a file that is not a previous output of the same kind -----------

@needs_rtx
@pytest.mark.parametrize("option", ["--save", "--csv"])
def test_bench_outputs_never_overwrite_a_file_of_another_kind(option, bundle_copy, exported, capsys):
    out, _ = exported
    manifest = bundle_copy / "manifest.json"
    before = manifest.read_bytes()
    code, err = run_cli(capsys, ["bench", "--onnx", out, "--steps", "1", "--images", "1", "--loop-steps", "1",
                                 "--height", "512", "--width", "512", "--no-sample", option, manifest])
    assert_user_error(code, err, "is not a bench")
    assert manifest.read_bytes() == before


def test_bench_appends_to_its_own_csv_and_replaces_its_own_report(exported, capsys, tmp_path):
    out, _ = exported
    args = ["bench", "--onnx", out, "--steps", "1", "--images", "1", "--loop-steps", "1", "--height", "512",
            "--width", "512", "--no-sample", "--save", tmp_path / "r.json", "--csv", tmp_path / "r.csv"]
    assert run_cli(capsys, args)[0] == 0 and run_cli(capsys, args)[0] == 0
    assert json.loads((tmp_path / "r.json").read_text())["kind"] == "bench"
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 3, "one header, a row per run"


def test_compare_out_that_is_a_file_is_refused_before_any_work(exported, capsys, tmp_path):
    out, _ = exported
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, err = run_cli(capsys, ["compare", "--onnx", out, "--out", target])
    assert_user_error(code, err, "not a directory")
    assert target.read_text() == "mine"


# --- the bundle is a trust boundary ------------------------------------------------------------------------------

OUTSIDE = [
    ("../../../../etc/passwd", "outside its folder"),
    ("/etc/passwd", "outside its folder"),
    ("~/clip_l.plan", "outside its folder"),
]


@needs_rtx
@pytest.mark.parametrize(("path", "match"), OUTSIDE, ids=["dotdot", "absolute", "home"])
@pytest.mark.parametrize("command", ["verify", "doctor", "generate"])
def test_a_manifest_cannot_name_files_outside_its_bundle(bundle_copy, capsys, tmp_path, path, match, command):
    import hashlib

    target = "/etc/passwd"
    digest, size = hashlib.sha256(open(target, "rb").read()).hexdigest(), os.path.getsize(target)

    def point_out(data):
        data["components"]["clip_l"].update(file=path, sha256=digest, bytes=size)

    edit_manifest(bundle_copy, point_out)
    code, err = run_cli(capsys, _command(command, bundle_copy, tmp_path))
    assert_user_error(code, err, match)


@needs_rtx
@pytest.mark.parametrize("command", ["verify", "doctor", "generate"])
def test_a_symbolic_link_out_of_the_bundle_is_refused(bundle_copy, capsys, tmp_path, command):
    plan = bundle_copy / "clip_l.plan"
    outside = tmp_path / "elsewhere.plan"
    shutil.move(plan, outside)
    plan.symlink_to(outside)
    code, err = run_cli(capsys, _command(command, bundle_copy, tmp_path))
    assert_user_error(code, err, "leads outside its folder")


def _command(command, folder, tmp_path):
    return {"verify": ["bundle", "verify", folder], "doctor": ["doctor", folder],
            "generate": ["generate", "--bundle", folder, "--prompt", "x", "--out", tmp_path / "x.png"]}[command]


WRONG_SHAPES = [
    (lambda d: d["components"].__setitem__("clip_l", None), "components.clip_l is NoneType"),
    (lambda d: d.__setitem__("compute_capabilities", 12), "compute_capabilities is int"),
    (lambda d: d["components"]["clip_l"].__setitem__("bytes", "abc"), "components.clip_l.bytes is str"),
    (lambda d: d["components"]["clip_l"].__setitem__("bytes", -5), "is negative"),
    (lambda d: d["components"]["clip_l"].__setitem__("sha256", "00"), "is not a sha256 digest"),
    (lambda d: d.__setitem__("manifest_version", 99), "manifest_version 99 is not one this sd35trt reads"),
    (lambda d: d.__setitem__("manifest_version", "2"), "manifest_version '2' is not one"),
    (lambda d: d["components"].__setitem__("unet", {}), "unknown component 'unet'"),
    (lambda d: d.__setitem__("components", []), "components is list"),
    (lambda d: d["components"]["clip_l"].__setitem__("precision", "int3"), "precision 'int3'"),
    (lambda d: d["components"]["clip_l"].__setitem__("file", ["a"]), "components.clip_l.file is list"),
    (lambda d: d.__setitem__("assets", {"x": {"sha256": 1}}), "assets.x.sha256 is int"),
]


@needs_rtx
@pytest.mark.parametrize(("change", "match"), WRONG_SHAPES, ids=[m for _, m in WRONG_SHAPES])
def test_a_manifest_of_the_wrong_shape_is_one_line_in_every_command(bundle_copy, capsys, tmp_path, change, match):
    edit_manifest(bundle_copy, change)
    for command in ("verify", "doctor", "generate"):
        code, err = run_cli(capsys, _command(command, bundle_copy, tmp_path))
        assert_user_error(code, err, match)


@needs_rtx
def test_absurd_manifests_deep_or_huge_are_one_line(bundle_copy, capsys, tmp_path):
    (bundle_copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_cli(capsys, ["bundle", "verify", bundle_copy])
    assert_user_error(code, err, "nested too deeply")
    with open(bundle_copy / "manifest.json", "wb") as handle:
        handle.truncate(80 << 20)
    code, err = run_cli(capsys, ["doctor", bundle_copy])
    assert_user_error(code, err, "not a manifest")


@needs_rtx
def test_build_refuses_an_onnx_manifest_naming_files_outside_the_work_dir(work_copy, capsys, tmp_path):
    from sd35trt.core.artifacts import sha256_file

    engines = tmp_path / "engines"
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    folder = work_copy / "onnx-fp16" / "clip_l"
    data = json.loads((folder / "manifest.json").read_text())
    data["files"]["../../../secret.bin"] = {"sha256": sha256_file(secret), "bytes": secret.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(data))
    code, err = run_cli(capsys, ["build", "--onnx", work_copy, "--out", engines, "--components", "clip_l"])
    assert_user_error(code, err, "outside its folder")


@needs_rtx
def test_doctor_on_a_good_bundle_is_not_failed_by_a_broken_sibling(bundle_copy, capsys):
    sibling = bundle_copy.parent / "ampere-tensorrt-rtx"
    shutil.copytree(bundle_copy, sibling)
    (sibling / "manifest.json").write_text("{ broken")
    code, err = run_cli(capsys, ["doctor", bundle_copy])
    assert code in (0, 3) and "Traceback" not in err, err  # the report (exit 3: no GPU here), not an error


# --- numbers out of range ----------------------------------------------------------------------------------------

NUMBERS = [
    (["generate", "--torch", "--prompt", "x", "--seed", str(2**64)], "--seed"),
    (["generate", "--torch", "--prompt", "x", "--seed", "-1"], "--seed"),
    (["generate", "--torch", "--prompt", "x", "--vram", "nan"], "--vram nan"),
    (["generate", "--torch", "--prompt", "x", "--vram", "inf"], "--vram inf"),
    (["generate", "--torch", "--prompt", "x", "--vram", "-2"], "--vram -2"),
    (["generate", "--torch", "--prompt", "x", "--guidance", "1e308"], "--guidance"),
    (["generate", "--torch", "--prompt", "x", "--guidance", "inf"], "--guidance"),
    (["generate", "--torch", "--prompt", "x", "--steps", "100000"], "--steps"),
    (["generate", "--torch", "--prompt", "x", "--batch", "100000"], "--batch"),
    (["calibrate", "--seed", str(2**70), "--out", "OUT"], "--seed"),
    (["compare", "--onnx", "OUT", "--seed", str(2**70)], "--seed"),
    (["calibrate", "--holdout", "100000", "--out", "OUT"], "--holdout"),
    (["bench", "--torch", "--vram", "nan"], "--vram nan"),
    (["doctor", "--vram", "nan"], "--vram nan"),
]


@pytest.mark.parametrize(("argv", "match"), NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in NUMBERS])
def test_numbers_out_of_range_are_one_line(argv, match, capsys, tmp_path):
    code, err = run_cli(capsys, [str(tmp_path / "w") if a == "OUT" else a for a in argv])
    assert_user_error(code, err, match)


# --- operating-system errors on paths the user gave: one line naming the file, the temp files gone ---------------

def test_os_errors_on_output_paths_are_one_line_before_any_work(capsys, tmp_path):
    folder = tmp_path / "x.png"
    folder.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    cases = [
        (["--out", folder], "is a folder"),
        (["--out", tmp_path / ("n" * 300 + ".png")], "too long"),
        (["--out", a_file / "x.png"], "not a directory"),
        (["--out", loop / "x.png"], "loop"),
    ]
    for extra, match in cases:
        code, err = run_cli(capsys, ["generate", "--torch", "--prompt", "x", "--steps", "1", *extra])
        assert_user_error(code, err, match)


def test_a_full_disk_while_writing_the_image_names_it_and_leaves_no_temp_file(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk (the write fails with EFBIG; Python ignores SIGXFSZ): one line naming
    the file, no 0-byte temp PNG left."""
    import resource

    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (40000, resource.RLIM_INFINITY)); "
            "from sd35trt.cli.main import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "generate", "--torch", "--prompt", "a koi", "--steps", "1",
                          "--height", "512", "--width", "512", "--out", str(tmp_path / "x.png")], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "SD35TRT_CACHE": str(tmp_path / "c")})
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "x.png" in run.stderr.strip().splitlines()[-1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".png", ".tmp"))], list(tmp_path.iterdir())
    assert resource.getrlimit(resource.RLIMIT_FSIZE)  # the limit was the child's alone


@needs_rtx
def test_a_python_error_inside_the_build_process_is_a_bug_not_a_builder_crash(calibrated, tmp_path):
    """A failure of sd35trt's own code in the builder's child process keeps its traceback (exit 1), where a dead
    builder (a signal) is the one-line "crashed" error."""
    from sd35trt.core.manifests import WorkDir
    from sd35trt.core.specs import Precision
    from sd35trt.producers.trt_builder import TensorRTRTXBackend, build_engine_isolated

    out, _ = calibrated
    onnx = WorkDir(out).onnx_path(Precision.FP16, "clip_l")
    with pytest.raises(RuntimeError, match="the build process failed inside sd35trt") as raised:
        build_engine_isolated(TensorRTRTXBackend(), onnx, {"input_ids": "not a profile"}, ((8, 9),), tmp_path / "x.plan")
    assert "Traceback" in str(raised.value)


def test_disk_full_inside_torch_save_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    import errno

    import torch

    from sd35trt.core.artifacts import save_torch

    def full(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2368 vs 2262; "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as raised:
        save_torch({"a": 1}, tmp_path / "state.pt")
    assert raised.value.errno in (errno.ENOSPC, errno.EIO) and raised.value.filename == str(tmp_path / "state.pt")


# --- garbage that exited 0 -----------------------------------------------------------------------------------------

def test_lora_files_and_scales_that_can_only_give_garbage_are_refused(adapter, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter))
    poisoned = tmp_path / "nan.safetensors"
    first = next(iter(tensors))
    tensors[first] = tensors[first] * float("nan")
    save_file(tensors, str(poisoned))
    for lora, match in ((f"{poisoned}", "NaN/Inf"), (f"{adapter}:nan", "LoRA scale nan"),
                        (f"{adapter}:1e400", "LoRA scale inf"), (f"{adapter}:abc", "LoRA scale 'abc' is not a number"),
                        (f"{adapter}:1e6", "LoRA scale 1e+06")):
        code, err = run_cli(capsys, ["preflight", "--lora", lora])
        assert_user_error(code, err, match)


def test_non_finite_latents_are_an_error_naming_the_likely_cause(capsys, tmp_path):
    """A model whose weights are NaN (a broken download or merge) gives NaN latents: an error, never a black PNG."""
    from tests.outliers import save_model

    model = save_model(tmp_path / "broken", lambda pipe: pipe.transformer.proj_out.weight.data.fill_(float("nan")))
    out = tmp_path / "x.png"
    code, err = run_cli(capsys, ["generate", "--torch", "--model", model, "--prompt", "x", "--steps", "1",
                                 "--height", "512", "--width", "512", "--out", out])
    assert_user_error(code, err, "NaN/Inf")
    assert "transformer" in err and not out.exists()


# --- checks that were missing or misleading -----------------------------------------------------------------------

def test_compare_with_other_weights_than_the_work_dir_is_the_fingerprint_error(exported, capsys, tmp_path):
    from tests.outliers import save_model

    out, _ = exported
    other = save_model(tmp_path / "other")
    code, err = run_cli(capsys, ["compare", "--onnx", out, "--model", other, "--out", tmp_path / "c"])
    assert_user_error(code, err, "fingerprints differ")


def test_preflight_catches_broken_and_foreign_model_directories(capsys, tmp_path):
    from tests.outliers import save_model

    model = save_model(tmp_path / "m")
    config = model / "transformer" / "config.json"
    good = config.read_text()
    config.write_text(good[: len(good) // 2])
    code, err = run_cli(capsys, ["preflight", "--model", model])
    assert_user_error(code, err, "transformer/config.json")
    config.write_text(good)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    code, err = run_cli(capsys, ["preflight", "--model", model])
    assert_user_error(code, err, "FluxPipeline")
    (model / "model_index.json").write_text(json.dumps(index))
    a_file = tmp_path / "work"
    a_file.write_text("")
    code, err = run_cli(capsys, ["preflight", "--model", model, "--work", a_file])
    assert_user_error(code, err, "--work")


def test_options_name_themselves_in_their_errors(capsys, tmp_path):
    code, err = run_cli(capsys, ["preflight", "--quantize", "transformer,;x"])
    assert_user_error(code, err, "--quantize")
    code, err = run_cli(capsys, ["preflight", "--int8", "clip_l,;x"])
    assert_user_error(code, err, "--int8")
    code, err = run_cli(capsys, ["calibrate", "--holdout", "100000", "--out", tmp_path / "w"])
    assert_user_error(code, err, "--holdout")
    code, err = run_cli(capsys, ["calibrate", "--holdout", "500", "--out", tmp_path / "w"])  # the file has 512
    assert_user_error(code, err, "--holdout 500")


def test_make_quotes_paths_with_spaces():
    dry = subprocess.run(["make", "-n", "engines", "MODEL=/data/my models/sd3.5", "WORK=/tmp/my work",
                          "SYSTEM_PYTHON=1"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert '--out "/tmp/my work"' in dry and '--model "/data/my models/sd3.5"' in dry
