import json

import pytest

from sd35trt.core.errors import CalibrationError, InvalidInputError
from sd35trt.producers.calibrate import CalibrationConfig, calibrate_model, calibrate_networks, read_prompts
from sd35trt.producers.recipe import Recipe
from tests.conftest import CALIB, REPO


def test_shipped_prompt_set():
    prompts = read_prompts(REPO / "calibration" / "prompts.txt", 512)
    assert len(prompts) >= 512 and len(set(prompts)) == len(prompts)
    lengths = [len(p.split()) for p in prompts]
    assert min(lengths) >= 3 and max(lengths) <= 70
    assert sum('"' in p for p in prompts) >= 20, "text-rendering prompts are part of the set"


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"\n  \n", "empty"),
    (b"a cat\n\xff\xfe broken\n", r"not UTF-8 \(line 2"),
    (b"a\x00b\n", "binary"),
    (b"one prompt\n", "has 1 prompts, 6 needed"),
])
def test_bad_prompt_files(tmp_path, content, match):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=match):
        read_prompts(path, 6)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        read_prompts(tmp_path / "nope.txt", 1)


def test_config_rejects_bad_numbers():
    with pytest.raises(InvalidInputError, match="--steps 0"):
        CalibrationConfig(steps=0)
    with pytest.raises(InvalidInputError, match="--guidance nan"):
        CalibrationConfig(guidance=float("nan"))
    with pytest.raises(InvalidInputError, match="cannot calibrate vae_decoder"):
        CalibrationConfig(components=("vae_decoder",))


def test_recipe_rejects_unknown_modules_and_syntax(tmp_path):
    from sd35trt.core.models import build_pipeline, resolve_model

    good = Recipe.load(REPO / "calibration" / "fp8.toml")
    assert "proj_out" in good.exclude["transformer"]
    bad = tmp_path / "fp8.toml"
    bad.write_text('[transformer]\nexclude = ["proj_outt"]\n')
    pipe = build_pipeline(resolve_model("tiny"), components={"transformer"})
    with pytest.raises(CalibrationError, match="'proj_outt' matches no module"):
        Recipe.load(bad).check_patterns("transformer", [n for n, _ in pipe.transformer.named_modules()])
    bad.write_text("[transformer\n")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        Recipe.load(bad)
    bad.write_text('format = "int8"\n')
    with pytest.raises(InvalidInputError, match="format 'int8'"):
        Recipe.load(bad)


def test_calibration_is_deterministic():
    """Same model, prompts, seed and recipe → byte-identical scales (fresh pipelines, two runs)."""
    from sd35trt.core.models import build_pipeline, resolve_model

    prompts = read_prompts(REPO / "calibration" / "prompts.txt", 4)[:4]
    cfg = CalibrationConfig(**CALIB)
    recipe = Recipe.load(REPO / "calibration" / "fp8.toml")
    runs = []
    for _ in range(2):
        pipe = build_pipeline(resolve_model("tiny"))
        pipe.set_progress_bar_config(disable=True)
        _, scales = calibrate_networks(pipe, cfg, recipe, prompts)
        runs.append(json.dumps({k: v.hex() for k, v in sorted(scales.items())}).encode())
    assert runs[0] == runs[1]
    assert len(json.loads(runs[0])) > 50


def test_calibration_state_and_report(calibrated):
    """calibrate writes its state only; the report holds the honest-reference numbers, census and islands."""
    import torch

    out, result = calibrated
    folder = out / "calibration"
    assert {p.name for p in folder.iterdir()} == {"scales.json", "quant_state.pt", "census.json", "traffic.pt",
                                                 "calibration.json", "manifest.json"}
    report = result.report
    assert "FP32 with TF32 off" in report["reference"] and report["config"]["compute_dtype"] == "fp32"
    fp8_stats = report["components"]["transformer"]["fp8"]["noise_pred"]
    assert fp8_stats["rel_l2_max"] <= 0.05, "tiny FP8 transformer ≤ 5% rel-L2 per step vs FP32"
    assert fp8_stats["nonfinite"] == 0
    assert report["fp32_islands"] == {c: [] for c in ("transformer", "clip_l", "clip_g", "t5", "vae_decoder")}
    assert all(v["precision"] == "fp16" and v["with_islands"]["passed"] for v in report["fp16"].values())
    assert report["end_to_end"]["image_psnr_db"] and min(report["end_to_end"]["image_psnr_db"]) > 20
    scales = json.loads((folder / "scales.json").read_text())
    assert len(scales) == report["quantizers"]["enabled"]
    census = json.loads((folder / "census.json").read_text())["components"]
    assert set(census) == {"transformer", "clip_l", "clip_g", "t5", "vae_decoder"}
    row = census["transformer"]["proj_out"]
    assert row["out"] > 0 and row["headroom"] == round(65504 / max(row["in"], row["out"]), 3)
    traffic = torch.load(folder / "traffic.pt", weights_only=True)
    assert len(traffic["transformer"]["calls"]) == len(traffic["transformer"]["reference"]) >= 2


