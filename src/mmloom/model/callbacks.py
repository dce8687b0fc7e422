"""Named, serializable encoder callbacks: feature selection, LLaVA-NeXT "anyres" packing, audio
and video-frame pooling.

A callback saved with the model is rebuilt from `{"type": name, **params}`; arbitrary
callables still work but cannot be rebuilt (the model warns on save).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from mmloom.errors import MmloomError
from mmloom.model.outputs import output_features, replace_features

CALLBACK_REGISTRY: dict[str, type] = {}

# Strategy names: LLaVA spells them patch/cls_patch, transformers default/full.
DROP_CLS = {"patch", "default"}
KEEP_CLS = {"cls_patch", "full"}


def register_callback(cls):
    """Class decorator: register a :class:`SerializableCallback` under its ``callback_type`` so that
    :func:`callback_from_dict` can rebuild it from a saved config."""
    CALLBACK_REGISTRY[cls.callback_type] = cls
    return cls


class SerializableCallback:
    """Base for callbacks that save as `{"type": ..., **params}` in the model config."""

    callback_type: str = ""
    # Extra kwargs the encoder module must receive (e.g. output_hidden_states).
    module_kwargs: dict[str, Any] = {}
    # Input names this callback reads from the encoder inputs (not passed to the module).
    input_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this callback (saved next to ``"type"``)."""
        raise NotImplementedError

    def output_dim(self, hidden_size: int) -> int:
        """Feature width D' the callback gives for `hidden_size`-wide encoder output (default: the same)."""
        return hidden_size


def callback_from_dict(spec: dict[str, Any] | None):
    """Rebuild a callback from its saved form (:func:`callback_to_dict`); None stays None. Raises
    MmloomError when the type is not registered (an arbitrary callable was saved: pass it again when
    loading)."""
    if spec is None:
        return None
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in CALLBACK_REGISTRY:
        raise MmloomError(
            f"cannot rebuild callback {kind!r} from the saved config: it was an arbitrary callable. "
            "Pass it again when loading, e.g. MultimodalModel.from_pretrained(dir, "
            "callbacks={'vision': {'postprocess_module_callback': my_fn}})"
        )
    return CALLBACK_REGISTRY[kind](**spec)


def callback_to_dict(callback) -> dict[str, Any] | None:
    """The saved form of a callback, or `{"type": "<callable>"}` when it cannot be saved."""
    if callback is None:
        return None
    if isinstance(callback, SerializableCallback):
        return {"type": callback.callback_type, **callback.to_dict()}
    return {"type": "<callable>", "repr": getattr(callback, "__qualname__", repr(callback))}


@register_callback
class FeatureSelect(SerializableCallback):
    """Select encoder hidden layer(s) and optionally drop the CLS token (a module callback).

    `layer=-2, strategy="patch"` is LLaVA-1.5's choice; a list of layers concatenates them
    along the feature dimension.

    Raises MmloomError for an unknown strategy (``patch`` / ``cls_patch``, LLaVA's names, or ``default`` /
    ``full``, transformers').
    """

    callback_type = "feature_select"
    module_kwargs = {"output_hidden_states": True}

    def __init__(self, layer: int | list[int] = -2, strategy: str = "patch"):
        if strategy not in DROP_CLS | KEEP_CLS:
            raise MmloomError(
                f"unknown feature select strategy {strategy!r}; use one of {sorted(DROP_CLS | KEEP_CLS)}"
            )
        self.layer = list(layer) if isinstance(layer, (list, tuple)) else int(layer)
        self.strategy = strategy

    @property
    def drops_cls(self) -> bool:
        """Whether the first (CLS) position is dropped: strategy ``patch`` (LLaVA) / ``default``
        (transformers)."""
        return self.strategy in DROP_CLS

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "strategy": self.strategy}

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size * (len(self.layer) if isinstance(self.layer, list) else 1)

    def __call__(self, inputs: dict, output: ModelOutput | tuple) -> ModelOutput | tuple:
        hidden_states = output.hidden_states if isinstance(output, ModelOutput) else output[-1]
        layers = self.layer if isinstance(self.layer, list) else [self.layer]
        selected = [hidden_states[i] for i in layers]  # each (N, L, D)
        if self.drops_cls:
            selected = [h[:, 1:] for h in selected]
        features = torch.cat(selected, dim=-1)  # (N, L', D * len(layers))
        return replace_features(output, features)

    def __repr__(self) -> str:
        return f"FeatureSelect(layer={self.layer!r}, strategy={self.strategy!r})"


