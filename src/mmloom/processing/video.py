"""Video clips for every stage: frames sampled uniformly and decoded once per clip with PyAV
(FFmpeg bundled in its wheels), each frame turned into `pixel_values` by the image transform of
the vision encoder, which runs the frames (`VideoSpec.encoder` is `vision`).

Sampling (LLaVA-NeXT's `load_video`, LLaVA-Video's `fps` option):

- `num_frames=k`: frames `np.linspace(0, n - 1, k, dtype=int)` of the clip's `n` frames (counted by
  demuxing its packets, without decoding); a clip of `n <= k` frames keeps all of them;
- `fps=r` with `max_frames=m`: the first frame at or after each `i / r` seconds (by presentation
  time, from the clip's first frame), then `m` of those taken uniformly the same way.

Feature tokens per clip (`mmloom.model.callbacks.video_token_count`, the rule the model's
`FramePool` gives): `F * t` (`newline: no_token`), `F * t + 1` (`one_token`) or `F * (t + 1)`
(`frame`), with `t = ceil(g / stride)^2` pooled features per frame of a `g x g` patch grid.

Bad input raises :class:`~mmloom.processing.media_spec.MediaError` with a `reason` the HDF5 build
counts: `missing_video` (no such file), `bad_video` (not a video FFmpeg decodes, or a clip that ends
before the duration its container declares: a truncated file), `empty_video` (no decodable frame).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmloom.errors import MmloomError
from mmloom.processing.media_spec import MediaError, MediaSpec

if TYPE_CHECKING:  # numpy is imported where arrays are made: `mmloom --help` reads the specs without it
    pass

NEWLINE_POSITIONS = ("no_token", "one_token", "frame")  # LLaVA-NeXT's mm_newline_position
POOL_MODES = ("bilinear", "average", "max")  # LLaVA-NeXT's mm_spatial_pool_mode


def video_error(path: str | os.PathLike, reason: str, detail: str) -> MediaError:
    """The MediaError of a video file that cannot be used (`reason`: one of `VideoSpec.reasons`)."""
    return MediaError(path, reason, detail, f"cannot use video {str(path)!r}: {detail}")


@dataclass(frozen=True)
class Frames:
    """The sampled frames of one clip: `array` (F, H, W, 3) uint8 RGB, their `indices` among the
    clip's frames (presentation order, from 0) and their presentation times `seconds` (from the
    clip's first frame)."""

    array: Any
    indices: tuple[int, ...] = field(default=())
    seconds: tuple[float, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.array.shape[0])


def uniform_indices(n: int, k: int) -> list[int]:
    """`k` of `n` positions taken uniformly, first and last included: `np.linspace(0, n - 1, k,
    dtype=int)` (LLaVA-NeXT's `load_video`); all `n` when `n <= k`."""
    import numpy as np

    if n <= k:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, k, dtype=int)]


def fps_indices(seconds: Sequence[float], fps: float, max_frames: int) -> list[int]:
    """Frames at `fps`: for each `i / fps` s (i = 0, 1, ... up to the last frame's time) the first
    frame at or after it, then at most `max_frames` of those taken uniformly (:func:`uniform_indices`).
    `seconds` are the frames' presentation times in order, from 0."""
    import bisect

    picked: list[int] = []
    if not seconds:
        return picked
    step, i = 1.0 / float(fps), 0
    while i * step <= seconds[-1] + 1e-9:
        k = bisect.bisect_left(seconds, i * step - 1e-9)
        if k < len(seconds) and (not picked or k != picked[-1]):
            picked.append(k)
        i += 1
    return [picked[j] for j in uniform_indices(len(picked), int(max_frames))]


