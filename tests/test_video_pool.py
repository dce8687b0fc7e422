"""FramePool: per-frame spatial pooling of video features and the learned newline, whose token
count is the rule the data build and the processor count with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from mmloom.errors import MmloomError
from mmloom.model.callbacks import (
    FramePool,
    callback_from_dict,
    callback_to_dict,
    video_frame_tokens,
    video_token_count,
)
from mmloom.processing.video import VideoSpec


@pytest.mark.parametrize("grid", [4, 5, 27])
def test_bilinear_pooling_is_llava_onevisions(grid):
    torch.manual_seed(0)
    features = torch.randn(6, grid * grid, 8)
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=grid * 14, patch_size=14))
    expected = LlavaOnevisionModel.apply_pooling(SimpleNamespace(config=config), features)
    pooled = FramePool(8, grid, stride=2, mode="bilinear").pool(features)
    assert pooled.shape == (6, video_frame_tokens(grid, 2), 8) == expected.shape
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    assert video_frame_tokens(27, 2) == 196  # LLaVA-OneVision: 729 patches -> 14 x 14


def test_average_and_max_pool_each_window():
    x = torch.arange(25, dtype=torch.float32).reshape(1, 25, 1)  # one 5 x 5 frame, one channel
    avg = FramePool(1, 5, stride=2, mode="average").pool(x).flatten().tolist()
    mx = FramePool(1, 5, stride=2, mode="max").pool(x).flatten().tolist()
    assert len(avg) == len(mx) == 9  # ceil(5 / 2)^2: the last row and column keep what is left
    assert avg[0] == (0 + 1 + 5 + 6) / 4 and avg[2] == (4 + 9) / 2 and avg[8] == 24
    assert mx[0] == 6 and mx[2] == 9 and mx[4] == 18 and mx[8] == 24


@pytest.mark.parametrize("newline", ["no_token", "one_token", "frame"])
@pytest.mark.parametrize("mode", ["bilinear", "average", "max"])
def test_token_count_is_the_rule_of_build_and_processor(newline, mode):
    pool = FramePool(8, 5, stride=2, mode=mode, newline=newline)
    frames = torch.tensor([3, 1, 8])
    clips = pool({"video_frames": frames}, torch.randn(12, 25, 8))
    counts = [video_token_count(int(f), 9, newline) for f in frames]
    assert [c.shape for c in clips] == [(n, 8) for n in counts] and pool.item_counts({"video_frames": frames}) == counts
    # the data build's spec counts the same with the rule the pool reports
    spec = VideoSpec(count_rule=pool.count_rule())
    assert spec.token_counts([None] * 3, {"video_frames": frames}) == counts
    if newline == "one_token":  # one newline after the last frame, none between frames
        assert torch.equal(clips[0][-1], pool.newline) and len(clips[0]) == 3 * 9 + 1
    if newline == "frame":
        assert all(torch.equal(clips[2][k * 10 + 9], pool.newline) for k in range(8))
    if newline != "no_token":  # the newline is learned: it gets a gradient
        sum(c.sum() for c in clips).backward()
        assert pool.newline.grad is not None and pool.newline.grad.abs().sum() > 0


def test_frame_pool_saves_and_refuses_bad_input():
    pool = FramePool(8, 4, stride=2, mode="max", newline="frame")
    again = callback_from_dict(callback_to_dict(pool))
    assert isinstance(again, FramePool) and again.to_dict() == pool.to_dict() == {
        "hidden_size": 8, "grid": 4, "stride": 2, "mode": "max", "newline": "frame"}
    with pytest.raises(MmloomError, match="17 features each"):
        pool({"video_frames": torch.tensor([2])}, torch.randn(2, 17, 8))  # a kept CLS
    with pytest.raises(MmloomError, match="add up to 3"):
        pool({"video_frames": torch.tensor([3])}, torch.randn(2, 16, 8))
    with pytest.raises(MmloomError, match="pooling mode"):
        FramePool(8, 4, mode="median")
    with pytest.raises(MmloomError, match="newline"):
        FramePool(8, 4, newline="grid")


@pytest.mark.parametrize("stride,newline", [(2, "one_token"), (3, "frame"), (1, "no_token")])
def test_the_build_records_the_rule_of_the_pool_it_names(stride, newline):
    from mmloom.data.build_config import DatasetConfig

    dataset = DatasetConfig(num_patches=25, video={"pool": {"mode": "max", "stride": stride}, "newline": newline})
    assert dataset.video.token_count(25) == FramePool(8, 5, stride=stride, mode="max", newline=newline).count_rule()
