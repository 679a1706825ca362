import json

import pytest
import torch
from safetensors.torch import load_file

from depthvid.testing import (
    PIPELINE_COMPONENTS,
    make_sample_clip,
    make_sample_depth,
    save_tiny_clip,
    save_tiny_pipeline,
    tiny_vocab,
)


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline_dir):
    from diffusers import StableDiffusionDepth2ImgPipeline

    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- tiny stable-diffusion-2-depth ----------------------------------------------------------------


def test_pipeline_folder_has_the_sd2_depth_layout(tiny_pipeline_dir):
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionDepth2ImgPipeline"
    assert set(PIPELINE_COMPONENTS) <= set(index)
    assert index["feature_extractor"] == ["transformers", "DPTImageProcessor"]
    for name in PIPELINE_COMPONENTS:
        assert (tiny_pipeline_dir / name).is_dir(), name
    for name in ("unet", "vae", "text_encoder", "depth_estimator"):
        assert list((tiny_pipeline_dir / name).glob("*.safetensors")), name
        assert not list((tiny_pipeline_dir / name).glob("*.bin")), name
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tiny_pipeline_dir / "tokenizer" / name).is_file(), name


def test_pipeline_configs_are_sd2_depth_shaped(pipeline):
    unet = pipeline.unet.config
    assert (unet.in_channels, unet.out_channels) == (5, 4)
    assert unet.use_linear_projection is True
    assert isinstance(unet.attention_head_dim, (tuple, list))
    assert unet.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.vae_scale_factor == 8 and pipeline.vae.config.latent_channels == 4
    scheduler = pipeline.scheduler.config
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    assert scheduler.beta_schedule == "scaled_linear"
    assert (scheduler.beta_start, scheduler.beta_end) == (0.00085, 0.012)
    assert scheduler.steps_offset == 1
    assert scheduler.clip_sample is False and scheduler.set_alpha_to_one is False
    assert scheduler.prediction_type == "epsilon"
    assert pipeline.tokenizer.model_max_length == 77


def test_vae_maps_64_pixels_to_8_latents(pipeline):
    with torch.no_grad():
        latents = pipeline.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        decoded = pipeline.vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 8)
    assert decoded.shape == (1, 3, 64, 64)


