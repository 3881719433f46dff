import json

import numpy as np
import pytest

from sd35trt.core.artifacts import sha256_file
from sd35trt.core.errors import ExportValidationError, InvalidInputError
from sd35trt.core.specs import COMPONENTS, SPECS
from sd35trt.producers.export import ExportConfig, export_model


def test_all_five_components_export_and_validate_at_another_shape(exported):
    out, results = exported
    assert [r.component for r in results] == list(COMPONENTS)
    summary = json.loads((out / "onnx" / "export.json").read_text())
    assert set(summary["components"]) == set(COMPONENTS)
    for r in results:
        folder = out / "onnx" / r.component
        manifest = json.loads((folder / "manifest.json").read_text())  # as written (also what a skipped export gives)
        assert manifest["inputs_hash"] == r.manifest["inputs_hash"]
        assert (folder / "model.onnx").is_file() and (folder / "manifest.json").is_file()
        for rel, entry in manifest["files"].items():
            assert sha256_file(folder / rel) == entry["sha256"]
        val = manifest["validation"]
        assert val["dims"] != manifest["trace_dims"], "validated at the trace shape proves nothing"
        assert val["provider"] in ("cpu", "cuda")
        for name, stats in val["outputs"].items():
            assert stats["passed"] and stats["nonfinite"] == 0, (r.component, name)
            assert stats["rel_l2"] <= 5e-4
        assert [t["name"] for t in manifest["inputs"]] == SPECS[r.component].input_names
        assert manifest["versions"]["torch"] and manifest["model"]["random_weights"] is True
        assert manifest["opset"] == 19 and manifest["export_seconds"] > 0
        assert manifest["dynamic_axes"] == json.loads(json.dumps(SPECS[r.component].dynamic_axes()))


def test_onnx_runs_at_the_corners_of_its_profile(exported):
    """Dynamic axes really are dynamic: onnxruntime at the profile's largest batch (smallest image) and at its
    largest image (batch 1), the corners an engine must take (trace was 512 px, batch 1). Both extremes at once
    (8 images of 1536², 8 GB of CPU attention on the tiny model) add nothing the corners do not show."""
    from sd35trt.core.onnx_utils import ort_session, run_ort

    out, results = exported
    manifest = next(r.manifest for r in results if r.component == "transformer")
    session = ort_session(out / "onnx" / "transformer" / "model.onnx")
    profile = manifest["profile"]
    rng = np.random.default_rng(0)
    for batch_from, size_from in ((2, 0), (0, 2)):  # (max batch, min size), (min batch, max size)
        shapes = {k: [v[batch_from][0], *v[size_from][1:]] for k, v in profile.items()}
        feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        result = run_ort(session, feeds)
        assert result["noise_pred"].shape == tuple(shapes["hidden_states"])
        assert np.isfinite(result["noise_pred"]).all()


def test_rerun_with_unchanged_inputs_skips(exported, tiny_source):
    out, _ = exported
    before = {c: (out / "onnx" / c / "model.onnx").stat().st_mtime_ns for c in COMPONENTS}
    results = export_model(tiny_source, out, ExportConfig(), device="cpu", precision="fp32")
    assert all(r.skipped for r in results)
    assert before == {c: (out / "onnx" / c / "model.onnx").stat().st_mtime_ns for c in COMPONENTS}


def test_failed_validation_leaves_previous_export_intact(tmp_path, tiny_source, monkeypatch):
    import sd35trt.producers.export as export_mod

    cfg = ExportConfig(components=("clip_l",))
    export_model(tiny_source, tmp_path, cfg, device="cpu", precision="fp32")
    onnx_path = tmp_path / "onnx" / "clip_l" / "model.onnx"
    good = onnx_path.read_bytes()

    def broken(*args, **kwargs):
        raise ExportValidationError("clip_l fp32 ONNX differs from PyTorch: text_embeds rel-L2 1.0")

    monkeypatch.setattr(export_mod, "validate_onnx", broken)
    with pytest.raises(ExportValidationError):
        export_model(tiny_source, tmp_path, cfg, device="cpu", force=True, precision="fp32")
    assert onnx_path.read_bytes() == good
    assert not list((tmp_path / "onnx").glob(".clip_l.tmp-*")), "no half-written temp folder is left"


def test_opset_range_is_checked_before_work():
    with pytest.raises(InvalidInputError, match="--opset 12"):
        ExportConfig(opset=12)


