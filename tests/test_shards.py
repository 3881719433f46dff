"""Calibration over several processes (gloo on CPU) through the real entry points: `sd35trt calibrate --shards N`
and torchrun give byte-identical scales to one process; bad shard counts and a dying worker end in one line
with the previous state intact; two commands on one work directory take turns."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_bad_inputs import assert_user_error, run_cli
from tests.test_interrupts import CALIB_ARGS, cli, env, finals_only


def calibrate(out: Path, *extra: object, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    argv = (launcher or cli())[:] + ["calibrate", "--out", str(out), "--device", "cpu", *CALIB_ARGS, *map(str, extra)]
    return subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=600)


def test_two_shards_give_the_scales_of_one_process(calibrated, tmp_path):
    out, single = calibrated
    result = calibrate(tmp_path / "w", "--shards", 2, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "w" / "calibration"
    assert (folder / "scales.json").read_bytes() == (out / "calibration" / "scales.json").read_bytes()
    report = json.loads((folder / "calibration.json").read_text())
    assert report["config"]["shards"] == 2
    assert report["inputs_hash"] == single.inputs_hash, "shards do not change what is calibrated"
    assert "shard 1/2 of the batches" in result.stderr
    assert json.loads(result.stdout) == report, "stdout is the one report (rank 0's), nothing from the workers"


def test_torchrun_workers_give_the_same_scales(calibrated, tmp_path):
    out, _ = calibrated
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "sd35trt"]
    result = calibrate(tmp_path / "w", launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "w" / "calibration" / "scales.json").read_bytes() == \
        (out / "calibration" / "scales.json").read_bytes()
    assert result.stdout.count("end to end") == 1, "only rank 0 prints the report"


@pytest.mark.parametrize("argv, match", [
    (["--shards", "3"], "--shards 3 is more than the 2 calibration batch(es)"),
    (["--shards", "0"], "--shards 0 must be ≥ 1"),
    (["--shards", "2", "--device", "cuda"], "needs 2 GPUs (NCCL, one process per GPU); torch sees 0"),
])
def test_bad_shards_fail_before_any_work(capsys, tmp_path, argv, match):
    code, err = run_cli(capsys, ["calibrate", "--model", "tiny", "--out", tmp_path / "w", *CALIB_ARGS, *argv])
    assert_user_error(code, err, match)
    assert not (tmp_path / "w" / "calibration").exists()


def _spawned_workers(parent: int) -> list[int]:
    """pids of ``parent``'s multiprocessing spawn children (not its resource tracker), oldest first."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(proc.name))
    return sorted(found)


def test_a_dying_worker_fails_in_one_line_and_keeps_the_previous_state(work_copy):
    before = finals_only(work_copy)
    proc = subprocess.Popen(cli("calibrate", "--out", work_copy, "--device", "cpu", *CALIB_ARGS, "--seed", "7",
                                "--shards", "2"), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline, victims = time.monotonic() + 300, []
    while time.monotonic() < deadline and proc.poll() is None:
        if "→ calibrate transformer" in "".join(lines):  # rank 0 calibrates: every worker is mid-step
            victims = _spawned_workers(proc.pid)
            break
        time.sleep(0.05)
    assert len(victims) == 2, "".join(lines)[-3000:]
    import os

    os.kill(victims[-1], signal.SIGKILL)  # the OOM killer's way: no cleanup in that worker
    proc.wait(timeout=120)
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: calibration shard 2/2 was killed by SIGKILL") and "previous calibration state is intact" in last
    assert finals_only(work_copy) == before, "nothing written, nothing half-written"
    assert not list(work_copy.glob(".calibration.tmp-*"))
    time.sleep(1)
    assert not [pid for pid in victims if Path(f"/proc/{pid}").exists()
                and "Z" not in (Path(f"/proc/{pid}") / "stat").read_text().split(")")[1][:3]], "no worker left running"


def test_two_commands_on_one_work_dir_take_turns(tmp_path):
    """`make engines GPU=ada` and `GPU=ampere` at once share W/calibration: the second waits for the first's
    lock and then finds its result instead of deleting its temp folder."""
    out = tmp_path / "w"
    argv = cli("calibrate", "--out", out, "--device", "cpu", *CALIB_ARGS)
    first = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".calibration.lock").exists() or not (out / ".calibration.lock").read_text():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    second = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=600)
    first_err = first.communicate(timeout=600)[1]
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    assert "waiting for sd35trt pid" in second.stderr and "inputs unchanged, skipped" in second.stderr
    assert not list(out.glob(".calibration.tmp-*"))


def _fails_after_the_others(shard, init_method):
    """A worker body: rank 0 fails (one user error) after every other rank's share is done."""
    from sd35trt.core.errors import ArtifactError
    from sd35trt.producers.shards import process_group

    with process_group(shard, "cpu", init_method):
        if shard.main:
            time.sleep(2)  # the other rank is waiting to leave the group together
            raise ArtifactError("no space left on device while writing the calibration state")


def test_rank_0_failing_last_is_the_one_error_with_no_traceback_from_the_others(capfd):
    """The workers leave their process group together; when rank 0 fails after the others' shares, its error is the
    one line, and the rank waiting for it leaves quietly (no gloo 'Connection closed by peer' traceback)."""
    from sd35trt.core.errors import ArtifactError
    from sd35trt.producers.shards import run_workers

    with pytest.raises(ArtifactError, match="calibration shard 1/2: no space left on device"):
        run_workers(_fails_after_the_others, 2, ())
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Connection closed" not in err, err[-2000:]
