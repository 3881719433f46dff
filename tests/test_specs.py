import pytest

from sd35trt.core.errors import InvalidInputError
from sd35trt.core.shapes import Range, ShapeRanges, check_pixels
from sd35trt.core.specs import COMPONENTS, SPECS, PipeDims, parse_components


def test_range_parse_forms():
    assert Range.parse("512", "--height") == Range(512, 512, 512)
    assert Range.parse("512:1024", "--height") == Range(512, 1024, 1024)
    assert Range.parse("512:768:1024", "--height") == Range(512, 768, 1024)
    with pytest.raises(InvalidInputError, match="not N, MIN:MAX"):
        Range.parse("big", "--height")
    with pytest.raises(InvalidInputError, match="not ordered"):
        Range.parse("1024:512", "--height")
    with pytest.raises(InvalidInputError, match="4 fields"):
        Range.parse("1:2:3:4", "--batch")


def test_pixel_checks_suggest_a_valid_size():
    check_pixels(576, "--height")
    with pytest.raises(InvalidInputError, match="try 1024"):
        check_pixels(1000, "--height")
    with pytest.raises(InvalidInputError, match="outside"):
        check_pixels(4096, "--width")
    with pytest.raises(InvalidInputError, match="divisible by 16"):
        ShapeRanges(height=Range(500, 512, 1024))


def test_parse_components():
    assert parse_components(None) == COMPONENTS
    assert parse_components("vae_decoder,transformer") == ("transformer", "vae_decoder")
    with pytest.raises(InvalidInputError, match="unknown component"):
        parse_components("transformer,unet")


def test_profiles_derive_from_vae_scale_and_cfg_doubling():
    dims = PipeDims(vae_scale=8, widths={"latent_channels": 16, "joint_dim": 4096, "pooled_dim": 2048,
                                         "clip_l_hidden": 768, "clip_l_proj": 768, "t5_hidden": 4096}, vocab={})
    ranges = ShapeRanges()  # batch 1..4, 512..1536 px (opt 1024), 256 T5 tokens
    transformer = SPECS["transformer"].profile(ranges, dims)
    # batch from 1 (guidance ≤ 1, prompts encoded apart), optimised for the CFG batch, up to twice the largest batch
    assert transformer["hidden_states"] == ((1, 16, 64, 64), (2, 16, 128, 128), (8, 16, 192, 192))
    assert transformer["encoder_hidden_states"][2] == (8, 77 + 256, 4096)
    # the VAE decoder: no CFG doubling, one image of at most 1024 px by default (static allocation holds the maximum)
    assert SPECS["vae_decoder"].profile(ranges, dims)["latent"] == ((1, 16, 64, 64), (1, 16, 128, 128), (1, 16, 128, 128))
    wide = ShapeRanges(vae_max=1536, vae_batch=4)
    assert SPECS["vae_decoder"].profile(wide, dims)["latent"][2] == (4, 16, 192, 192)
    assert SPECS["clip_l"].profile(ranges, dims)["input_ids"] == ((1, 77), (2, 77), (8, 77))
    turbo = ShapeRanges(cfg=False)  # a Turbo bundle: no guidance, optimised for batch 1
    assert SPECS["transformer"].profile(turbo, dims)["hidden_states"][1] == (1, 16, 128, 128)
    capped = ShapeRanges(height=Range(512, 1024, 2048), width=Range(512, 1024, 2048), vae_max=1024)
    assert SPECS["vae_decoder"].profile(capped, dims)["latent"][2] == (1, 16, 128, 128), "tiles beyond 1024 px"
    assert SPECS["transformer"].profile(capped, dims)["hidden_states"][2] == (8, 16, 256, 256)
    assert ShapeRanges.from_dict(capped.to_dict()) == capped and ShapeRanges.from_dict(turbo.to_dict()) == turbo
    assert ShapeRanges.from_dict(wide.to_dict()) == wide and ShapeRanges.from_dict(ranges.to_dict()) == ranges
    old = ShapeRanges.from_dict({"batch": "1:1:4", "height": "512:1024:1536", "width": "512:1024:1536"})
    assert old.vae_batch == 4 and old.vae_side == 1536, "a manifest from before the narrow VAE profile means what it meant"
    assert SPECS["t5"].dynamic_axes()["input_ids"] == {0: "batch", 1: "t5_tokens"}


def test_every_spec_has_tolerances_for_every_precision_it_can_be_built_in():
    from sd35trt.core.specs import Precision
    from sd35trt.core.targets import PRECISION_PREFERENCE

    for name, spec in SPECS.items():
        for precision in PRECISION_PREFERENCE[name]:
            assert precision in spec.tolerances, (name, precision)
        assert Precision.FP32 in spec.tolerances


def test_precision_is_one_type_from_artifacts_to_runners(tiny_pipe):
    """Runners carry a Precision whatever runs them: torch modules their dtype's (BF16 on a GPU), which is never an
    ONNX or engine precision, so `build --precision bf16` and a manifest that says bf16 are refused."""
    import torch

    from sd35trt.core.specs import ARTIFACT_PRECISIONS, Precision, precision_of_dtype
    from sd35trt.runtime.runners import runners_from_torch

    assert precision_of_dtype(torch.bfloat16) is Precision.BF16 and precision_of_dtype(torch.float32) is Precision.FP32
    assert Precision.BF16 not in ARTIFACT_PRECISIONS and not Precision.BF16.quantized
    runners = runners_from_torch(tiny_pipe)
    assert {type(r.precision) for r in runners.values()} == {Precision}
    assert runners["transformer"].describe()["precision"] == "fp32"


def test_build_refuses_a_precision_only_torch_runs_in(capsys, tmp_path):
    from sd35trt.cli.main import main

    code = main(["build", "--onnx", str(tmp_path), "--precision", "bf16", "--gpu", "ada", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "--precision" in err and "bf16" in err and "Traceback" not in err
