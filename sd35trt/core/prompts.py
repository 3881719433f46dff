"""The shipped prompt set (``calibration/prompts.txt``) and how every command reads a prompt file."""

from __future__ import annotations

from pathlib import Path

from sd35trt.core.errors import InvalidInputError

CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "calibration"
DEFAULT_PROMPTS = CALIBRATION_DIR / "prompts.txt"


def read_prompts(path: Path, needed: int) -> list[str]:
    """Non-empty lines of a UTF-8 prompt file; every problem is one line naming the file (and line)."""
    if not path.exists():
        raise InvalidInputError("prompts file not found", path=path, hint="pass --prompts FILE (one prompt per line)")
    if not path.is_file():
        raise InvalidInputError("prompts path is not a file", path=path, hint="pass --prompts FILE")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise InvalidInputError("prompts file is binary (contains NUL bytes)", path=path,
                                hint="use a UTF-8 text file with one prompt per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidInputError(f"prompts file is not UTF-8 (line {line}, byte {exc.start})", path=path,
                                hint="re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInputError("prompts file is empty", path=path, hint="add one prompt per line")
    if len(prompts) < needed:
        raise InvalidInputError(f"prompts file has {len(prompts)} prompts, {needed} needed "
                                "(--num-prompts plus --holdout, or --prompts)", path=path,
                                hint=f"lower --num-prompts or --holdout to need at most {len(prompts)} together, "
                                     "or add prompts")
    return prompts