def anyres_num_tokens(image_size_hw, image_grid_pinpoints, patch_grid: int, image_size: int) -> int:
    """Feature tokens of one image of (height, width) after anyres packing: the base view, then
    the unpadded high-resolution grid with a newline token after each row."""
    grid_h, grid_w = get_anyres_image_grid_shape(image_size_hw, image_grid_pinpoints, image_size)
    grid = torch.empty(1, grid_h * patch_grid, grid_w * patch_grid)
    rows, cols = unpad_image(grid, torch.tensor(image_size_hw)).shape[1:]
    return patch_grid**2 + rows * (cols + 1)


@register_callback
class AnyresPack(nn.Module, SerializableCallback):
    """LLaVA-NeXT "anyres" packing of projected patch features (a projector callback).

    Expects the vision inputs `pixel_values` flattened to (sum of patches, C, H, W) and
    `image_sizes` (N_images, 2) as (height, width). Per image: the base view's features,
    then the high-resolution grid unpadded to the image's aspect ratio with a learned
    newline embedding after each row. Returns a list of (L_i, D) tensors, one per image.
    """

    callback_type = "anyres_pack"
    input_names = ("image_sizes",)

    def __init__(self, hidden_size: int, image_grid_pinpoints: list[list[int]], patch_grid: int, image_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints]
        self.patch_grid = patch_grid  # feature tokens per side of one view (e.g. 24 for 336/14)
        self.image_size = image_size  # pixels per side of one view
        self.image_newline = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "patch_grid": self.patch_grid,
            "image_size": self.image_size,
        }

    def num_views(self, image_size_hw) -> int:
        """Views (base view + high-resolution tiles) an image of (height, width) is cut into, as
        transformers' LLaVA-NeXT ``image_size_to_num_patches`` counts them."""
        return image_size_to_num_patches(image_size_hw, self.image_grid_pinpoints, self.image_size)

    def num_tokens(self, image_size_hw) -> int:
        """Feature tokens one image of (height, width) produces after packing."""
        return anyres_num_tokens(image_size_hw, self.image_grid_pinpoints, self.patch_grid, self.image_size)

    def forward(self, inputs: dict, output: ModelOutput | tuple) -> ModelOutput | tuple:
        features = output_features(output)  # (sum of views, P*P, D)
        image_sizes = inputs["image_sizes"]
        views_per_image = [self.num_views(size.tolist()) for size in image_sizes]
        packed = []
        for feats, size in zip(torch.split(features, views_per_image), image_sizes, strict=True):
            base, grid = feats[0], feats[1:]  # (P*P, D), (h*w, P*P, D)
            grid_h, grid_w = get_anyres_image_grid_shape(size.tolist(), self.image_grid_pinpoints, self.image_size)
            p = self.patch_grid
            grid = grid.view(grid_h, grid_w, p, p, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
            grid = unpad_image(grid, size)  # (D, rows, cols)
            newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)
            grid = torch.cat([grid, newline], dim=-1).flatten(1).transpose(0, 1)  # (rows*(cols+1), D)
            packed.append(torch.cat([base, grid], dim=0))
        return replace_features(output, packed)