@pytest.mark.filterwarnings("ignore:In CPU autocast")
def test_pipeline_produces_an_image(pipeline):
    image = pipeline(
        prompt="a red ball on a floor",
        image=make_sample_clip(1, 64, 64),
        num_inference_steps=2,
        strength=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all() and image.std() > 0


def test_depth_estimator_output_depends_on_the_image(pipeline):
    pixels = pipeline.feature_extractor(images=[torch.zeros(3, 32, 32), torch.ones(3, 32, 32)],
                                        return_tensors="pt", do_rescale=False).pixel_values
    with torch.no_grad():
        depth = pipeline.depth_estimator(pixel_values=pixels).predicted_depth
    assert depth.std() > 0  # not a constant map (random DPT init collapses to 0 without care)
    assert not torch.allclose(depth[0], depth[1])


def test_pipeline_is_deterministic_per_seed(tiny_pipeline_dir, tmp_path):
    again = save_tiny_pipeline(tmp_path / "again", seed=0)
    other = save_tiny_pipeline(tmp_path / "other", seed=1)
    for name, file in [("unet", "diffusion_pytorch_model.safetensors"),
                       ("depth_estimator", "model.safetensors")]:
        reference = load_file(tiny_pipeline_dir / name / file)
        same = load_file(again / name / file)
        different = load_file(other / name / file)
        assert all(torch.equal(reference[k], same[k]) for k in reference), name
        assert not all(torch.equal(reference[k], different[k]) for k in reference), name


def test_save_tiny_pipeline_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    save_tiny_pipeline(tmp_path / "p")
    assert torch.equal(torch.rand(3), expected)


# -- offline tokenizer and tiny CLIP --------------------------------------------------------------


def test_offline_tokenizer(pipeline):
    vocab = tiny_vocab()
    tokens = pipeline.tokenizer("A red Ball!", padding="max_length", max_length=77, truncation=True)
    ids = tokens.input_ids
    assert len(ids) == 77
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    # lower-cased; "!" is its own word for CLIP's pre-tokenizer, so it decodes space-separated
    assert pipeline.tokenizer.decode(ids, skip_special_tokens=True) == "a red ball !"
    # non-ASCII text falls back to byte tokens instead of failing
    assert pipeline.tokenizer("café ☕").input_ids[1:-1]


def test_tiny_clip_loads_and_embeds(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip_dir)
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    inputs = processor(text=["a red ball", "a blue box"], images=list(make_sample_clip(3, 48, 64)),
                       return_tensors="pt", padding=True, do_rescale=False)
    assert inputs.pixel_values.shape == (3, 3, 32, 32)
    with torch.no_grad():
        text = model.get_text_features(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask
        )
        image = model.get_image_features(pixel_values=inputs.pixel_values)
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    assert text.shape == (2, 16) and image.shape == (3, 16)
    assert not torch.allclose(text[0], text[1])


def test_tiny_clip_is_deterministic_per_seed(tiny_clip_dir, tmp_path):
    reference = load_file(tiny_clip_dir / "model.safetensors")
    same = load_file(save_tiny_clip(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(save_tiny_clip(tmp_path / "other", seed=1) / "model.safetensors")
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)


# -- sample clip ----------------------------------------------------------------------------------


def test_sample_clip_shape_range_and_determinism():
    clip = make_sample_clip(5, 32, 48)
    assert clip.shape == (5, 3, 32, 48) and clip.dtype == torch.float32
    assert clip.min() >= 0 and clip.max() <= 1
    assert torch.equal(clip, make_sample_clip(5, 32, 48))
    assert (clip[0] - clip[-1]).abs().mean() > 0.01  # things move


def test_sample_clip_ball_occludes_the_pillar():
    clip, depth = make_sample_clip(9, 64, 64), make_sample_depth(9, 64, 64)
    assert depth.shape == (9, 1, 64, 64) and depth.min() == 0 and depth.max() == 1
    red, green, blue = clip[:, 0], clip[:, 1], clip[:, 2]
    ball = (red > 0.35) & (green < 0.2) & (blue < 0.2)  # (F, H, W)
    pillar = (red > 0.35) & (green > 0.3) & (blue < 0.2) & (red - blue > 0.25)
    sky = depth[:, 0] == 0
    assert ball[0, :, :32].any() and ball[-1, :, 32:].any()  # the ball goes left to right
    assert sky[:, :10].all()  # the top rows are sky
    # Where the ball covers the pillar's columns, the ball is nearer (brighter depth).
    middle = 4
    columns = pillar[middle].any(dim=0) & ball[middle].any(dim=0)
    assert columns.any()
    ball_depth = depth[middle, 0][ball[middle] & columns[None, :]]
    pillar_depth = depth[middle, 0][pillar[middle]]
    assert ball_depth.min() > pillar_depth.max()


# -- full-size stable-diffusion-2-depth, on the meta device ------------------------------------------


def test_full_size_components_have_sd2_depth_sizes():
    from depthvid.testing import full_size_components

    models = full_size_components("meta")
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert {p.device.type for m in models.values() for p in m.parameters()} == {"meta"}
    # SD2's UNet has 865,910,724 parameters; the depth channel adds 320 x 3 x 3 to conv_in
    assert counts["unet"] == 865_910_724 + 320 * 9
    assert counts["vae"] == 83_653_863  # SD's AutoencoderKL
    assert counts["text_encoder"] == 340_387_840  # OpenCLIP ViT-H/14's text tower, 23 layers
    assert 120e6 < counts["depth_estimator"] < 125e6  # DPT-Hybrid (BiT stem + ViT-B/16)
    unet, text_encoder = models["unet"].config, models["text_encoder"].config
    assert unet.in_channels == 5 and unet.cross_attention_dim == text_encoder.hidden_size == 1024
    assert text_encoder.num_hidden_layers == 23
    assert models["depth_estimator"].config.is_hybrid


def test_full_size_folder_layout_loads(tmp_path, monkeypatch):
    # the real sizes take 5.5 GB: write the same folder with tiny components in their place
    import depthvid.testing as testing
    from depthvid.loading import load_base_model

    tiny = dict(
        unet=testing.tiny_unet_config(), vae=testing.tiny_vae_config(), text=testing._tiny_text_config(),
        dpt=testing.tiny_dpt_config(),
    )

    def tiny_builders(device, seed):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation

        return {
            "unet": lambda: UNet2DConditionModel(**tiny["unet"]),
            "vae": lambda: AutoencoderKL(**tiny["vae"]),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**tiny["text"])),
            "depth_estimator": lambda: DPTForDepthEstimation(DPTConfig(**tiny["dpt"])),
        }

    monkeypatch.setattr(testing, "_full_size_builders", tiny_builders)
    folder = testing.save_full_size_pipeline(tmp_path / "full")
    base = load_base_model(str(folder))
    assert base.vae_scale_factor == 8 and base.unet.config.in_channels == 5
    assert base.feature_extractor.size == {"height": 384, "width": 384}
    assert base.tokenizer("a cat").input_ids[0] == testing.tiny_vocab()[testing.BOS_TOKEN]