def test_unchanged_calibration_is_skipped(calibrated, tiny_source):
    out, first = calibrated
    again = calibrate_model(tiny_source, out, CalibrationConfig(**CALIB), device="cpu")
    assert again.skipped and again.inputs_hash == first.inputs_hash
    changed = CalibrationConfig(**{**CALIB, "seed": 1})
    from sd35trt.producers.calibrate import calibration_inputs_hash

    prompts = read_prompts(changed.prompts_file, 6)
    recipe = Recipe.load(changed.recipe_file)
    assert calibration_inputs_hash(tiny_source, changed, prompts, recipe, "cpu") != first.inputs_hash
    assert calibration_inputs_hash(tiny_source, CalibrationConfig(**CALIB), prompts, recipe, "cuda") != first.inputs_hash


def test_a_recipe_edit_calibration_does_not_read_keeps_the_calibration(tmp_path):
    """A comment or ``weight_only`` (read by INT8 export only) leaves the calibration's digest; an exclude does not.
    INT8 export's digest per component changes with that component's excludes and ``weight_only`` only."""
    shipped = REPO / "calibration" / "fp8.toml"
    text = shipped.read_text()
    edited = tmp_path / "edited.toml"
    edited.write_text("# a note\n" + text.replace('weight_only = ["encoder.block.*.layer.1.DenseReluDense.wo"]', ""))
    assert Recipe.load(edited).sha256 != Recipe.load(shipped).sha256
    assert Recipe.load(edited).calibration_digest == Recipe.load(shipped).calibration_digest
    assert Recipe.load(edited).int8_digest("t5") != Recipe.load(shipped).int8_digest("t5")  # INT8 reads weight_only
    assert Recipe.load(edited).int8_digest("clip_g") == Recipe.load(shipped).int8_digest("clip_g")  # not CLIP-G's
    edited.write_text(text.replace('"proj_out",\n', ""))
    assert Recipe.load(edited).calibration_digest != Recipe.load(shipped).calibration_digest
    assert Recipe.load(edited).int8_digest("transformer") != Recipe.load(shipped).int8_digest("transformer")


def test_calibration_size_per_model_and_the_makefile_leaves_it_to_calibrate():
    """Tiny stays fast; real models calibrate on 32 prompts x 20 steps (Turbo on its 4); `make -n` passes no size
    (calibrate chooses it from the model, directories included) unless NUM_PROMPTS/STEPS/SIZE are set."""
    import subprocess

    from sd35trt.core.models import resolve_model
    from sd35trt.producers.calibrate import calibration_size

    for model, expected in (("tiny", (8, 4, 512)), ("sd3.5-medium", (32, 20, 1024)), ("sd3.5-large", (32, 20, 1024)),
                            ("sd3.5-large-turbo", (32, 4, 1024))):  # Turbo calibrates on the 4 steps it serves
        assert calibration_size(resolve_model(model)) == expected
    dry = subprocess.run(["make", "-n", "engines", "MODEL=sd3.5-medium", "GPU=ada", "SYSTEM_PYTHON=1"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    flat = " ".join(dry.replace("\\\n", " ").split())
    assert "--num-prompts" not in flat and "--steps" not in flat and "--height" not in flat, dry
    order = [line.split()[3] for line in dry.splitlines() if " -m sd35trt " in line]
    assert order == ["preflight", "calibrate", "export", "build"], "model and target are checked first"
    dry = subprocess.run(["make", "-n", "calibrate", "MODEL=tiny", "NUM_PROMPTS=4", "STEPS=2", "SIZE=576",
                          "SYSTEM_PYTHON=1"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--num-prompts 4 --steps 2 --height 576 --width 576" in " ".join(dry.replace("\\\n", " ").split()), dry
    dry = subprocess.run(["make", "-n", "engines", "MODEL=tiny", "RECIPE=mine.toml", "INT8=clip_l", "SYSTEM_PYTHON=1"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    steps = {line.split()[3]: line for line in dry.replace("\\\n", " ").splitlines() if " -m sd35trt " in line}
    assert all('--config "mine.toml"' in steps[step] for step in ("preflight", "calibrate", "export")), dry
    assert "--config" not in steps["build"], dry
