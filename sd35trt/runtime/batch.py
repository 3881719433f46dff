"""Batch generation on the deploy host: a prompt file → images, engines loaded once.

Each image is a ``Job``: (prompt index, image index) and a seed derived from (``--seed``, prompt index, image index),
so any image can be made again alone (``generate --prompt P --seed S``). ``OUT/index.jsonl`` gets one line per image,
appended (and fsynced) only after its PNG is in place, so re-running the same command skips what is done and never
writes an image twice: a crash between the PNG and its line only redoes that image; a line torn by a kill is dropped.
``--shard K/N`` takes the prompts whose index is K modulo N: N hosts split one file without talking to each other
(each writes ``index-K-of-N.jsonl``). The NVML governor (``govern``) is a pure function of the readings of each
micro-batch: over a limit the batch halves, then batches are spaced by a pause; it steps back after the GPU has
stayed under the limit (with hysteresis) for a while.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sd35trt.core.artifacts import write_bytes_atomic, write_json_atomic
from sd35trt.core.errors import InvalidInputError, check_seed

MAX_PROMPT_CHARS = 10_000  # a "prompt" longer than this is not one (a binary or a pasted document)
MAX_IMAGES_PER_PROMPT = 1000


@dataclass(frozen=True)
class Job:
    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def key(self) -> tuple[int, int]:
        return self.prompt_index, self.image_index

    @property
    def file(self) -> str:
        return f"{self.prompt_index:06d}-{self.image_index:03d}.png"


def read_prompts(path: Path) -> list[str]:
    """One prompt a line (blank lines skipped; a prompt's index counts prompts, not lines). An empty, binary or
    non-UTF-8 file is one line of error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInputError("prompts file not found", path=path, hint="one prompt a line, UTF-8") from None
    except IsADirectoryError:
        raise InvalidInputError("--prompts is a folder", path=path, hint="give a text file, one prompt a line") from None
    if b"\x00" in data:
        raise InvalidInputError("--prompts is a binary file, not text", path=path, hint="one prompt a line, UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"--prompts is not UTF-8 text (byte {err.start})", path=path,
                                hint="save it as UTF-8, one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInputError("--prompts has no prompt", path=path, hint="one prompt a line")
    long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise InvalidInputError(f"--prompts: prompt {long} is {len(prompts[long])} characters long", path=path,
                                hint=f"one prompt a line, each under {MAX_PROMPT_CHARS} characters")
    return prompts


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard K/N`` (K from 0 to N-1, as a Kubernetes indexed Job's JOB_COMPLETION_INDEX) → (K, N)."""
    if text is None:
        return None
    k, sep, n = text.partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit():
        raise InvalidInputError(f"--shard {text!r} is not K/N", hint="e.g. --shard 0/4 ... --shard 3/4 on four hosts")
    k_i, n_i = int(k), int(n)
    if not 0 <= k_i < n_i:
        raise InvalidInputError(f"--shard {text}: K must be 0..{n_i - 1} for N = {n_i}" if n_i else
                                f"--shard {text}: N must be ≥ 1", hint="e.g. --shard 0/4 ... --shard 3/4 on four hosts")
    return k_i, n_i


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of one image: a hash of (seed, prompt, image), in 0..2^63-1, the same on every host and run."""
    digest = hashlib.sha256(f"sd35trt:{seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan_jobs(prompts: list[str], images_per_prompt: int, seed: int, shard: tuple[int, int] | None = None) -> list[Job]:
    check_seed(seed)
    if not 1 <= images_per_prompt <= MAX_IMAGES_PER_PROMPT:
        raise InvalidInputError(f"--images-per-prompt {images_per_prompt} is outside 1..{MAX_IMAGES_PER_PROMPT}",
                                hint="e.g. --images-per-prompt 4")
    k, n = shard or (0, 1)
    return [Job(p, i, prompt, image_seed(seed, p, i)) for p, prompt in enumerate(prompts) if p % n == k
            for i in range(images_per_prompt)]


# --- the index: what is done, appended line by line -----------------------------------------------------------


class Index:
    """``OUT/index.jsonl`` (or ``index-K-of-N.jsonl``): a line per finished image, and the governor's decisions
    (``{"event": ...}``). ``done`` is what a re-run skips: images whose line and PNG are both there."""

    def __init__(self, out: Path, shard: tuple[int, int] | None):
        self.out = out
        self.path = out / ("index.jsonl" if shard is None else f"index-{shard[0]}-of-{shard[1]}.jsonl")
        self.done: set[tuple[int, int]] = set()
        self.records: list[dict[str, Any]] = []
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        kept, torn = [], False
        for line in raw.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                torn = True  # a line cut by a kill: its image is redone
                continue
            if "event" in record:
                kept.append(line)
                continue
            key = (record.get("prompt_index"), record.get("image_index"))
            if key in self.done or not (self.out / str(record.get("file"))).is_file():
                torn = True  # a PNG removed since, or a second line for one image: keep the first
                continue
            self.done.add(key)  # type: ignore[arg-type]
            self.records.append(record)
            kept.append(line)
        if torn or (raw and not raw.endswith(b"\n")):
            write_bytes_atomic(self.path, b"".join(line + b"\n" for line in kept))

    def todo(self, jobs: list[Job]) -> list[Job]:
        """The jobs a run still has to make (in order): those not done."""
        return [j for j in jobs if j.key not in self.done]

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode()
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if "event" not in record:
            self.done.add((record["prompt_index"], record["image_index"]))
            self.records.append(record)


def check_same_run(out: Path, settings: dict[str, Any]) -> None:
    """``OUT/run.json`` holds what makes the images (model, runner, steps, size, seed, prompts file...): a re-run
    into the same folder must ask for the same, or its images would mix two runs."""
    path = out / "run.json"
    if path.exists():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            before = None
        if before != settings:
            changed = sorted(k for k in {*settings, *(before or {})} if (before or {}).get(k) != settings.get(k))
            raise InvalidInputError(f"--out holds images of another run (different {', '.join(changed) or 'run.json'})",
                                    path=out, hint="use a new --out, or the same options as the run that made it")
        return
    write_json_atomic(path, settings)


# --- batching and the NVML governor -------------------------------------------------------------------------


def auto_batch(fits: Callable[[int], str | None], cap: int) -> tuple[int, str]:
    """The largest micro-batch ``b ≤ cap`` for which ``fits(b)`` has no objection (engine profiles, the VRAM plan);
    with why the next size up was refused."""
    why = f"--batch auto stops at {cap}"
    for b in range(cap, 0, -1):
        problem = fits(b)
        if problem is None:
            return b, why
        why = f"a batch of {b} would not fit: {problem}"
    raise InvalidInputError(f"not even one image fits: {why}", hint="lower --height/--width, or see `sd35trt doctor`")


def batch_fits(loop: Any, request: Any, budget: int | None, vram_plan: str = "auto") -> Callable[[int], str | None]:
    """``fits(b)`` for ``auto_batch``: None when a micro-batch of ``b`` images passes every engine profile (CFG doubles
    the transformer's batch) and, with a GPU ``budget``, the VRAM plan the loop runs under still holds; else why not."""
    from sd35trt.runtime.vram import choose_plan

    shape, request = loop.shape, loop.shape.resolve(request)

    def fits(b: int) -> str | None:
        trial = replace(request, batch=b, prompts=("",) * b, seeds=(0,) * b)
        try:
            shape.check(trial)
            if budget is not None:
                plan = choose_plan(shape.needs(trial), budget, vram_plan)
                if loop.plan is not None and plan.mode != loop.plan.mode:
                    return f"the VRAM plan would change from {loop.plan.mode} to {plan.mode}"
        except InvalidInputError as err:
            return err.what
        return None

    return fits


@dataclass(frozen=True)
class Limits:
    """``--max-temp``/``--max-power``. Back up only after ``hold_s`` seconds at least ``cool_c`` under the temperature
    limit and under ``power_back`` of the power limit (hysteresis, so it does not flap)."""

    max_temp_c: float | None = None
    max_power_w: float | None = None
    cool_c: float = 3.0
    power_back: float = 0.9
    hold_s: float = 20.0
    first_pause_s: float = 2.0
    max_pause_s: float = 30.0

    @property
    def active(self) -> bool:
        return self.max_temp_c is not None or self.max_power_w is not None


@dataclass(frozen=True)
class Reading:
    """What NVML saw during one micro-batch: the time it ended, its hottest sample and mean board power."""

    time_s: float
    temp_c: float | None
    power_w: float | None


@dataclass(frozen=True)
class GovernorState:
    batch: int
    pause_s: float = 0.0
    cool_since: float | None = None


def govern(state: GovernorState, reading: Reading, limits: Limits, max_batch: int) -> tuple[GovernorState, str | None]:
    """The next micro-batch size and pause from one reading, with why when it changes. Over a limit: halve the
    batch; at 1, pause between batches (doubling up to ``max_pause_s``). Under the limit by the hysteresis margins
    for ``hold_s``: shorten the pause, then double the batch back, one step per hold."""
    over = []
    if limits.max_temp_c is not None and reading.temp_c is not None and reading.temp_c > limits.max_temp_c:
        over.append(f"{reading.temp_c:.0f} °C > {limits.max_temp_c:g} °C")
    if limits.max_power_w is not None and reading.power_w is not None and reading.power_w > limits.max_power_w:
        over.append(f"{reading.power_w:.0f} W > {limits.max_power_w:g} W")
    if over:
        if state.batch > 1:
            new = GovernorState(max(1, state.batch // 2), state.pause_s)
            return new, f"{'; '.join(over)}: batch {state.batch} → {new.batch}"
        pause = min(limits.max_pause_s, state.pause_s * 2 if state.pause_s else limits.first_pause_s)
        changed = pause != state.pause_s
        return GovernorState(1, pause), (f"{'; '.join(over)}: pause {pause:g} s between batches" if changed else None)
    cool = ((limits.max_temp_c is None or reading.temp_c is None or reading.temp_c <= limits.max_temp_c - limits.cool_c)
            and (limits.max_power_w is None or reading.power_w is None
                 or reading.power_w <= limits.max_power_w * limits.power_back))
    if not cool:
        return replace(state, cool_since=None), None
    since = state.cool_since if state.cool_since is not None else reading.time_s
    if reading.time_s - since < limits.hold_s or (state.pause_s == 0 and state.batch >= max_batch):
        return replace(state, cool_since=since), None
    if state.pause_s:
        pause = state.pause_s / 2 if state.pause_s / 2 >= limits.first_pause_s else 0.0
        return GovernorState(state.batch, pause, reading.time_s), f"under the limit for {limits.hold_s:g} s: pause {pause:g} s"
    new = GovernorState(min(max_batch, state.batch * 2), 0.0, reading.time_s)
    return new, f"under the limit for {limits.hold_s:g} s: batch {state.batch} → {new.batch}"


# --- the PNG ------------------------------------------------------------------------------------------------


def png_bytes(image: Any, text: dict[str, str]) -> bytes:
    """A PIL image as PNG with ``text`` in tEXt/iTXt chunks (``parameters`` in the form other SD tools read)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_text(record: dict[str, Any]) -> dict[str, str]:
    """The text chunks of one image: each field alone, and ``parameters`` as A1111/ComfyUI-style readers expect."""
    size = f"{record['width']}x{record['height']}"
    parameters = (f"{record['prompt']}\nNegative prompt: {record['negative_prompt']}\n"
                  f"Steps: {record['steps']}, Sampler: FlowMatchEuler, CFG scale: {record['guidance']:g}, "
                  f"Seed: {record['seed']}, Size: {size}, Model: {record['model']}, Precision: {record['precision']}")
    return {"parameters": parameters, "prompt": record["prompt"], "negative_prompt": record["negative_prompt"],
            "seed": str(record["seed"]), "steps": str(record["steps"]), "guidance": f"{record['guidance']:g}",
            "size": size, "model": record["model"], "precision": record["precision"], "software": "sd35trt"}


def save_image(out: Path, job: Job, image: Any, record: dict[str, Any]) -> None:
    write_bytes_atomic(out / job.file, png_bytes(image, png_text(record)))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def settings_of(**kwargs: Any) -> dict[str, Any]:
    """run.json's content: what makes the images, JSON-normalised (paths as strings)."""
    return json.loads(json.dumps(kwargs, default=str))


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class BatchRun:
    """What one ``generate --prompts`` did (the summary table and ``--json``)."""

    total: int  # images of this shard
    skipped: int  # done before this run (resume)
    made: int = 0
    seconds: float = 0.0
    energy_j: float | None = None
    power_w: list[float] = field(default_factory=list)
    temp_max_c: float | None = None
    batch_first: int = 0
    batch_last: int = 0
    decisions: int = 0

    def to_dict(self) -> dict[str, Any]:
        rate = self.made / self.seconds if self.seconds else None
        return {"images": self.made, "skipped": self.skipped, "total": self.total, "seconds": round(self.seconds, 2),
                "images_per_s": round(rate, 4) if rate else None,
                "energy_j": round(self.energy_j, 1) if self.energy_j is not None else None,
                "energy_per_image_j": round(self.energy_j / self.made, 1) if self.energy_j is not None and self.made else None,
                "power_mean_w": (round(self.energy_j / self.seconds, 1) if self.energy_j is not None and self.seconds
                                 else round(sum(self.power_w) / len(self.power_w), 1) if self.power_w else None),
                "temperature_max_c": self.temp_max_c, "batch_first": self.batch_first, "batch_last": self.batch_last,
                "governor_decisions": self.decisions}


def _image_record(job: Job, resolved: Any, model: str, precision: str, batch: int, telemetry: Any,
                  tokenizers: dict[str, Any]) -> dict[str, Any]:
    """An image's index line (and PNG text): what made it, its share of its micro-batch's time and energy, and the
    part of its prompt the text encoders dropped past their token limits."""
    from sd35trt.core.tokenizers import CLIP_MAX_TOKENS, T5_MAX_TOKENS
    from sd35trt.runtime.pipeline import truncated_text

    record = {"file": job.file, "prompt_index": job.prompt_index, "image_index": job.image_index,
              "prompt": job.prompt, "negative_prompt": resolved.negative_prompt, "seed": job.seed,
              "steps": resolved.steps, "guidance": resolved.guidance, "height": resolved.height,
              "width": resolved.width, "model": model, "precision": precision, "batch": batch,
              "seconds": round(telemetry.seconds / batch, 4), "time": now_iso()}
    if telemetry.energy_j is not None:
        record["energy_j"] = round(telemetry.energy_j / batch, 2)
    dropped = {label: text for label, text in (
        ("clip", truncated_text(tokenizers["clip_l"], job.prompt, CLIP_MAX_TOKENS)),
        ("t5", truncated_text(tokenizers["t5"], job.prompt, T5_MAX_TOKENS) if "t5" in tokenizers else "")) if text}
    if dropped:
        record["truncated"] = dropped
    return record


def run_batch(loop: Any, jobs: list[Job], base: Any, out: Path, index: Index, *, batch: int, limits: Limits,
              model: str, on_batch: Callable[[BatchRun, Any], None] | None = None, sample: bool = True) -> BatchRun:
    """Every job of ``jobs`` not in ``index`` through ``loop``, ``batch`` images at a time (the governor's size
    when ``limits`` are set): each PNG written atomically, then its index line."""
    from sd35trt.runtime.telemetry import GpuSampler

    todo = index.todo(jobs)
    run = BatchRun(total=len(jobs), skipped=len(jobs) - len(todo), batch_first=batch, batch_last=batch)
    precision = ", ".join(f"{name} {r.precision}" for name, r in loop.runners.items())
    resolved = base.resolved(loop.assets.defaults)
    tokenizers = loop.assets.tokenizers
    state, at = GovernorState(batch), 0
    while at < len(todo):
        group = todo[at:at + state.batch]  # the governor may change the size between micro-batches
        at += len(group)
        request = replace(resolved, batch=len(group), prompts=tuple(j.prompt for j in group),
                          seeds=tuple(j.seed for j in group))
        # the pause is inside the sampled window: the governor limits the card's average power over time (a pause
        # lowers it), and images/s and energy count the pauses
        with GpuSampler(enabled=sample) as sampler:
            if state.pause_s:
                time.sleep(state.pause_s)
            result = loop(request, progress=False)
        telemetry = sampler.result
        run.seconds += telemetry.seconds
        if telemetry.energy_j is not None:
            run.energy_j = (run.energy_j or 0.0) + telemetry.energy_j
        if telemetry.power_mean_w is not None:
            run.power_w.append(telemetry.power_mean_w)
        if telemetry.temperature_max_c is not None:
            run.temp_max_c = max(run.temp_max_c or 0.0, telemetry.temperature_max_c)
        for job, image in zip(group, result.pil):
            record = _image_record(job, resolved, model, precision, len(group), telemetry, tokenizers)
            save_image(out, job, image, record)
            index.append(record)
            run.made += 1
        if limits.active:
            reading = Reading(time.monotonic(), telemetry.temperature_max_c, telemetry.power_mean_w)
            index.append({"event": "reading", "time": now_iso(), "t_s": round(reading.time_s, 2), "batch": len(group),
                          "pause_s": state.pause_s, "temp_c": reading.temp_c, "power_w": reading.power_w})
            state, why = govern(state, reading, limits, batch)
            if why:
                run.decisions += 1
                index.append({"event": "governor", "time": now_iso(), "why": why, "batch": state.batch,
                              "pause_s": state.pause_s, "temp_c": reading.temp_c, "power_w": reading.power_w})
        run.batch_last = state.batch
        if on_batch is not None:
            on_batch(run, telemetry)
    return run
