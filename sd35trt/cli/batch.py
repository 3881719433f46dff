"""``sd35trt generate --prompts FILE``: checks every option before any engine loads, opens the loop once, picks the
micro-batch, runs ``runtime.batch.run_batch`` with a rich progress line, prints the summary."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from sd35trt.cli.app import echo, emit
from sd35trt.core import log
from sd35trt.core.artifacts import ensure_writable_dir, exclusive, sha256_file
from sd35trt.core.errors import InvalidInputError
from sd35trt.runtime.batch import (
    Index,
    Limits,
    auto_batch,
    batch_fits,
    check_same_run,
    parse_shard,
    plan_jobs,
    read_prompts,
    run_batch,
    settings_of,
)
from sd35trt.runtime.request import MAX_BATCH, GenerateRequest


def check_limits(max_temp: float | None, max_power: float | None) -> Limits:
    """``--max-temp``/``--max-power``: bounded, and refused in one line where NVML cannot read them."""
    from sd35trt.core.errors import check_range
    from sd35trt.runtime.telemetry import gpu_info

    limits = Limits(max_temp_c=None if max_temp is None else check_range(max_temp, "--max-temp", 30, 110, "80"),
                    max_power_w=None if max_power is None else check_range(max_power, "--max-power", 10, 2000,
                                                                           "300"))
    if limits.active:
        info = gpu_info()
        if "why" in info:
            raise InvalidInputError(f"--max-temp/--max-power need NVML to read the GPU: {info['why']}",
                                    hint="drop the limit on a host without an NVIDIA GPU (it would be ignored)")
    return limits


def _batch_size(text: str, loop: Any, request: GenerateRequest, options: Any) -> tuple[int, str]:
    """``--batch N`` checked against the engine profiles and the VRAM plan now; ``auto``: the largest that fits."""
    from sd35trt.runtime.vram import gpu_budget

    fits = batch_fits(loop, request, gpu_budget(options.vram_gib) if loop.plan is not None else None, options.vram_plan)
    if text == "auto":
        on_gpu = loop.plan is not None or options.bundle is not None or any(
            r.device == "cuda" for r in loop.runners.values() if hasattr(r, "device"))
        if not on_gpu:
            return 1, "no GPU: batching does not make a CPU run faster"
        return auto_batch(fits, MAX_BATCH)
    if not text.isdigit() or not 1 <= int(text) <= MAX_BATCH:
        raise InvalidInputError(f"--batch {text} is not auto or 1..{MAX_BATCH}", hint="e.g. --batch auto")
    problem = fits(int(text))
    if problem is not None:
        raise InvalidInputError(f"--batch {text} does not fit: {problem}",
                                hint="use --batch auto or a smaller --batch (or name the plan: --vram-plan sequential)")
    return int(text), "--batch"


def generate_many(options: Any, request: GenerateRequest, prompts_file: Path, out: Path, *, batch: str,
                  images_per_prompt: int, shard: str | None, max_temp: float | None, max_power: float | None,
                  json_out: bool) -> None:
    from sd35trt.runtime.launch import open_loop

    prompts = read_prompts(prompts_file)
    where = parse_shard(shard)
    jobs = plan_jobs(prompts, images_per_prompt, request.seed, where)
    limits = check_limits(max_temp, max_power)
    if out.suffix.lower() == ".png":
        raise InvalidInputError("with --prompts, --out is a folder", path=out, hint="e.g. --out images/")
    ensure_writable_dir(out, "--out")
    loop = open_loop(options, replace(request, prompt=prompts[0]))
    size, why = _batch_size(batch, loop, request, options)
    resolved = request.resolved(loop.assets.defaults)
    model = loop.assets.model.get("id") or Path(str(loop.assets.model.get("path", "model"))).name
    runner = "bundle" if options.bundle else "onnx" if options.onnx else "torch"
    settings = {"prompts_sha256": sha256_file(prompts_file), "images_per_prompt": images_per_prompt,
                "seed": request.seed, "negative_prompt": resolved.negative_prompt, "steps": resolved.steps,
                "guidance": resolved.guidance, "height": resolved.height, "width": resolved.width,
                "model": loop.assets.model.get("fingerprint") or model, "runner": runner,
                "precision": {name: r.precision for name, r in loop.runners.items()},
                "lora": options.lora, "t5": loop.has_t5}
    with exclusive(out / (f"shard-{where[0]}-of-{where[1]}" if where else "run"), "generate --prompts"):
        check_same_run(out, settings_of(**settings))
        index = Index(out, where)
        finished = len(jobs) - len(index.todo(jobs))
        log.info(f"{len(jobs)} images ({len(prompts)} prompts × {images_per_prompt}"
                 f"{f', shard {where[0]}/{where[1]}' if where else ''}); {finished} done "
                 f"before; batch {size} ({why}) -> {out}")
        with _progress(len(jobs), finished) as update:
            result = run_batch(loop, jobs, request, out, index, batch=size, limits=limits, model=model, on_batch=update)
    summary = {**result.to_dict(), "out": str(out), "index": str(index.path), "batch": size, "batch_why": why}
    if json_out:
        emit(summary)
        return
    echo(_table(summary))


def _progress(total: int, done: int):
    """Images done/total, img/s, ETA, GPU temperature and power, on stderr (rich)."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextlib.contextmanager
    def bar():
        progress = Progress(TextColumn("  images"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[gpu]}"),
                            console=log.console, transient=True)
        with progress:
            task = progress.add_task("images", total=total, completed=done, rate="", gpu="")

            def update(run: Any, telemetry: Any) -> None:
                rate = run.made / run.seconds if run.seconds else 0.0
                gpu = " ".join(x for x in (
                    f"{telemetry.temperature_max_c:.0f} °C" if telemetry.temperature_max_c is not None else "",
                    f"{telemetry.power_mean_w:.0f} W" if telemetry.power_mean_w is not None else "",
                    f"batch {run.batch_last}") if x)
                progress.update(task, completed=run.skipped + run.made, rate=f"{rate:.2f} img/s", gpu=gpu)

            yield update

    return bar()


def _table(s: dict[str, Any]) -> str:
    def show(value: Any, unit: str = "") -> str:
        return "n/a (no NVML)" if value is None else f"{value}{unit}"

    rows = [("images made", f"{s['images']} (+{s['skipped']} done before) of {s['total']}"),
            ("seconds", s["seconds"]), ("images/s", show(s["images_per_s"])),
            ("energy per image", show(s["energy_per_image_j"], " J")), ("mean power", show(s["power_mean_w"], " W")),
            ("max temperature", show(s["temperature_max_c"], " °C")),
            ("batch", f"{s['batch']} ({s['batch_why']}); last {s['batch_last']}, {s['governor_decisions']} governor decisions"),
            ("index", s["index"])]
    return "\n".join(f"{k:<18} {v}" for k, v in rows)
