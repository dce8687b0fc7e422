"""Video clips: frame sampling on clips whose frames carry their own index (ffv1/mkv and
mpeg4/mp4, encoded with PyAV), bad clips as counted skips, the HDF5 video items of a build."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mmloom.errors import MmloomError
from mmloom.processing.media_spec import MediaError
from mmloom.processing.video import Frames, VideoSpec, fps_indices, load_video, uniform_indices
from video_data import build_video_data, data_params, index_of, truncate, video_record, write_clip


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {"mkv": write_clip(root / "c30.mkv", 30, "ffv1"), "mp4": write_clip(root / "c30.mp4", 30, "mpeg4"),
            "short": write_clip(root / "c3.mkv", 3, "ffv1")}


@pytest.mark.parametrize("kind", ["mkv", "mp4"])
def test_num_frames_decodes_exactly_the_uniform_frames(clips, kind):
    frames = load_video(clips[kind], num_frames=8)
    expected = np.linspace(0, 29, 8, dtype=int).tolist()
    assert expected == [0, 4, 8, 12, 16, 20, 24, 29]
    assert list(frames.indices) == expected
    assert frames.array.shape == (8, 64, 64, 3) and frames.array.dtype == np.uint8
    assert [index_of(f) for f in frames.array] == expected  # the decoded pictures are those frames
    assert frames.seconds == pytest.approx([i / 10 for i in expected])


@pytest.mark.parametrize("kind", ["mkv", "mp4"])
def test_fps_takes_the_frame_at_each_time_then_at_most_max_frames(clips, kind):
    # 30 frames at 10 fps (0.0 .. 2.9 s); 2 fps: frames at 0, 0.5, 1.0, 1.5, 2.0, 2.5 s; 4 of those 6 taken
    # uniformly: linspace(0, 5, 4, int) = 0, 1, 3, 5
    frames = load_video(clips[kind], fps=2, max_frames=4)
    assert [round(s, 3) for s in frames.seconds] == [0.0, 0.5, 1.5, 2.5]
    assert [index_of(f) for f in frames.array] == [0, 5, 15, 25] == list(frames.indices)
    every = load_video(clips[kind], fps=2, max_frames=100)
    assert [index_of(f) for f in every.array] == [0, 5, 10, 15, 20, 25]


def test_sampling_rules():
    assert uniform_indices(3, 8) == [0, 1, 2] and uniform_indices(30, 1) == [0]
    # a frame at or after each time: irregular times (variable frame rate) take the next frame
    assert fps_indices([0.0, 0.3, 0.45, 0.9, 1.2], fps=2, max_frames=10) == [0, 3, 4]
    assert fps_indices([0.0, 0.3, 0.45, 0.9, 1.2], fps=2, max_frames=2) == [0, 4]


def test_a_short_clip_keeps_all_its_frames(clips):
    frames = load_video(clips["short"], num_frames=8)
    assert [index_of(f) for f in frames.array] == [0, 1, 2] and len(frames) == 3


def test_bad_clips_raise_by_reason(tmp_path, clips):
    with pytest.raises(MediaError) as err:
        load_video(tmp_path / "nope.mkv", num_frames=8)
    assert err.value.reason == "missing_video"
    for kind in ("mkv", "mp4"):  # truncated halfway: mp4 loses its index, mkv its last frames
        with pytest.raises(MediaError) as err:
            load_video(truncate(clips[kind], tmp_path / f"half.{kind}"), num_frames=8)
        assert err.value.reason == "bad_video", kind
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(MediaError) as err:
        load_video(tmp_path / "junk.mp4", num_frames=8)
    assert err.value.reason == "bad_video" and "junk.mp4" in str(err.value)
    with pytest.raises(MmloomError):
        load_video(clips["mkv"], fps=2)  # fps without max_frames


def test_spec_counts_blank_and_dummy(clips):
    from mmloom.processing.image import ImageTransform

    rule = {"type": "video_frames", "grid": 4, "frame_tokens": 4, "newline": "one_token"}
    spec = VideoSpec(num_frames=8, count_rule=rule, transform=ImageTransform(image_size=32))
    frames = spec.load(clips["mkv"])
    assert spec.token_counts([frames, spec.load(clips["short"])]) == [8 * 4 + 1, 3 * 4 + 1]
    inputs = spec.encoder_inputs([frames, clips["short"]])
    assert inputs["pixel_values"].shape == (11, 3, 32, 32) and inputs["video_frames"].tolist() == [8, 3]
    assert spec.token_counts([None, None], inputs) == [33, 13]
    dummy, tokens = spec.dummy()
    assert dummy["pixel_values"].shape == (1, 3, 32, 32) and tokens == 5
    blank = spec.blank(frames)
    assert isinstance(blank, Frames) and blank.array.shape == frames.array.shape
    assert (blank.array == blank.array[:, :1, :1]).all()  # one colour per frame
    assert spec.with_settings(count_rule={**rule, "newline": "frame"}).token_counts([frames]) == [8 * 5]
    assert spec.with_settings(count_rule={**rule, "newline": "no_token"}).token_counts([frames]) == [8 * 4]


def test_build_writes_video_items_and_counts_bad_clips(tmp_path, clips, capsys):
    videos = tmp_path / "videos"
    write_clip(videos / "a.mkv", 30, "ffv1")
    write_clip(videos / "b.mp4", 30, "mpeg4")
    write_clip(videos / "s.mkv", 3, "ffv1")
    truncate(videos / "a.mkv", videos / "cut.mkv")
    (videos / "junk.mp4").write_bytes(b"junk" * 50)
    good = [video_record("a.mkv"), video_record(["b.mp4", "s.mkv"], "<video> then <video>: which is longer?"),
            {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]
    bad = [video_record("cut.mkv"), video_record("missing.mkv"), video_record("junk.mp4"),
           video_record("a.mkv", "No placeholder."), video_record(["a.mkv", "b.mp4"])]
    assert build_video_data(tmp_path, good + bad) == 0
    params = data_params(tmp_path)
    assert params["post-process"]["skipped"] == {"missing_video": 1, "bad_video": 2, "video_token_mismatch": 2}
    video = params["modalities"]["video"]
    rule = {"type": "video_frames", "grid": 4, "frame_tokens": 4, "newline": "one_token"}  # 16 patches, stride 2
    assert video["token_count"] == rule and video["sampling"] == {"num_frames": 4}
    assert video["clips"] == 3 and video["samples_with_video"] == 2
    assert video["video_tokens"] == 2 * (4 * 4 + 1) + (3 * 4 + 1)
    with h5py.File(tmp_path / "h5" / "data-00000.h5") as f:
        assert {"video_path", "video_span", "video_offset"} <= set(f)
        assert f["video_offset"][:].tolist() == [0, 1, 3, 3]
        assert f["video_path"][:].tolist() == [b"a.mkv", b"b.mp4", b"s.mkv"]
        assert [int(n) for _, n in f["video_span"][:]] == [17, 17, 13]
    spec = VideoSpec.from_data(params)
    assert spec.count_rule == rule and spec.num_frames == 4 and spec.token_id == video["token_id"]
    # --strict stops at the first bad clip, naming file, line and reason
    assert build_video_data(tmp_path, good + bad, name="strict", strict=True) != 0
    err = capsys.readouterr().err
    assert "part0.jsonl:4: bad_video" in err and "cut.mkv" in err


def test_video_settings_are_checked(tmp_path):
    from pydantic import ValidationError

    from mmloom.data.build_config import DatasetConfig

    with pytest.raises(ValidationError, match="not both"):
        DatasetConfig(num_patches=16, video={"num_frames": 8, "fps": 1, "max_frames": 4})
    with pytest.raises(ValidationError, match="needs dataset.video.max_frames"):
        DatasetConfig(num_patches=16, video={"fps": 1})
    with pytest.raises(ValidationError, match="square patch grid"):
        DatasetConfig(num_patches=17, video={})
    with pytest.raises(ValidationError, match="vision encoder"):
        DatasetConfig(audio={"feature_extractor": {}}, video={})
    assert DatasetConfig(num_patches=16, video={}).video.num_frames == 8


def _decode_in_child(path, queue):
    queue.put(len(load_video(path, num_frames=4)))


def test_a_process_that_decoded_can_still_fork_decoders(tmp_path):
    """Decoding here, then in forked processes (the data build's workers, DataLoader workers): swscale's
    thread pool, once started, made every forked conversion hang; mmloom converts on one thread."""
    import multiprocessing as mp

    clip = write_clip(tmp_path / "a.mp4", 12, "mpeg4", size=32)
    assert len(load_video(clip, num_frames=4)) == 4
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_decode_in_child, args=(clip, queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    alive = [child.is_alive() for child in children]
    for child in children:
        child.kill()
    assert alive == [False, False] and sorted(queue.get(timeout=5) for _ in children) == [4, 4]
