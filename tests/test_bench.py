"""``sd35trt bench`` on the CPU box: the NVML sampler says why its columns are empty without a GPU, the report's
table, JSON and CSV shapes, and peers (onnxruntime vs torch on the tiny model) in one run with ratios to the
first row. The GPU numbers live in docs/BENCHMARKS.md (bench/results/), never in a test."""

from __future__ import annotations

import json

import pytest


def test_sampler_without_a_gpu_explains_its_empty_columns():
    from sd35trt.core.host import local_compute_capability
    from sd35trt.runtime.telemetry import GpuSampler, gpu_info

    if local_compute_capability() is not None:
        pytest.skip("this host has a GPU: the sampler measures")
    with GpuSampler() as sampler:
        sum(range(10000))
    result = sampler.result.to_dict()
    assert result["why"] and ("NVML" in result["why"] or "nvidia-ml-py" in result["why"])
    assert result["power_mean_w"] is None and result["energy_j"] is None and result["device_memory_peak_gib"] is None
    assert result["seconds"] >= 0 and "why" in gpu_info()


def test_peers_in_one_run_with_ratios_table_json_and_csv(exported, capsys, tmp_path):
    from sd35trt.cli.main import main

    out, _ = exported
    csv = tmp_path / "bench.csv"
    args = ["bench", "--onnx", str(out), "--precision", "fp32", "--against", "torch", "--model", "tiny", "--steps", "2",
            "--loop-steps", "2", "--images", "1", "--height", "512", "--width", "512", "--batch", "1,2",
            "--csv", str(csv)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert [(r["peer"], r["batch"]) for r in rows] == [("onnx", 1), ("onnx", 2), ("torch", 1), ("torch", 2)]
    for row in rows:
        assert "error" not in row, row
        assert row["transformer_step_ms"]["median"] > 0 and row["images_per_s"] > 0
        assert row["vs_first"]["peer"] == "onnx"
        assert row["telemetry"]["why"], "no GPU here: the columns say why they are empty"
    assert rows[0]["vs_first"]["step_speedup"] == 1.0
    assert rows[2]["request"] == rows[0]["request"], "the same request for every peer"
    assert rows[1]["transformer_step_ms"]["batch_with_cfg"] == 4
    env = report["environment"]
    assert env["command"] and env["date"] and "torch" in env["versions"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "step ms" in table and "×step" in table and table.count("onnx") >= 2
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("date,gpu,peer,batch") and len(lines) == 1 + 4 + 4, "header once, then appended rows"


def test_bench_refuses_an_unknown_peer(capsys):
    from tests.test_bad_inputs import assert_user_error, run_cli

    code, err = run_cli(capsys, ["bench", "--torch", "--against", "tensorrt-llm"])
    assert_user_error(code, err, "--against 'tensorrt-llm'")
