"""Error metrics shared by export validation, the calibration report and ``compare``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sd35trt.core.specs import Tolerance


@dataclass(frozen=True)
class ErrorStats:
    rel_l2: float
    max_abs: float
    cosine: float
    ref_absmax: float
    nonfinite: int  # NaN/Inf count in the candidate
    shape: tuple[int, ...]

    def passes(self, tol: Tolerance) -> bool:
        return (self.nonfinite == 0 and self.rel_l2 <= tol.rel_l2
                and self.max_abs <= tol.scaled_max_abs(self.ref_absmax))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return (f"rel-L2 {self.rel_l2:.3e}, max-abs {self.max_abs:.3e}, cosine {self.cosine:.6f}"
                + (f", {self.nonfinite} NaN/Inf" if self.nonfinite else ""))


def error_stats(reference: Any, candidate: Any) -> ErrorStats:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {cand.shape}")
    nonfinite = int(cand.size - np.isfinite(cand).sum())
    if nonfinite:
        return ErrorStats(math.inf, math.inf, 0.0, float(np.abs(ref).max(initial=0.0)), nonfinite, ref.shape)
    diff = cand - ref
    ref_norm = float(np.linalg.norm(ref))
    rel_l2 = float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff))
    denom = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    cosine = float((ref * cand).sum() / denom) if denom > 0 else 1.0
    return ErrorStats(rel_l2, float(np.abs(diff).max(initial=0.0)), cosine,
                      float(np.abs(ref).max(initial=0.0)), 0, ref.shape)


def aggregate(stats: list[ErrorStats], tol: Tolerance) -> dict[str, Any]:
    """One output over several calls: rel-L2 mean/max, max-abs, worst cosine, NaN/Inf count, and whether every
    call is within ``tol`` (what the calibration report, export's traffic check and compare record)."""
    rel = [s.rel_l2 for s in stats]
    return {"rel_l2_mean": sum(rel) / len(rel), "rel_l2_max": max(rel), "max_abs": max(s.max_abs for s in stats),
            "cosine_min": min(s.cosine for s in stats), "nonfinite": sum(s.nonfinite for s in stats),
            "passed": all(s.passes(tol) for s in stats)}


def summarize(per_call: list[dict[str, ErrorStats]], output_names: list[str], tol: Tolerance) -> dict[str, Any]:
    """``aggregate`` per output of per-call stats, plus the overall verdict and the tolerance used."""
    summary: dict[str, Any] = {n: aggregate([c[n] for c in per_call], tol) for n in output_names}
    summary["passed"] = all(summary[n]["passed"] for n in output_names)
    summary["tolerance"] = {"rel_l2": tol.rel_l2, "max_abs": tol.max_abs}
    return summary


def psnr(reference: Any, candidate: Any, data_range: float = 2.0) -> float:
    """PSNR in dB; images in [-1, 1] (VAE output) have ``data_range`` 2. Identical inputs give inf."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    mse = float(np.mean((ref - cand) ** 2))
    if not math.isfinite(mse):
        return -math.inf
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