def audio_positions(frames: int, downsample: int) -> int:
    """Encoder positions of `frames` real feature frames: Whisper's convolutions (kernel 3,
    padding 1, strides 1 then 2) give ceil(frames / 2); at least 1."""
    return max(1, -(-int(frames) // int(downsample)))


def audio_token_count(frames: int, downsample: int, stride: int) -> int:
    """Feature tokens of one clip with `frames` real feature frames: its encoder positions
    (`audio_positions`), then groups of `stride` positions (the last group may be partial)."""
    return -(-audio_positions(frames, downsample) // int(stride))


@register_callback
class AudioPool(SerializableCallback):
    """Keep each clip's real (unpadded) encoder positions, then pool or stack them (a module callback).

    Whisper's encoder always takes 30 s of log-mel frames and gives `max_source_positions` (1500)
    positions. Per clip, this callback keeps the first `ceil(frames / downsample)` positions,
    where `frames` is the number of real frames in the feature extractor's mask
    (`feature_attention_mask`, (N, F) with 1 = real audio) and `downsample` the encoder's frame ->
    position ratio (2 for Whisper), then cuts them into groups of `stride` positions:
    `mode="mean"` averages each group (width D), `mode="stack"` concatenates it (width
    stride * D; the last group is zero-padded), as frame-stacking audio LLMs do. 10 s of audio at
    stride 4 are 125 tokens instead of 1500. `layer` picks a hidden layer instead of the final
    output (None: `last_hidden_state`).

    Returns a list of per-clip `(ceil(positions / stride), D')` tensors; the counts follow
    `audio_token_count`, the rule the processor and `mmloom data build` use.

    Raises MmloomError for an unknown mode or a stride or downsample below 1.
    """

    callback_type = "audio_pool"
    input_names = ("feature_attention_mask",)
    MODES = ("mean", "stack")

    def __init__(self, stride: int = 1, mode: str = "mean", downsample: int = 2, layer: int | None = None):
        if mode not in self.MODES:
            raise MmloomError(f"unknown audio pooling mode {mode!r}; use one of {list(self.MODES)}")
        if int(stride) < 1 or int(downsample) < 1:
            raise MmloomError(f"audio pooling stride and downsample must be >= 1, got {stride} and {downsample}")
        self.stride, self.mode, self.downsample = int(stride), mode, int(downsample)
        self.layer = None if layer is None else int(layer)
        self.module_kwargs = {} if self.layer is None else {"output_hidden_states": True}

    def to_dict(self) -> dict[str, Any]:
        return {"stride": self.stride, "mode": self.mode, "downsample": self.downsample, "layer": self.layer}

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size * (self.stride if self.mode == "stack" else 1)

    def frame_counts(self, inputs: dict) -> list[int] | None:
        """Real frames per clip from `feature_attention_mask` (None when the inputs lack it)."""
        mask = inputs.get("feature_attention_mask")
        return None if mask is None else [int(n) for n in torch.as_tensor(mask).reshape(len(mask), -1).sum(-1).tolist()]

    def item_counts(self, inputs: dict) -> list[int] | None:
        """Feature tokens per clip of a batch of encoder inputs (None without the frame mask)."""
        frames = self.frame_counts(inputs)
        return None if frames is None else [audio_token_count(f, self.downsample, self.stride) for f in frames]

    def __call__(self, inputs: dict, output: ModelOutput | tuple) -> list[torch.Tensor]:
        if self.layer is None:
            features = output_features(output)  # (N, P, D)
        else:
            hidden_states = output.hidden_states if isinstance(output, ModelOutput) else output[-1]
            features = hidden_states[self.layer]
        frames = self.frame_counts(inputs)
        n, positions = features.shape[:2]
        if frames is None:
            frames = [positions * self.downsample] * n
        if len(frames) != n:
            raise MmloomError(f"feature_attention_mask has {len(frames)} rows for {n} audio items")
        pooled = []
        for item, count in zip(features, frames, strict=True):
            keep = min(audio_positions(count, self.downsample), positions)
            groups = -(-keep // self.stride)
            item = item[:keep]
            if self.mode == "mean":
                pad = groups * self.stride - keep
                summed = torch.nn.functional.pad(item, (0, 0, 0, pad)).view(groups, self.stride, -1).sum(1)
                sizes = torch.full((groups, 1), float(self.stride), dtype=item.dtype, device=item.device)
                sizes[-1] = float(keep - (groups - 1) * self.stride)
                pooled.append(summed / sizes)  # (groups, D)
            else:
                pad = groups * self.stride - keep
                pooled.append(torch.nn.functional.pad(item, (0, 0, 0, pad)).reshape(groups, -1))  # (groups, stride*D)
        return pooled

    def __repr__(self) -> str:
        return f"AudioPool(stride={self.stride}, mode={self.mode!r}, downsample={self.downsample}, layer={self.layer})"


def video_frame_tokens(grid: int, stride: int) -> int:
    """Pooled features of one video frame of a `grid x grid` patch grid at `stride`: ceil(g / s)^2
    (LLaVA-OneVision's 2x2 bilinear pooling: 27 x 27 -> 14 x 14 = 196)."""
    side = -(-int(grid) // int(stride))
    return side * side


def video_token_count(frames: int, frame_tokens: int, newline: str) -> int:
    """Feature tokens of one clip of `frames` frames with `frame_tokens` pooled features each, and
    the learned newline per `newline` (LLaVA-NeXT's `mm_newline_position`): `no_token` F * t,
    `one_token` F * t + 1 (one after the last frame), `frame` F * (t + 1) (one after each frame).
    Raises MmloomError for another newline position."""
    frames, frame_tokens = int(frames), int(frame_tokens)
    if newline == "no_token":
        return frames * frame_tokens
    if newline == "one_token":
        return frames * frame_tokens + 1
    if newline == "frame":
        return frames * (frame_tokens + 1)
    raise MmloomError(f"unknown video newline position {newline!r}; use one of ['no_token', 'one_token', 'frame']")


@register_callback
class FramePool(nn.Module, SerializableCallback):
    """Per-frame spatial pooling of video features, with LLaVA-NeXT's learned newline (a callback on
    the projected features of the frames, as LLaVA-OneVision pools after its projector).

    Takes the features of every frame of every clip, `(sum of frames, g * g, D)` (a square patch grid,
    no CLS), and the frames per clip `video_frames` (N_clips,) from the encoder inputs. Each frame's
    grid `(D, g, g)` becomes `(D, s, s)` with `s = ceil(g / stride)`: `mode="bilinear"` resizes it
    (`F.interpolate`, align_corners False: LLaVA-OneVision's `apply_pooling`), `"average"` / `"max"`
    pool `stride x stride` windows (ceil mode: the last row and column take what is left). The
    learned `newline` (D,) goes after the last frame (`"one_token"`, LLaVA-OneVision), after every
    frame (`"frame"`) or nowhere (`"no_token"`).

    Returns one `(F_i * s^2 (+ 1 or + F_i), D)` tensor per clip: `video_token_count(F_i, s^2, newline)`,
    the rule the data build and the processor count with (`item_counts`). Raises MmloomError for an
    unknown mode or newline, a stride below 1, features that are not a g x g grid, or frame counts that
    do not add up to the features' rows.
    """

    callback_type = "frame_pool"
    input_names = ("video_frames",)
    MODES = ("bilinear", "average", "max")
    NEWLINES = ("no_token", "one_token", "frame")

    def __init__(self, hidden_size: int, grid: int, stride: int = 2, mode: str = "bilinear",
                 newline: str = "one_token"):
        super().__init__()
        if mode not in self.MODES:
            raise MmloomError(f"unknown video pooling mode {mode!r}; use one of {list(self.MODES)}")
        if newline not in self.NEWLINES:
            raise MmloomError(f"unknown video newline position {newline!r}; use one of {list(self.NEWLINES)}")
        if int(stride) < 1 or int(grid) < 1:
            raise MmloomError(f"video pooling stride and grid must be >= 1, got {stride} and {grid}")
        self.hidden_size, self.grid, self.stride = int(hidden_size), int(grid), int(stride)
        self.mode, self.newline_position = mode, newline
        self.newline = (nn.Parameter(torch.randn(self.hidden_size) / math.sqrt(self.hidden_size))
                        if newline != "no_token" else None)

    def to_dict(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "grid": self.grid, "stride": self.stride, "mode": self.mode,
                "newline": self.newline_position}

    @property
    def frame_tokens(self) -> int:
        """Pooled features per frame: ceil(grid / stride)^2."""
        return video_frame_tokens(self.grid, self.stride)

    def count_rule(self) -> dict[str, Any]:
        """The count rule the data build records (`modalities.video.token_count`) for this pooling."""
        return {"type": "video_frames", "grid": self.grid, "frame_tokens": self.frame_tokens,
                "newline": self.newline_position}

    def item_counts(self, inputs: dict) -> list[int] | None:
        """Feature tokens per clip of a batch of encoder inputs (None without `video_frames`)."""
        frames = inputs.get("video_frames")
        if frames is None:
            return None
        return [video_token_count(int(f), self.frame_tokens, self.newline_position) for f in frames]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(F, g * g, D) -> (F, s * s, D), s = ceil(g / stride)."""
        n, positions, dim = features.shape
        if positions != self.grid * self.grid:
            raise MmloomError(f"video frames give {positions} features each, not a {self.grid} x {self.grid} grid "
                              "(a kept CLS token? select the patch features only)")
        side = -(-self.grid // self.stride)
        x = features.transpose(1, 2).reshape(n, dim, self.grid, self.grid)
        if self.mode == "bilinear":
            x = nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        elif self.mode == "average":
            x = nn.functional.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        else:
            x = nn.functional.max_pool2d(x, self.stride, self.stride, ceil_mode=True)
        return x.flatten(2).transpose(1, 2)  # (F, s*s, D)

    def forward(self, inputs: dict, output: ModelOutput | tuple | torch.Tensor) -> list[torch.Tensor]:
        features = output if isinstance(output, torch.Tensor) else output_features(output)  # (sum F, g*g, D)
        frames = inputs.get("video_frames")
        frames = [features.shape[0]] if frames is None else [int(f) for f in frames]
        if sum(frames) != features.shape[0]:
            raise MmloomError(f"video_frames add up to {sum(frames)} frames but the encoder gave {features.shape[0]}")
        pooled = self.pool(features)
        clips = []
        for clip in torch.split(pooled, frames):
            if self.newline_position == "frame":
                newline = self.newline.to(clip.dtype).expand(clip.shape[0], 1, -1)
                clip = torch.cat([clip, newline], dim=1)
            clip = clip.reshape(-1, clip.shape[-1])
            if self.newline_position == "one_token":
                clip = torch.cat([clip, self.newline.to(clip.dtype)[None]], dim=0)
            clips.append(clip)
        return clips

    def __repr__(self) -> str:
        return (f"FramePool(grid={self.grid}, stride={self.stride}, mode={self.mode!r}, "
                f"newline={self.newline_position!r})")