def test_consolidate_external_data_makes_one_data_file(tmp_path, exported):
    """What the legacy exporter writes past 2 GB (a file per tensor) is merged into one model.onnx.data."""
    import onnx

    from sd35trt.core.onnx_utils import consolidate_external_data, ort_session, run_ort

    out, _ = exported
    model = onnx.load(str(out / "onnx" / "clip_l" / "model.onnx"))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    per_tensor = [p for p in tmp_path.iterdir() if p.name != "model.onnx"]
    assert len(per_tensor) > 10
    consolidate_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    ids = np.arange(2 * 77, dtype=np.int64).reshape(2, 77) % 500
    a = run_ort(ort_session(out / "onnx" / "clip_l" / "model.onnx"), {"input_ids": ids})
    b = run_ort(ort_session(path), {"input_ids": ids})
    assert np.array_equal(a["hidden_states"], b["hidden_states"])


def test_the_fp32_reference_has_tf32_off():
    """On CUDA torch's cuDNN convolutions default to TF32: an "FP32 reference" must switch it off."""
    import torch

    from sd35trt.core.host import strict_fp32

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    strict_fp32()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


def test_not_enough_disk_is_one_line_before_any_write(capsys, work_copy, tmp_path, monkeypatch):
    import collections
    import shutil

    from tests.test_bad_inputs import assert_user_error, run_cli, tree_digest

    before = tree_digest(work_copy)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**12, 10**12, 10**5))
    code, err = run_cli(capsys, ["export", "--out", work_copy, "--components", "clip_l", "--force"])
    assert_user_error(code, err, "not enough disk for clip_l fp16 ONNX")
    from tests.conftest import rtx_available

    if rtx_available():
        code, err = run_cli(capsys, ["build", "--onnx", work_copy, "--out", tmp_path / "engines", "--components", "t5"])
        assert_user_error(code, err, "not enough disk for the t5 engine")
        assert not list((tmp_path / "engines").rglob("*.plan"))
    assert tree_digest(work_copy) == before


def test_traffic_checks_stay_inside_their_memory_budget():
    """Export's held-out check at SD3.5 size: every row where the attention fits the budget, else whole prompts
    (a negative row and its positive row) until it does; what was checked is recorded."""
    import torch

    from sd35trt.core.specs import SPECS
    from sd35trt.producers.validation import plan_traffic_check

    def call(rows, size):
        return {"hidden_states": torch.zeros(rows, 16, size // 8, size // 8), "encoder_hidden_states": torch.zeros(rows, 333, 8)}

    spec = SPECS["transformer"]
    tiny = plan_traffic_check(spec, call(8, 512), heads=2)
    assert tiny.rows is None and "every row (8)" in tiny.why
    medium = plan_traffic_check(spec, call(8, 1024), heads=24)  # SD3.5-Medium, calibration batch 4 with guidance
    assert medium.rows == (0, 4) and "2 of 8 rows" in medium.why and "budget 8 GiB of host memory" in medium.why
    # on onnxruntime's CUDA provider the budget is half the GPU's free memory: an H200 with Medium loaded (~130 GiB
    # free) checks all 8 rows (45 GiB of attention), a 24 GB card with ~10 GiB free one whole prompt
    h200 = plan_traffic_check(spec, call(8, 1024), heads=24, budget_gib=65, where="GPU memory")
    assert h200.rows is None and "every row (8)" in h200.why
    card = plan_traffic_check(spec, call(8, 1024), heads=24, budget_gib=5, where="GPU memory")
    assert card.rows == (0, 4) and "of GPU memory" in card.why
    large = plan_traffic_check(spec, call(8, 1024), heads=38, budget_gib=4)
    assert large.rows == (0, 4), "one whole prompt is always checked, never none"
    assert plan_traffic_check(SPECS["t5"], {"input_ids": torch.zeros(8, 256)}, heads=64).rows is None
    x = torch.arange(8)
    assert medium.select(x).tolist() == [0, 4]


def test_a_bounded_traffic_check_says_what_it_checked(work_copy, monkeypatch):
    """The held-out check's report: every row on the chain's own export; when the rows do not fit the budget, export
    still checks one whole prompt (negative and positive rows), passes on it, and the manifest says how many rows,
    on which provider, within which budget."""
    import sd35trt.producers.validation as validation
    from sd35trt.cli.main import main

    manifest = work_copy / "onnx-fp8" / "transformer" / "manifest.json"
    whole = json.loads(manifest.read_text())["traffic_check"]
    assert whole["passed"] and whole["provider"] == "cpu" and whole["checked"].startswith("every row (4)"), whole
    monkeypatch.setattr(validation, "CHECK_MEMORY_GIB", 1e-6)
    assert main(["export", "--model", "tiny", "--out", str(work_copy), "--components", "transformer",
                 "--precision", "fp8", "--force", "--provider", "cpu"]) == 0
    bounded = json.loads(manifest.read_text())["traffic_check"]
    assert bounded["passed"] and bounded["calls"] == whole["calls"] == 2
    assert "2 of 4 rows" in bounded["checked"] and "budget 1e-06 GiB of host memory" in bounded["checked"], bounded
