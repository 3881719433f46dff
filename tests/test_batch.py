"""generate --prompts: seeds per image, PNG text, the index, resume after a real kill, shards, auto batch within the
profiles and the VRAM plan, the NVML governor's policy on recorded readings, and every bad input, on the tiny
work dir's ONNX (onnxruntime, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_bad_inputs import assert_user_error, run_cli
from tests.test_journeys import REPO

SMALL = ("--steps", "2", "--height", "512", "--width", "512")
PROMPTS = ["a koi pond at dawn", "a red fox in snow", "a lighthouse in a storm", "a bowl of ramen", "a paper crane",
           "a desert at night", "an old tram", "a glass of water"]


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.float64)


def _lines(index: Path) -> list[dict]:
    return [json.loads(line) for line in index.read_text().splitlines()]


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n\n")
    return path


@pytest.mark.fast
def test_shards_cover_every_image_exactly_once_with_the_same_seeds():
    from sd35trt.runtime.batch import plan_jobs

    whole = plan_jobs(PROMPTS, 3, seed=7)
    assert len({j.seed for j in whole}) == len(whole) == 24  # every image its own seed
    for n in (1, 2, 3, 5, 11):
        parts = [plan_jobs(PROMPTS, 3, seed=7, shard=(k, n)) for k in range(n)]
        keys = [j.key for part in parts for j in part]
        assert sorted(keys) == sorted(j.key for j in whole) and len(keys) == len(set(keys)), n
        assert {j.key: j.seed for part in parts for j in part} == {j.key: j.seed for j in whole}
    assert plan_jobs(PROMPTS, 1, seed=8)[0].seed != whole[0].seed


@pytest.mark.fast
def test_governor_steps_down_pauses_and_comes_back_with_hysteresis():
    from sd35trt.runtime.batch import GovernorState, Limits, Reading, govern

    limits = Limits(max_power_w=400, hold_s=20)
    # (time s, temperature, mean power of the micro-batch) as NVML read them, and what must follow: (batch, pause)
    trace = [(5, 70, 650, (2, 0)), (10, 71, 600, (1, 0)), (15, 72, 520, (1, 2)), (20, 72, 450, (1, 4)),
             (25, 72, 380, (1, 4)),  # under the limit but not under 90 % of it: no step back
             (30, 70, 350, (1, 4)), (40, 70, 350, (1, 4)), (50, 69, 350, (1, 2)), (60, 69, None, (1, 2)),
             (70, 69, 350, (1, 0)), (90, 69, 350, (2, 0)), (100, 69, 350, (2, 0)), (110, 69, 350, (4, 0)),
             (130, 69, 350, (4, 0)),  # at the largest batch: stays
             (135, 70, 420, (2, 0))]
    state, why_all = GovernorState(4), []
    for t, temp, power, expected in trace:
        state, why = govern(state, Reading(t, temp, power), limits, max_batch=4)
        assert (state.batch, state.pause_s) == expected, (t, state)
        why_all.append(why)
    assert why_all[0] == "650 W > 400 W: batch 4 → 2" and why_all[4] is None and "pause 2 s" in why_all[2]
    hot = Limits(max_temp_c=80, hold_s=10)
    state, why = govern(GovernorState(8), Reading(0, 85, 600), hot, 8)
    assert state.batch == 4 and "85 °C > 80 °C" in why
    state, why = govern(state, Reading(5, 78, 600), hot, 8)  # 2 °C under: not cool enough (3 °C hysteresis)
    assert state == GovernorState(4) and why is None


def test_images_are_the_same_whatever_their_batch_and_alone(calibrated, prompts_file, tmp_path, capsys):
    work, _ = calibrated
    for batch in ("1", "3"):
        code, err = run_cli(capsys, ["generate", "--prompts", prompts_file, "--onnx", work, *SMALL, "--batch", batch,
                                     "--images-per-prompt", "2", "--out", tmp_path / f"b{batch}"])
        assert code == 0, err[-2000:]
    one, three = _lines(tmp_path / "b1" / "index.jsonl"), _lines(tmp_path / "b3" / "index.jsonl")
    assert [(r["prompt_index"], r["image_index"], r["seed"]) for r in one] == \
        [(r["prompt_index"], r["image_index"], r["seed"]) for r in three] and len(one) == 6
    assert {r["batch"] for r in three} == {3}
    for record in one:
        a, b = _pixels(tmp_path / "b1" / record["file"]), _pixels(tmp_path / "b3" / record["file"])
        assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 1e-3, record["file"]
    first = one[0]
    code, err = run_cli(capsys, ["generate", "--prompt", first["prompt"], "--seed", first["seed"], "--onnx", work,
                                 *SMALL, "--out", tmp_path / "alone.png"])
    assert code == 0, err[-2000:]
    assert np.array_equal(_pixels(tmp_path / "alone.png"), _pixels(tmp_path / "b1" / first["file"]))

    from PIL import Image

    text = Image.open(tmp_path / "b3" / first["file"]).text
    assert text["prompt"] == first["prompt"] and text["seed"] == str(first["seed"]) and text["steps"] == "2"
    assert text["size"] == "512x512" and "fp8" in text["precision"] and text["model"] == "tiny"
    assert f"Seed: {first['seed']}, Size: 512x512" in text["parameters"]


def test_auto_batch_stops_at_the_profile_and_the_vram_plan(calibrated):
    from sd35trt.core.errors import InvalidInputError
    from sd35trt.runtime.batch import auto_batch, batch_fits
    from sd35trt.runtime.launch import LoopOptions, open_loop
    from sd35trt.runtime.request import GenerateRequest
    from sd35trt.runtime.vram import choose_plan

    work, _ = calibrated
    request = GenerateRequest(prompt="x", steps=2, height=512, width=512)
    loop = open_loop(LoopOptions(onnx=work), request)
    assert loop.ranges.batch.max == 4  # export's default: 4 images (8 transformer rows with CFG)
    size, why = auto_batch(batch_fits(loop, request, None), 16)
    assert size == 4 and "a batch of 5 would not fit" in why and "range" in why
    # The plan: at the tiny model's size the VAE decoder (one image at a time) sets the peak whatever the batch, so the
    # plan limits the batch only through its mode: a budget under the resident peak would switch the loop's plan.
    needs = loop.needs(request)
    loop.plan = choose_plan(needs, 1 << 50)
    assert loop.plan.mode == "resident"
    size, why = auto_batch(batch_fits(loop, request, 1 << 50), 16)
    assert size == 4
    with pytest.raises(InvalidInputError, match="from resident to sequential"):
        auto_batch(batch_fits(loop, request, loop.plan.peaks["resident"] - 1), 16)
    with pytest.raises(InvalidInputError, match="not even one image fits"):
        auto_batch(batch_fits(loop, request, 1 << 20), 16)


def test_a_killed_run_resumes_with_every_image_exactly_once(calibrated, tmp_path):
    work, _ = calibrated
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sd35trt", "generate", "--prompts", str(prompts), "--onnx", str(work), *SMALL,
            "--out", str(out), "--json"]
    first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if (out / "index.jsonl").exists() and len((out / "index.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    made_before = len(_lines(out / "index.jsonl"))
    assert 3 <= made_before < len(PROMPTS)
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["skipped"] == made_before and summary["images"] == len(PROMPTS) - made_before
    records = _lines(out / "index.jsonl")
    keys = [(r["prompt_index"], r["image_index"]) for r in records]
    assert sorted(keys) == [(p, 0) for p in range(len(PROMPTS))]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in records)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")], "temp files left"
    third = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert json.loads(third.stdout)["images"] == 0 and len(_lines(out / "index.jsonl")) == len(PROMPTS)


def test_bad_batch_inputs_are_one_line(calibrated, prompts_file, tmp_path, capsys):
    work, _ = calibrated
    run = ["generate", "--onnx", work, *SMALL]
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cases = [
        (["--prompts", tmp_path / "empty.txt"], "has no prompt"),
        (["--prompts", tmp_path / "binary.txt"], "binary file"),
        (["--prompts", tmp_path / "missing.txt"], "not found"),
        (["--prompts", prompts_file, "--shard", "3/2"], "K must be 0..1"),
        (["--prompts", prompts_file, "--shard", "two"], "is not K/N"),
        (["--prompts", prompts_file, "--out", "/proc/sd35trt-x"], "--out"),
        (["--prompts", prompts_file, "--out", tmp_path / "x.png"], "is a folder"),
        (["--prompts", prompts_file, "--max-power", "400"], "need NVML"),
        (["--prompts", prompts_file, "--max-temp", "500"], "--max-temp 500 is outside"),
        (["--prompts", prompts_file, "--batch", "8"], "--batch 8 does not fit"),
        (["--prompts", prompts_file, "--images-per-prompt", "0"], "--images-per-prompt 0"),
        (["--prompts", prompts_file, "--prompt", "x"], "one of --prompt and --prompts"),
        (["--prompt", "x", "--shard", "0/2"], "go with --prompts"),
        (["--prompt", "x", "--batch", "auto"], "auto goes with --prompts"),
    ]
    for extra, match in cases:
        code, err = run_cli(capsys, [*run, *extra])
        assert_user_error(code, err, match)
    out = tmp_path / "done"
    code, err = run_cli(capsys, [*run, "--prompts", prompts_file, "--out", out])
    assert code == 0, err
    code, err = run_cli(capsys, ["generate", "--onnx", work, "--steps", "3", "--height", "512", "--width", "512",
                                 "--prompts", prompts_file, "--out", out])
    assert_user_error(code, err, "another run (different steps)")


def test_a_prompt_past_the_token_limit_is_warned_once_and_indexed(calibrated, tmp_path, capsys):
    work, _ = calibrated
    prompts = tmp_path / "long.txt"
    long = " ".join(["a very detailed castle on a hill with towers and flags"] * 12)
    prompts.write_text(f"{long}\na cat\n")
    code, err = run_cli(capsys, ["generate", "--prompts", prompts, "--onnx", work, *SMALL, "--images-per-prompt", "2",
                                 "--out", tmp_path / "o"])
    assert code == 0, err[-2000:]
    assert err.count("prompt truncated to 77 CLIP tokens") == 1, err
    records = {(r["prompt_index"], r["image_index"]): r for r in _lines(tmp_path / "o" / "index.jsonl")}
    assert records[0, 0]["truncated"]["clip"] and records[0, 1]["truncated"]["clip"]
    assert "truncated" not in records[1, 0]
