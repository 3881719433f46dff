"""The FP8 recipe (``calibration/fp8.toml``): what stays high precision, and the FP16-range rules.

Per calibratable component: ``exclude`` (modules kept out of FP8), ``weight_only`` (those of the excludes that
are out for their activations' range, which weight-only formats leave in FP16: ``--int8`` quantizes them) and
``upcast`` (known FP16 overflow sites that always run as FP32 islands, applied when the model has them).
``[fp32_islands] margin``: an activation census value above it makes its block an FP32 island
(``sd35trt.core.numerics``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from sd35trt.core.artifacts import hash_json, sha256_file
from sd35trt.core.errors import CalibrationError, InvalidInputError
from sd35trt.core.numerics import DEFAULT_MARGIN, FP16_MAX, Island
from sd35trt.core.prompts import CALIBRATION_DIR
from sd35trt.core.specs import SPECS

DEFAULT_RECIPE = CALIBRATION_DIR / "fp8.toml"
RECIPE_COMPONENTS = tuple(name for name, spec in SPECS.items() if spec.calibratable)
RECIPE_KEYS = {"version", "format", "algorithm", "fp32_islands", *RECIPE_COMPONENTS}


def _strings(data: dict[str, Any], section: str, key: str, path: Path) -> tuple[str, ...]:
    value = data.get(section, {})
    patterns = value.get(key, []) if isinstance(value, dict) else None
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise InvalidInputError(f"[{section}] {key} must be a list of strings", path=path,
                                hint=f'e.g. {key} = ["proj_out"]')
    return tuple(patterns)


@dataclass(frozen=True)
class Recipe:
    path: Path
    sha256: str
    version: int
    algorithm: str
    exclude: dict[str, tuple[str, ...]]
    upcast: dict[str, tuple[str, ...]]
    weight_only: dict[str, tuple[str, ...]]  # excludes that weight-only INT8 still quantizes
    margin: float = DEFAULT_MARGIN

    @classmethod
    def load(cls, path: Path = DEFAULT_RECIPE) -> Recipe:
        if not path.is_file():
            raise InvalidInputError("FP8 recipe not found", path=path, hint="pass --config calibration/fp8.toml")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInputError(f"FP8 recipe is not valid TOML ({str(exc).splitlines()[0]})", path=path,
                                    hint="fix the syntax; see calibration/fp8.toml for the format") from None
        unknown = set(data) - RECIPE_KEYS
        if unknown:
            raise InvalidInputError(f"FP8 recipe has unknown key(s) {', '.join(sorted(unknown))}", path=path,
                                    hint=f"allowed: {', '.join(sorted(RECIPE_KEYS))}")
        if data.get("format", "fp8_e4m3") != "fp8_e4m3":
            raise InvalidInputError(f"FP8 recipe format '{data['format']}' is not supported", path=path,
                                    hint="use format = \"fp8_e4m3\"")
        if data.get("algorithm", "max") != "max":
            raise InvalidInputError(f"calibration algorithm '{data['algorithm']}' is not supported", path=path,
                                    hint="use algorithm = \"max\" (per-tensor amax)")
        islands = data.get("fp32_islands", {})
        margin = islands.get("margin", DEFAULT_MARGIN) if isinstance(islands, dict) else None
        if not isinstance(margin, (int, float)) or not 0 < margin <= FP16_MAX:
            raise InvalidInputError(f"[fp32_islands] margin {margin!r} must be a number in (0, {FP16_MAX:g}]", path=path,
                                    hint="e.g. margin = 16384 (2^14: 4x headroom to FP16's 65504)")
        exclude = {n: _strings(data, n, "exclude", path) for n in RECIPE_COMPONENTS}
        weight_only = {n: _strings(data, n, "weight_only", path) for n in RECIPE_COMPONENTS}
        for name, patterns in weight_only.items():
            stray = [p for p in patterns if p not in exclude[name]]
            if stray:
                raise InvalidInputError(f"[{name}] weight_only pattern '{stray[0]}' is not one of its excludes", path=path,
                                        hint="weight_only lists exclude patterns that INT8 weights still quantize")
        return cls(path=path, sha256=sha256_file(path), version=int(data.get("version", 1)), algorithm="max",
                   exclude=exclude, upcast={n: _strings(data, n, "upcast", path) for n in RECIPE_COMPONENTS},
                   weight_only=weight_only, margin=float(margin))

    @property
    def calibration_digest(self) -> str:
        """What calibration reads of the recipe (its excludes, FP32-island sites and margin): an edit elsewhere (a
        comment, ``weight_only``, which only INT8 export reads and hashes itself) keeps every calibration."""
        return hash_json({"algorithm": self.algorithm, "exclude": self.exclude, "upcast": self.upcast,
                          "margin": self.margin})

    def int8_digest(self, component: str) -> str:
        """What ``--int8`` export reads of the recipe for ``component`` (its excludes and ``weight_only``): an edit
        elsewhere keeps its INT8 ONNX."""
        return hash_json({"exclude": self.exclude[component], "weight_only": self.weight_only[component]})

    def check_patterns(self, component: str, module_names: list[str]) -> None:
        """Every exclude pattern must name at least one module: a typo must not silently quantize.
        (``upcast`` patterns name sites of particular models, e.g. Large's block 35, and may be absent.)"""
        for pattern in self.exclude[component]:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in module_names):
                raise CalibrationError(f"[{component}] exclude pattern '{pattern}' matches no module", path=self.path,
                                       hint=f"fix the name; e.g. {', '.join(module_names[1:4])}, ...")

    def quant_cfg(self, components: tuple[str, ...], islands: dict[str, list[Island]] | None = None,
                  networks: dict[str, Any] | None = None, fmt: str = "fp8") -> dict[str, Any]:
        """ModelOpt config for a ModuleDict of ``{pipeline_attr: network}`` in ``fmt``, everywhere but the excludes
        and the FP32 islands (an island runs in FP32 in every variant, so it is never quantized).

        ``fp8``: E4M3 weights and activations, per-tensor, max calibration. ``int4``: ModelOpt's INT4 AWQ
        (``INT4_AWQ_CFG``: weight-only, 4-bit blocks, AWQ-lite's per-channel input scales), each layer with the
        largest block of 128/64/32/16 that divides its input width (``networks`` names the layers; one whose width
        takes none is left out)."""
        from sd35trt.producers.weight_quant import int4_block_of

        cfg: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
        if fmt == "fp8":
            fp8 = {"num_bits": (4, 3), "axis": None}
            cfg += [{"quantizer_name": "*weight_quantizer", "cfg": fp8}, {"quantizer_name": "*input_quantizer", "cfg": fp8}]
            algorithm: Any = self.algorithm
        else:

            for component in components:
                prefix = SPECS[component].pipeline_attr
                for name, module in (networks or {})[prefix].named_modules():
                    block = int4_block_of(module)
                    if block is not None:
                        cfg.append({"quantizer_name": f"{prefix}.{name}.weight_quantizer",
                                    "cfg": {"num_bits": 4, "block_sizes": {-1: block, "type": "static"}}})
            algorithm = {"method": "awq_lite", "alpha_step": 0.1}
        for component in components:
            prefix = SPECS[component].pipeline_attr
            patterns = [*self.exclude[component], *(i.module for i in (islands or {}).get(component, []))]
            for pattern in patterns:
                cfg.append({"quantizer_name": f"{prefix}.{pattern}.*", "enable": False})
        return {"quant_cfg": cfg, "algorithm": algorithm}

    def quantizable(self, component: str, network: Any, islands: list[Island], *, weight_only: bool = False) -> list[str]:
        """Modules of ``network`` that get FP8 quantizers under this recipe (every Linear/Conv2d outside the
        excludes and the FP32 islands): empty when islands cover what the excludes leave (a model whose only
        joint block is an island). ``weight_only``: for a format that keeps activations in FP16 (INT8 weights), the
        excludes the recipe marks ``weight_only`` are quantized too."""
        import torch

        kept = [p for p in self.exclude[component] if not (weight_only and p in self.weight_only[component])]
        patterns = [*kept, *(f"{i.module}" for i in islands)]
        return [name for name, module in network.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name and
                not any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)]