def load_video(path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
               max_frames: int | None = None) -> Frames:
    """Decode the sampled frames of the clip at `path` (its first video stream) as RGB: `num_frames`
    uniformly, or one per `1 / fps` s, at most `max_frames` (see the module docs). The packets are
    demuxed once to count and time the frames, then decoded once; only the sampled frames are converted.

    Raises MediaError: `missing_video`, `bad_video` (FFmpeg cannot open or decode it, it has no video
    stream, or its frames end before the duration it declares), `empty_video` (no decodable frame);
    MmloomError when neither `num_frames` nor `fps` with `max_frames` is given."""
    import av
    import numpy as np

    if (num_frames is None) == (fps is None) or (fps is not None and max_frames is None):
        raise MmloomError("video sampling needs num_frames, or fps with max_frames")
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise video_error(p, "missing_video", "file not found")
    try:
        with av.open(p) as container:
            if not container.streams.video:
                raise video_error(p, "bad_video", "no video stream")
            stream = container.streams.video[0]
            base = stream.time_base
            pts = sorted(int(packet.pts) for packet in container.demux(stream)
                         if packet.size and packet.pts is not None)
            if not pts:
                raise video_error(p, "empty_video", "no decodable frame")
            seconds = [float((t - pts[0]) * base) for t in pts]
            wanted = (uniform_indices(len(pts), int(num_frames)) if num_frames is not None
                      else fps_indices(seconds, float(fps), int(max_frames)))
            _check_complete(p, container, stream, pts)
            container.seek(0)
            keep, frames, times, decoded = set(wanted), [], [], 0
            for frame in container.decode(stream):
                if decoded in keep:
                    frames.append(_rgb(frame))
                    times.append(seconds[decoded] if decoded < len(seconds) else float(frame.time or 0.0))
                decoded += 1
                if decoded > wanted[-1]:
                    break
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise video_error(p, "bad_video", f"not a decodable video ({str(exc).strip() or type(exc).__name__})") from None
    if not frames:
        raise video_error(p, "empty_video", "no decodable frame")
    if decoded <= wanted[-1]:
        raise video_error(p, "bad_video", f"{decoded} of its {len(pts)} frames decode (a damaged file)")
    indices = tuple(i for i in wanted if i < decoded)
    return Frames(np.stack(frames), indices, tuple(times))


def _rgb(frame):
    """A decoded frame as (H, W, 3) uint8 RGB, converted by swscale on this thread only: its thread pool,
    once started in a process, makes the conversion hang in every process forked from it afterwards (the
    data build's workers, DataLoader workers). PyAV before 13 has no `threads` option (nor the pool)."""
    try:
        return frame.to_ndarray(format="rgb24", threads=1)
    except TypeError:
        return frame.to_ndarray(format="rgb24")


def _check_complete(path: str, container, stream, pts: list[int]) -> None:
    """Refuse (bad_video) a clip whose frames end more than a frame before the duration its stream
    declares (the container's, for a file with one stream): a truncated download or copy."""
    base = stream.time_base
    last = float((pts[-1] - pts[0]) * base)
    step = float((pts[1] - pts[0]) * base) if len(pts) > 1 else 0.0
    if stream.duration is not None:
        declared = float(stream.duration * base)
    elif container.duration is not None and len(container.streams) == 1:
        declared = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        return
    if declared - (last + step) > step + 1e-3:
        raise video_error(path, "bad_video", f"frames end at {last + step:.3f} s of the {declared:.3f} s it declares "
                                             "(a truncated file)")


def frame_images(frames: Frames) -> list:
    """The frames as PIL RGB images (what image transforms take)."""
    from PIL import Image

    return [Image.fromarray(frame) for frame in frames.array]


