"""Adapter files: round trip, size, and refusal of a mismatched base."""
import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from depthvid.errors import UserError
from depthvid.models import (
    config_hash,
    inflate_unet,
    load_adapter,
    mark_trainable,
    save_adapter,
    trainable_parameters,
)

SD2_DEPTH_TINY = dict(
    sample_size=8,
    in_channels=5,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
)


def make_video_unet(name="tiny/sd2-depth", **inflation):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD2_DEPTH_TINY).eval()
    unet.register_to_config(_name_or_path=name)  # what from_pretrained records
    return inflate_unet(unet, **inflation)


def tuned_video_unet():
    """A video UNet whose trainable set holds random values, as after tuning."""
    video_unet = make_video_unet()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in trainable_parameters(video_unet).values():
            p.normal_(0.0, 0.1)
    return video_unet


def run(video_unet):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 5, 3, 8, 8, generator=generator)
    text = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        return video_unet(sample, 500, text)


def test_fp32_round_trip_is_bit_identical(tmp_path):
    tuned = tuned_video_unet()
    save_adapter(tuned, tmp_path, base_model="tiny/sd2-depth", dtype=torch.float32)
    fresh = make_video_unet()
    assert not torch.equal(run(fresh), run(tuned))

    meta = load_adapter(fresh, tmp_path)
    assert torch.equal(run(fresh), run(tuned))
    assert meta["dtype"] == "float32" and meta["base_model"] == "tiny/sd2-depth"
    assert meta["inflation"] == {"sparse_causal": True, "temporal": True, "pseudo3d": True}
    assert meta["num_parameters"] == mark_trainable(fresh)
    assert meta["config_hash"] == config_hash(fresh.config)
    assert sorted(os.listdir(tmp_path)) == ["adapter.json", "adapter.safetensors"]  # no temp files left


def test_fp16_default_rounds_weights_to_fp16(tmp_path):
    tuned = tuned_video_unet()
    save_adapter(tuned, tmp_path, base_model="tiny/sd2-depth")
    fresh = make_video_unet()
    meta = load_adapter(fresh, tmp_path)

    assert meta["dtype"] == "float16"
    loaded = trainable_parameters(fresh)
    for name, p in trainable_parameters(tuned).items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], p.detach().half().float()), name
    expected = run(tuned)
    torch.testing.assert_close(run(fresh), expected, atol=2e-3 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype, bytes_per_value", [(torch.float16, 2), (torch.float32, 4)])
def test_adapter_file_holds_only_the_trainable_set(tmp_path, dtype, bytes_per_value):
    video_unet = make_video_unet()
    num_trainable = mark_trainable(video_unet)
    total = sum(p.numel() for p in video_unet.parameters())
    save_adapter(video_unet, tmp_path, base_model="tiny/sd2-depth", dtype=dtype)

    tensors = load_file(tmp_path / "adapter.safetensors")
    assert tensors.keys() == trainable_parameters(video_unet).keys()
    assert {t.dtype for t in tensors.values()} == {dtype}
    data_bytes = num_trainable * bytes_per_value
    size = os.path.getsize(tmp_path / "adapter.safetensors")
    assert data_bytes <= size <= data_bytes + 256 * len(tensors)  # + the safetensors JSON header
    assert num_trainable < total / 2


def test_other_base_config_is_rejected_naming_both(tmp_path):
    save_adapter(tuned_video_unet(), tmp_path, base_model="tiny/sd2-depth")
    torch.manual_seed(0)
    other = UNet2DConditionModel(**dict(SD2_DEPTH_TINY, in_channels=4)).eval()
    other.register_to_config(_name_or_path="tiny/sd2-base")
    with pytest.raises(UserError, match=r"'tiny/sd2-depth'.*'tiny/sd2-base'"):
        load_adapter(inflate_unet(other), tmp_path)


def test_other_inflation_flags_are_rejected(tmp_path):
    save_adapter(tuned_video_unet(), tmp_path, base_model="tiny/sd2-depth")
    with pytest.raises(UserError, match="inflation"):
        load_adapter(make_video_unet(temporal=False), tmp_path)


@pytest.mark.parametrize("change", ["drop a tensor", "add a tensor", "reshape a tensor"])
def test_tensors_not_matching_the_trainable_set_are_rejected(tmp_path, change):
    save_adapter(tuned_video_unet(), tmp_path, base_model="tiny/sd2-depth")
    path = tmp_path / "adapter.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    if change == "drop a tensor":
        del tensors[name]
        message = "missing 1"
    elif change == "add a tensor":
        tensors["unet.extra.weight"] = torch.zeros(3)
        message = "unexpected 1"
    else:
        tensors[name] = tensors[name].flatten()
        message = "wrong shape"
    save_file(tensors, path)
    with pytest.raises(UserError, match=message):
        load_adapter(make_video_unet(), tmp_path)


def test_missing_files_are_rejected(tmp_path):
    with pytest.raises(UserError, match=r"adapter\.json' not found"):
        load_adapter(make_video_unet(), tmp_path)
    save_adapter(make_video_unet(), tmp_path, base_model="tiny/sd2-depth")
    os.remove(tmp_path / "adapter.safetensors")
    with pytest.raises(UserError, match=r"adapter\.safetensors' not found"):
        load_adapter(make_video_unet(), tmp_path)


def test_bad_dtype_is_rejected(tmp_path):
    with pytest.raises(UserError, match="dtype"):
        save_adapter(make_video_unet(), tmp_path, base_model="x", dtype=torch.int8)


def test_config_hash_ignores_private_keys_and_sees_every_public_value():
    config = dict(SD2_DEPTH_TINY)
    reference = config_hash(config)
    assert len(reference) == 64
    assert config_hash(dict(reversed(list(config.items())))) == reference  # key order
    assert config_hash(dict(config, _name_or_path="elsewhere", _diffusers_version="0")) == reference
    assert config_hash(dict(config, block_out_channels=[32, 64])) == reference  # tuple vs list (JSON)
    assert config_hash(dict(config, cross_attention_dim=33)) != reference
    assert config_hash(make_video_unet().config) == config_hash(make_video_unet("another/name").config)


def test_metadata_file_is_plain_json(tmp_path):
    save_adapter(make_video_unet(), tmp_path, base_model="tiny/sd2-depth")
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert set(meta) == {"base_model", "config_hash", "inflation", "depthvid_version", "num_parameters", "dtype"}
