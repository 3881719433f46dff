"""User-facing errors.

Every problem a user can fix (bad option, missing file, mismatched artifact) is an ``Sd35TrtError``: the CLI
prints its one-line message and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class Sd35TrtError(Exception):
    """A problem the user can fix. ``str(err)`` is one line: what is wrong, where, and what to do."""

    exit_code = 2

    def __init__(self, what: str, *, path: str | Path | None = None, hint: str | None = None):
        self.what = what
        self.path = Path(path) if path is not None else None
        self.hint = hint
        parts = [what]
        if path is not None:
            parts.append(f"({path})")
        message = " ".join(parts)
        if hint:
            message += f": {hint}"
        super().__init__(message.replace("\n", " "))


class InvalidInputError(Sd35TrtError):
    """An option or argument is out of range or of the wrong kind."""


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``, else the one-line error every enumerated option gives."""
    if value not in choices:
        raise InvalidInputError(f"{option} '{value}' is not one of {', '.join(choices)}", hint=f"e.g. {option} {choices[0]}")
    return value


SEED_MAX = 2**63 - 1  # torch.Generator seeds are 64-bit; numpy's up to 2**32 are not used


def check_seed(seed: int, option: str = "--seed") -> int:
    if not 0 <= seed <= SEED_MAX:
        raise InvalidInputError(f"{option} {seed} is outside 0..2^63-1", hint=f"e.g. {option} 0")
    return seed


def check_range(value: float, option: str, low: float, high: float, example: str) -> float:
    """``value`` when finite and within [low, high], else the one line every bounded number gives."""
    import math

    if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise InvalidInputError(f"{option} {value:g} is outside {low:g}..{high:g}", hint=f"e.g. {option} {example}")
    return value


class NonFiniteError(Sd35TrtError):
    """A run produced NaN/Inf (latents or images): never written as an image; the hint names the likely cause."""


class ModelLoadError(Sd35TrtError):
    """A model id or directory cannot be loaded."""


class ArtifactError(Sd35TrtError):
    """An artifact (ONNX, manifest, engine, calibration state) is missing, corrupt or does not match."""


class VariantMissingError(ArtifactError):
    """A work dir has no ONNX of the precision asked for (compare lists it as "not compared" instead of failing)."""


class ExportValidationError(Sd35TrtError):
    """An exported ONNX does not reproduce PyTorch within the component's tolerance."""


class CalibrationError(Sd35TrtError):
    """Calibration cannot run or produced unusable scales."""


class BuildError(Sd35TrtError):
    """An engine cannot be built for the requested target/backend."""


class MissingDependencyError(Sd35TrtError):
    """An optional dependency (TensorRT, TensorRT-RTX, ModelOpt, ...) is not installed."""


class RuntimeUnavailableError(Sd35TrtError):
    """The requested runner cannot execute on this host (no GPU, wrong compute capability, ...)."""


def by_name(name: str, default: type[Sd35TrtError]) -> type[Sd35TrtError]:
    """The error class called ``name`` (how a child process reports its error), else ``default``."""
    found = globals().get(name)
    return found if isinstance(found, type) and issubclass(found, Sd35TrtError) else default
