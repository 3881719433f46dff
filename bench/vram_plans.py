"""What each VRAM plan needs for the SD3.5 FP8 bundles, from the manifests of the bundles built on the GPU
machine (bench/results: runs 6-8; engine sizes as built, the engines themselves not kept), through
``sd35trt doctor``'s own report. Combinations are assembled from those manifests: Medium without T5, Medium with
T5 in FP8 (run 7), Large's FP8 transformer (run 8) with Medium's CLIP-L/CLIP-G/VAE engines (the same networks),
the Large transformer marked as built with --weight-streaming (the flag changes the plan's options, not the
engine's size).

Every plan counts what the engines allocate: TensorRT's static activation memory at each engine's profile maximum
(#31; before, the request's). The bundles were built with the VAE decoder's old profile (4 images up to 1536 px),
which alone holds ~23 GiB; "today's VAE profile" rows give the same bundles with the VAE decoder profile export
builds by default now (1 image up to 1024 px, tiles above), its engine size as built (weights do not depend on the
profile). The 4-bit bundles (#35, rounds 16-21) were built with today's VAE profile and are planned as built.

    python bench/vram_plans.py [OUT_DIR]      prints a table; writes OUT_DIR/vram-plans.json when given
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MEDIUM = RESULTS / "2026-11-22-h100-run6/sd3.5-medium-make_engines/engines/sd3.5-medium/ada-tensorrt-rtx/manifest.json"
LARGE_TRANSFORMER = RESULTS / "2026-11-22-h100-run8/engines-fp8-transformer-p1/manifest.json"
LARGE_T5 = RESULTS / "2026-11-22-h100-run8/engines-fp16-t5-p1/manifest.json"
T5_FP8 = RESULTS / "2026-11-22-h100-run7/t5-fp8/engines-fp8-t5/sd3.5-medium/ada-tensorrt-rtx/manifest.json"
BUDGETS = (8, 12, 16, 24)
FOUR_BIT = {  # whole bundles, as `make engines` built them on the GPU machine (docs/BENCHMARKS.md rounds 16-21)
    "Medium INT4, CLIP-only": "2026-12-05-h200-r16/fourbit-sd3.5-medium-int4-clip",
    "Medium INT4, INT8 CLIP, CLIP-only": "2026-12-05-h100-r19/fourbit-sd3.5-medium-int4-clip-int8",
    "Medium mixed FP8/INT4, CLIP-only": "2026-12-05-h200-r17/fourbit-sd3.5-medium-mixed-clip",
    "Medium NVFP4 (SM120), CLIP-only": "2026-12-05-h200-r21/fourbit-sd3.5-medium-nvfp4-clip",
    "Large INT4, T5 FP16": "2026-12-05-h200-r16/fourbit-sd3.5-large-int4",
    "Large INT4, INT8 CLIP, CLIP-only, 1 image <= 1024 px": "2026-12-05-h200-r21/fourbit-sd3.5-large-int4-clip-fit-int8",
    "Large NVFP4 (SM120), CLIP-only": "2026-12-05-h200-r17/fourbit-sd3.5-large-nvfp4-clip",
}


def bundles() -> dict[str, dict]:
    medium = json.loads(MEDIUM.read_text())
    large = json.loads(LARGE_TRANSFORMER.read_text())
    t5_fp8 = json.loads(T5_FP8.read_text())["components"]["t5"]
    t5_large = json.loads(LARGE_T5.read_text())["components"]["t5"]
    clip_vae = {k: medium["components"][k] for k in ("clip_l", "clip_g", "vae_decoder")}
    streamable = {**large["components"]["transformer"], "weight_streaming": True}
    return {
        "Medium FP8, T5 FP16": medium,
        "Medium FP8, T5 FP8": {**medium, "components": {**medium["components"], "t5": t5_fp8}},
        "Medium FP8, CLIP-only": {**medium, "components": {"transformer": medium["components"]["transformer"], **clip_vae}},
        "Large FP8, T5 FP16": {**large, "components": {"transformer": large["components"]["transformer"], **clip_vae,
                                                       "t5": t5_large}},
        "Large FP8, CLIP-only": {**large, "components": {"transformer": large["components"]["transformer"], **clip_vae}},
        "Large FP8 (--weight-streaming), CLIP-only": {**large, "components": {"transformer": streamable, **clip_vae}},
    }


def with_todays_vae(manifest: dict) -> dict:
    """The bundle with its VAE decoder entry given today's default profile (``ShapeRanges``: 1 image, 1024 px)."""
    from sd35trt.core.assets import PipelineAssets
    from sd35trt.core.presets import SD35_MEDIUM
    from sd35trt.core.shapes import ShapeRanges
    from sd35trt.core.specs import SPECS, PipeDims

    vae = dict(manifest["components"]["vae_decoder"])
    ranges = ShapeRanges.from_dict(vae["ranges"])
    today = ShapeRanges(batch=ranges.batch, height=ranges.height, width=ranges.width, t5_tokens=ranges.t5_tokens,
                        cfg=ranges.cfg)
    scale = PipelineAssets.of_configs({}, {}, None, SD35_MEDIUM.vae, {}).vae_scale
    dims = PipeDims(vae_scale=scale, widths={"latent_channels": 16}, vocab={})
    vae["profile"] = {k: [list(s) for s in v] for k, v in SPECS["vae_decoder"].profile(today, dims).items()}
    vae["ranges"] = today.to_dict()
    return {**manifest, "components": {**manifest["components"], "vae_decoder": vae}}


def main() -> int:
    from sd35trt.checks.doctor import vram_report

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    rows, report = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {f"{name}{suffix}": how(manifest) for name, manifest in bundles().items()
                    for suffix, how in (("", lambda m: m), (", today's VAE profile", with_todays_vae))}
        variants |= {name: json.loads((RESULTS / run / "bundle.json").read_text()) for name, run in FOUR_BIT.items()}
        for name, manifest in variants.items():
            folder = Path(tmp) / "".join(c if c.isalnum() else "_" for c in name)
            folder.mkdir()
            (folder / "manifest.json").write_text(json.dumps(manifest))
            entry = {"size_gb": round(sum(c["bytes"] for c in manifest["components"].values()) / 1e9, 2)}
            for budget in BUDGETS:
                plan = vram_report(folder, budget)
                entry[f"{budget}"] = plan["plan"]["mode"] if plan["plan"] else "does not fit"
                entry["plans_gib"] = plan["plans_gib"]
            here = vram_report(folder, None)  # this GPU's free memory (None without a GPU)
            entry["this_gpu"] = here["plan"]["mode"] if here.get("plan") else here.get("why") or here.get("error")
            report[name] = entry
            rows.append(f"{name:<64} {entry['size_gb']:>7.2f} GB  " + "  ".join(
                f"{b} GiB: {entry[str(b)]:<12}" for b in BUDGETS) + "  needs (GiB) " + ", ".join(
                f"{m} {v}" for m, v in entry["plans_gib"].items()))
    print("\n".join(rows))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "vram-plans.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
