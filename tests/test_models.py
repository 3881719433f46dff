import pytest

from sd35trt.core.errors import ModelLoadError
from sd35trt.core.models import build_pipeline, resolve_model
from sd35trt.core.presets import PRESETS, SD35_LARGE, SD35_MEDIUM


def test_unknown_model_names_the_choices():
    with pytest.raises(ModelLoadError, match="unknown model 'sdxl'.*tiny, tiny-turbo, sd3.5-medium, sd3.5-large"):
        resolve_model("sdxl")
    with pytest.raises(ModelLoadError, match="no such model directory '/nonexistent'"):
        resolve_model("/nonexistent")


def test_directory_checks(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_model(str(tmp_path / "file.txt"))
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        resolve_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")
    for folder in ("transformer", "vae", "text_encoder"):
        (tmp_path / folder).mkdir()
    with pytest.raises(ModelLoadError, match="lacks component folder.*text_encoder_2"):
        resolve_model(str(tmp_path))


def test_tiny_preset_is_deterministic_and_uses_diffusers_classes():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    a = build_pipeline(resolve_model("tiny"))
    b = build_pipeline(resolve_model("tiny"), components={"transformer"})
    assert isinstance(a, StableDiffusion3Pipeline)
    assert isinstance(a.transformer, SD3Transformer2DModel) and isinstance(a.vae, AutoencoderKL)
    assert isinstance(a.scheduler, FlowMatchEulerDiscreteScheduler)
    assert a.transformer.config.qk_norm == "rms_norm" and list(a.transformer.config.dual_attention_layers) == [0]
    for (name, p), (_, q) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert (p == q).all(), name  # same seed per component, whatever else is built
    assert b.text_encoder_3 is None
    assert resolve_model("tiny").fingerprint() == resolve_model("tiny").fingerprint()


@pytest.mark.parametrize("preset,params", [(SD35_MEDIUM, 2.24e9), (SD35_LARGE, 8.06e9)])
def test_real_presets_have_the_real_sizes(preset, params):
    """Built on the meta device: the configs give SD3.5's parameter counts without allocating them."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**preset.transformer)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.01
    assert set(PRESETS) == {"tiny", "tiny-turbo", "sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo"}


def test_tokenizers_are_real_transformers_tokenizers():
    from transformers import CLIPTokenizer, T5TokenizerFast

    pipe = build_pipeline(resolve_model("tiny"), components=set())
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_3, T5TokenizerFast)
    ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer_3("a cat").input_ids[-1] == pipe.tokenizer_3.eos_token_id