@dataclass(frozen=True)
class VideoSpec(MediaSpec):
    """Video clips (`video`), run by the vision encoder: frames sampled with :func:`load_video`
    (`num_frames`, or `fps` with `max_frames`), each frame through `transform` (the images' transform:
    an :class:`~mmloom.processing.image.ImageTransform`, a transformers image processor or a callable),
    stacked to `pixel_values` (sum of frames, 3, H, W) with `video_frames` (N_clips,) frames per clip.

    Counting (`count_rule`, `{"type": "video_frames", "frame_tokens": t, "newline": ...}`): the model's
    `FramePool` pools each frame's `g x g` patch grid to `t = ceil(g / stride)^2` features and adds its
    learned newline per `newline` (:func:`mmloom.model.callbacks.video_token_count`). `pool` is
    `{"mode": bilinear|average|max, "stride": s}` (LLaVA-NeXT's `mm_spatial_pool_mode` / `_stride`).
    """

    noun = "video"
    item_noun = "video clip"
    processor_arg = "videos"
    folder_keys = ("video_dir", "video_data_dir")
    build_key = "video"
    reasons = ("bad_video_path", "missing_video", "bad_video", "empty_video", "video_token_mismatch")
    baseline = "blank-videos"
    cli_help = {"item": "a video clip to talk about (any format FFmpeg decodes; default: none)",
                "dir": "root of the question videos (default: the questions file's folder)",
                "baseline": "replace every frame of every clip by its mean colour (checks that answers come from "
                            "the video)"}
    default_placeholder = "<video>"
    token_offset = 2
    hf_processor_loader = "AutoImageProcessor"
    shared_encoder = "vision"

    modality: str = "video"
    placeholder: str = "<video>"
    record_key: str = "video"
    num_frames: int | None = 8
    fps: float | None = None
    max_frames: int | None = None
    count_rule: dict[str, Any] | None = None
    pool: dict[str, Any] | None = None
    transform: Any = None
    dtype: Any = None

    @property
    def encoder_processor(self) -> Any:
        return self.transform

    @property
    def sampling(self) -> dict[str, Any]:
        """How frames are taken: `{"num_frames": k}` or `{"fps": r, "max_frames": m}`."""
        if self.fps is not None:
            return {"fps": self.fps, "max_frames": self.max_frames}
        return {"num_frames": self.num_frames}

    def check_encoder(self, encoder: Any, where: str) -> None:
        """Refuse a model whose video pooling (`encoder`: its `FramePool`, `MultimodalModel.pool("video")`)
        counts a clip's tokens otherwise than `where` (the data) was built with."""
        rule = encoder.count_rule() if hasattr(encoder, "count_rule") else None
        pool = {"mode": getattr(encoder, "mode", None), "stride": getattr(encoder, "stride", None)}
        if rule != self.count_rule or (self.pool is not None and pool != dict(self.pool)):
            raise MmloomError(
                f"video feature tokens are counted differently: {where} was built with {self.count_rule} and pooling "
                f"{self.pool} (dataset.video) but the model gives {rule} and pooling {pool} (model.video)")

    def load(self, path: str | os.PathLike) -> Frames:
        """The sampled frames of the clip at `path` (:func:`load_video`)."""
        return load_video(path, **self.sampling)

    def frames(self, item) -> Frames:
        """An item as frames: `Frames` as given, an array (F, H, W, 3) uint8 wrapped, paths decoded."""
        if isinstance(item, Frames):
            return item
        if isinstance(item, (str, os.PathLike)):
            return self.load(item)
        import numpy as np

        array = np.asarray(item)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise MmloomError(f"a video clip is an array (frames, height, width, 3), got shape {tuple(array.shape)}")
        return Frames(array.astype(np.uint8, copy=False), tuple(range(len(array))))

    def token_counts(self, items: Sequence[Any], inputs: dict[str, Any] | None = None) -> list[int]:
        """Feature tokens per clip from its frame count (`inputs["video_frames"]` when given).
        Raises MmloomError without a count rule."""
        from mmloom.model.callbacks import video_token_count

        if self.count_rule is None:
            raise MmloomError(f"no feature-token count for {self.modality}: build the processor with from_model()")
        if inputs is not None and inputs.get("video_frames") is not None:
            frames = [int(f) for f in inputs["video_frames"]]
        else:
            frames = [len(self.frames(item)) for item in items]
        return [video_token_count(f, self.count_rule["frame_tokens"], self.count_rule["newline"]) for f in frames]

    def encoder_inputs(self, items: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
        """`{"pixel_values": (sum of frames, 3, H, W), "video_frames": (N_clips,) long}`: every frame of
        every clip through the image transform, clips in order."""
        import torch

        from mmloom.processing.image import ImageSpec

        if self.transform is None:
            raise MmloomError(f"no image processor for {self.modality} frames")
        clips = [self.frames(item) for item in items]
        images = ImageSpec(transform=self.transform, dtype=self.dtype)
        pixel_values = images.encoder_inputs([image for clip in clips for image in frame_images(clip)],
                                             **kwargs)["pixel_values"]
        return {"pixel_values": pixel_values, "video_frames": torch.tensor([len(c) for c in clips], dtype=torch.long)}

    def dummy(self) -> tuple[dict[str, Any], int]:
        """One zero frame of the transform's size and its feature tokens: keeps the vision encoder and
        the newline of `FramePool` in every micro-batch (DDP/FSDP).
        Raises MmloomError when the transform has no `image_size`."""
        import torch

        size = int(getattr(self.transform, "image_size", 0) or 0)
        if size <= 0:
            raise MmloomError("image_transform has no image_size: cannot make the dummy video frame")
        dtype = self.dtype if self.dtype is not None else torch.float32
        (tokens,) = self.token_counts([None], {"video_frames": [1]})
        return {"pixel_values": torch.zeros(1, 3, size, size, dtype=dtype),
                "video_frames": torch.ones(1, dtype=torch.long)}, tokens

    def blank(self, item) -> Frames:
        """Every frame replaced by its mean colour (the frame count, size and times kept)."""
        import numpy as np

        clip = self.frames(item)
        means = clip.array.reshape(len(clip), -1, 3).mean(axis=1).round().astype(np.uint8)
        return Frames(np.broadcast_to(means[:, None, None, :], clip.array.shape).copy(), clip.indices, clip.seconds)

    # --------------------------------------------------------------------- data_params.json
    def params(self, counts: dict[str, int]) -> dict[str, Any]:
        """`modalities.video` of data_params.json: placeholder and id, sampling, the count rule and
        pooling the clips were counted with, and the build's `counts` (`samples`, `items`,
        `tokens`)."""
        return {
            "placeholder": self.placeholder,
            "token_id": self.token_id,
            "sampling": self.sampling,
            "token_count": self.count_rule,
            "pool": self.pool,
            "samples_with_video": counts.get("samples", 0),
            "clips": counts.get("items", 0),
            "video_tokens": counts.get("tokens", 0),
        }

    @classmethod
    def summary_row(cls, recorded: dict[str, Any]) -> tuple[str, int]:
        return (f"with video ({recorded['clips']:,} clips, {recorded['video_tokens']:,} video tokens)",
                recorded["samples_with_video"])

    @classmethod
    def from_processor(cls, modality: str, encoder_processor: Any, *, placeholder: str, token_id: int | None = None,
                       count: Any = None, anyres: dict[str, Any] | None = None, record_key: str | None = None,
                       sampling: dict[str, Any] | None = None) -> VideoSpec:
        sampling = dict(sampling or {"num_frames": cls.num_frames})
        return cls(modality=modality, placeholder=placeholder, record_key=record_key or "video", token_id=token_id,
                   transform=encoder_processor, count_rule=count, num_frames=sampling.get("num_frames"),
                   fps=sampling.get("fps"), max_frames=sampling.get("max_frames"))

    @classmethod
    def from_build_config(cls, dataset) -> VideoSpec | None:
        """The clips of a data build: its `dataset.video` section (`mmloom.data.build_config.VideoDataConfig`;
        None: the build reads no video); frames of `dataset.num_patches` patches each."""
        video = getattr(dataset, cls.build_key, None)
        if video is None:
            return None
        return cls(placeholder=video.video_token, record_key=video.video_key,
                   folder=Path(video.video_dir) if video.video_dir is not None else None,
                   num_frames=video.num_frames, fps=video.fps, max_frames=video.max_frames,
                   count_rule=video.token_count(dataset.num_patches), pool=video.pool.model_dump())

    @classmethod
    def from_data(cls, data_params: dict[str, Any], folder: str | os.PathLike | None = None, **settings: Any
                  ) -> VideoSpec | None:
        """The clips of a built data folder (`modalities.video` of data_params.json; None: no video),
        read from `folder`, else the build's `dataset.video.video_dir`; `settings` add the transform
        and dtype. Raises MmloomError when `modalities.video` lacks the sampling or the count rule."""
        params = (data_params.get("modalities") or {}).get("video")
        if params is None:
            return None
        try:
            sampling, rule = dict(params["sampling"]), dict(params["token_count"])
        except KeyError as exc:
            raise MmloomError(f"data_params.json modalities.video lacks {exc}: rebuild the data") from None
        built = (data_params.get("dataset") or {}).get(cls.build_key) or {}
        folder = folder if folder is not None else built.get(cls.folder_keys[0])
        return cls(placeholder=params.get("placeholder", cls.default_placeholder),
                   record_key=built.get("video_key", "video"), token_id=params.get("token_id"),
                   folder=Path(folder) if folder is not None else None, num_frames=sampling.get("num_frames"),
                   fps=sampling.get("fps"), max_frames=sampling.get("max_frames"), count_rule=rule,
                   pool=params.get("pool"), **settings)
