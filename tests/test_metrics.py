"""The metrics against direct computations with the same tiny random CLIP / DPT."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from depthvid.errors import UserError
from depthvid.metrics import (
    EvalOptions,
    depth_errors,
    depth_fidelity,
    frame_consistency,
    load_clip,
    load_depth_model,
    textual_alignment,
)
from depthvid.testing import make_sample_clip

PROMPTS = ["a red ball bouncing", "a cat", "snowy mountains at dusk", "an oil painting of a city", "zzz"]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_clip(str(tiny_clip_dir), device="cpu")


@pytest.fixture(scope="module")
def video():
    return make_sample_clip(6, 32, 32)


def embed_images(frames, model, processor):
    pixels = processor(images=list(frames), return_tensors="pt", do_rescale=False,
                       input_data_format="channels_first").pixel_values
    with torch.no_grad():
        return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


def embed_text(prompt, model, processor):
    tokens = processor(text=[prompt], return_tensors="pt")
    with torch.no_grad():
        return F.normalize(model.get_text_features(**tokens).pooler_output[0], dim=-1)


# -- frame consistency -----------------------------------------------------------------------------


@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_frame_consistency_matches_direct_computation(clip, video, pairs):
    model, processor = clip
    emb = embed_images(video, model, processor)
    if pairs == "all":
        chosen = list(itertools.combinations(range(len(video)), 2))
    else:
        chosen = [(f, f + 1) for f in range(len(video) - 1)]
    expected = 100 * sum(float(emb[i] @ emb[j]) for i, j in chosen) / len(chosen)
    # batch_size 4 splits the 6 frames into two CLIP batches
    got = frame_consistency(video, model, processor, pairs=pairs, batch_size=4)
    assert got == pytest.approx(expected, abs=1e-4)


def test_identical_frames_are_fully_consistent(clip, video):
    frames = video[2:3].repeat(5, 1, 1, 1)
    for pairs in ("all", "adjacent"):
        assert frame_consistency(frames, *clip, pairs=pairs) == pytest.approx(100.0, abs=1e-4)


def test_all_pairs_consistency_ignores_frame_order(clip, video):
    forward = frame_consistency(video, *clip, pairs="all")
    assert frame_consistency(video.flip(0), *clip, pairs="all") == pytest.approx(forward, abs=1e-4)
    shuffled = video[torch.tensor([3, 0, 5, 1, 4, 2])]
    assert frame_consistency(shuffled, *clip, pairs="all") == pytest.approx(forward, abs=1e-4)
    # adjacent pairs do see the order
    assert frame_consistency(shuffled, *clip, pairs="adjacent") != pytest.approx(
        frame_consistency(video, *clip, pairs="adjacent"), abs=1e-3)


def test_adjacent_and_all_pairs_differ_on_a_changing_video(clip):
    torch.manual_seed(0)
    # a slow drift from one random image to another: neighbours agree more than the two ends
    start, end = torch.rand(2, 3, 32, 32)
    weights = torch.linspace(0, 1, 6)[:, None, None, None]
    frames = (1 - weights) * start + weights * end
    adjacent = frame_consistency(frames, *clip, pairs="adjacent")
    everything = frame_consistency(frames, *clip, pairs="all")
    assert adjacent > everything + 0.1


def test_frame_consistency_needs_two_frames(clip, video):
    with pytest.raises(UserError, match="at least 2 frames"):
        frame_consistency(video[:1], *clip)


# -- textual alignment -----------------------------------------------------------------------------


def test_textual_alignment_matches_direct_computation_with_and_without_clamp(clip, video):
    model, processor = clip
    video = torch.cat([video[:3], 1 - video[:3]])  # a negative image moves its embedding most
    image = embed_images(video, model, processor)
    # a prompt whose per-frame cosines have both signs, so the clamp changes the score
    mixed = None
    for prompt in PROMPTS:
        cosines = image @ embed_text(prompt, model, processor)
        if (cosines > 0).any() and (cosines < 0).any():
            mixed, cosines_mixed = prompt, cosines
            break
    assert mixed is not None, "no prompt gives mixed signs with this tiny CLIP; extend PROMPTS"
    clamped = textual_alignment(video, mixed, model, processor, clamp=True)
    raw = textual_alignment(video, mixed, model, processor, clamp=False)
    assert clamped == pytest.approx(float((100 * cosines_mixed).clamp(min=0).mean()), abs=1e-4)
    assert raw == pytest.approx(float((100 * cosines_mixed).mean()), abs=1e-4)
    assert clamped > raw


def test_textual_alignment_long_prompt_is_truncated_to_clip_context(clip, video):
    long_prompt = "a very long prompt " * 40
    model, processor = clip
    tokens = processor(text=[long_prompt], truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        text = F.normalize(model.get_text_features(**tokens).pooler_output[0], dim=-1)
    expected = float((100 * embed_images(video, model, processor) @ text).mean())
    assert textual_alignment(video, long_prompt, *clip, clamp=False) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    "frames, message",
    [
        (torch.rand(4, 32, 32), "frames, 3, height, width"),  # no channel axis
        (torch.rand(4, 1, 32, 32), "frames, 3, height, width"),  # gray
        ((torch.rand(4, 3, 32, 32) * 255).to(torch.uint8), "divide uint8 frames by 255"),
        (torch.rand(4, 3, 32, 32) * 255, r"values in \[0, 1\]"),
    ],
)
def test_bad_frames_raise_user_error(clip, frames, message):
    with pytest.raises(UserError, match=message):
        textual_alignment(frames, "a cat", *clip)


def test_empty_prompt_raises_user_error(clip, video):
    with pytest.raises(UserError, match="prompt"):
        textual_alignment(video, "  ", *clip)


# -- loading and options ---------------------------------------------------------------------------


def test_missing_local_clip_model_is_a_user_error(tmp_path):
    missing = tmp_path / "no-clip-here"
    with pytest.raises(UserError, match="--clip-model PATH") as info:
        load_clip(str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_uncached_hub_clip_model_offline_is_a_user_error():
    with pytest.raises(UserError, match="'depthvid-tests/no-such-clip'.*--clip-model PATH"):
        load_clip("depthvid-tests/no-such-clip")


def test_missing_depth_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--depth-model"):
        load_depth_model(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    "field, value, message",
    [("pairs", "neighbours", "pairs='neighbours'"), ("num_frames", 0, "--frames 0"), ("depth_size", 2, "--depth-size 2"),
     ("device", "gpu0", "--device 'gpu0'")],
)
def test_bad_options_raise_user_error(field, value, message):
    with pytest.raises(UserError, match=message):
        EvalOptions(**{field: value})


# -- depth fidelity ----------------------------------------------------------------------------------


def test_depth_errors_are_scale_and_shift_invariant():
    torch.manual_seed(0)
    source = torch.rand(3, 1, 8, 8, dtype=torch.float64) + 0.5
    perfect = depth_errors(source.clone(), source)
    assert perfect["rmse"] == pytest.approx(0, abs=1e-12)
    assert perfect["abs_rel"] == pytest.approx(0, abs=1e-12)
    assert perfect["pearson"] == pytest.approx(1, abs=1e-12)
    # a different scale and shift per frame is aligned away
    scales, shifts = torch.tensor([0.5, 3.0, 10.0]).double(), torch.tensor([-1.0, 0.0, 7.0]).double()
    affine = depth_errors(source * scales[:, None, None, None] + shifts[:, None, None, None], source)
    assert affine == pytest.approx(perfect, abs=1e-9)


def test_depth_errors_match_a_direct_least_squares_fit():
    torch.manual_seed(1)
    source = torch.rand(2, 1, 6, 5).double() + 0.2
    edited = source + 0.3 * torch.rand(2, 1, 6, 5).double()
    rmse, abs_rel, corr = [], [], []
    scaled = (source - source.min()) / (source.max() - source.min())
    for s, e in zip(scaled.flatten(1), edited.flatten(1)):
        design = torch.stack([e, torch.ones_like(e)], dim=1)
        coefficients = torch.linalg.lstsq(design, s[:, None]).solution
        aligned = (design @ coefficients)[:, 0]
        rmse.append(((aligned - s) ** 2).mean().sqrt())
        valid = s > 0.05
        abs_rel.append(((aligned - s).abs() / s)[valid].mean())
        corr.append(torch.corrcoef(torch.stack([e, s]))[0, 1])
    got = depth_errors(edited, source)
    assert got["rmse"] == pytest.approx(float(torch.stack(rmse).mean()), rel=1e-6)
    assert got["abs_rel"] == pytest.approx(float(torch.stack(abs_rel).mean()), rel=1e-6)
    assert got["pearson"] == pytest.approx(float(torch.stack(corr).mean()), rel=1e-6)
    assert 0 < got["rmse"] and got["pearson"] < 1


def test_depth_errors_of_reversed_depth_and_constant_maps():
    torch.manual_seed(2)
    source = torch.rand(2, 1, 4, 4) + 0.5
    assert depth_errors(-source, source)["pearson"] == pytest.approx(-1, abs=1e-9)
    flat = torch.ones(2, 1, 4, 4)
    # a constant edited map cannot follow a varying source: the best fit is the source's mean
    constant = depth_errors(flat, source)
    assert constant["pearson"] == 0 and constant["rmse"] > 0
    assert depth_errors(flat, 2 * flat) == {"rmse": 0.0, "abs_rel": 0.0, "pearson": 1.0}


def test_depth_errors_shape_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="same shape"):
        depth_errors(torch.rand(2, 1, 4, 4), torch.rand(3, 1, 4, 4))


@pytest.fixture(scope="module")
def depth_model(tiny_pipeline_dir):
    return load_depth_model(str(tiny_pipeline_dir), device="cpu")


def test_depth_fidelity_of_the_source_against_itself_is_perfect(depth_model, video):
    errors = depth_fidelity(video, video.clone(), *depth_model, depth_size=16)
    assert errors["rmse"] == pytest.approx(0, abs=1e-6)
    assert errors["abs_rel"] == pytest.approx(0, abs=1e-6)
    assert errors["pearson"] == pytest.approx(1, abs=1e-6)


def test_depth_fidelity_sees_a_different_scene(depth_model, video):
    torch.manual_seed(3)
    other = torch.rand_like(video)
    errors = depth_fidelity(other, video, *depth_model, depth_size=16)
    assert errors["rmse"] > 1e-3 and errors["pearson"] < 0.999


def test_depth_fidelity_frame_count_mismatch_is_a_user_error(depth_model, video):
    with pytest.raises(UserError, match="as many frames"):
        depth_fidelity(video[:3], video, *depth_model)
