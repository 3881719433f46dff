"""A random LoRA adapter for a preset's transformer (PEFT, diffusers' save_lora_weights), for GPU-machine journeys
that need `LORA=` at SD3.5 size: `python bench/make_lora.py sd3.5-medium OUT_DIR` writes
OUT_DIR/pytorch_lora_weights.safetensors (rank 4 on to_q/to_k/to_v/to_out.0, as the tests' tiny adapter)."""

from __future__ import annotations

import sys
from pathlib import Path

from sd35trt.core.presets import PRESETS
from tests.test_lora import make_adapter

if __name__ == "__main__":
    preset, dest = sys.argv[1], Path(sys.argv[2])
    dest.mkdir(parents=True, exist_ok=True)
    print(make_adapter(dest, config=dict(PRESETS[preset].transformer)))
