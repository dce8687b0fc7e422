"""Image loading and CLIP-style preprocessing with PIL and numpy only.

:class:`ImageTransform` is an ordered list of small steps (pad to square, resize shortest edge,
center crop, rescale to [0, 1], normalize), matching LLaVA-1.5 / HF ``CLIPImageProcessor``:

* ``expand_to_square``: LLaVA's ``expand2square`` (image pasted at ``((W - w) // 2, (H - h) // 2)``
  on a ``background_color`` canvas; default CLIP mean * 255 truncated = (122, 116, 104)).
* ``resize``: shortest edge to ``size`` with PIL (bicubic by default); the long edge becomes
  ``int(size * long / short)`` as in HF and torchvision. ``size: [h, w]`` resizes exactly.
* ``center_crop``: offsets ``(H - h) // 2`` / ``(W - w) // 2`` as in HF; a crop larger than the
  image is zero-padded (also as HF).
* ``to_tensor``: uint8 HWC -> float32 CHW in [0, 1] (``rescale`` with ``factor`` is the same with
  another factor).
* ``normalize``: ``(x - mean) / std`` per channel.

The input is converted to 8-bit RGB first (:func:`to_rgb`); the output is a ``(3, H, W)`` float32
array.

Decoding rules (:func:`to_rgb`, used by :func:`load_image` and :class:`ImageTransform`, so by training,
``mmloom chat``/``generate``, feature caching and the data build):

* 16-bit and 32-bit integer images (PIL modes ``I;16``, ``I;16B``, ``I;16L``, ``I``) are scaled to 8 bit as
  16-bit data: ``round(v / 257)`` (65535 -> 255, ``257 * k`` -> ``k``). ``I`` data outside 0..65535 is
  stretched from its own minimum and maximum to 0..255.
* Float images (mode ``F``, e.g. float TIFF) in [0, 1] are scaled by 255, values already in [0, 255] are
  kept, anything else is stretched from its minimum and maximum to 0..255.
  (PIL's own ``convert("RGB")`` clips every value above 255, which turns such pictures white.)
* Transparent images (an alpha band: ``RGBA``, ``LA``, ``PA``; or a ``transparency`` entry: palette
  or colour-key PNGs) are composited onto :data:`TRANSPARENT_BACKGROUND`, white, the same test and the same
  colour as transformers 5's image processors (``convert_to_rgb``), so the training transform and every
  exported HF image processor see the same pixels. transformers 4.x processors and the original LLaVA
  code (``Image.open(...).convert("RGB")``) drop the alpha channel instead: give them images already
  converted with :func:`load_image` / :func:`to_rgb`.

Decoded images have a pixel budget (:data:`MAX_IMAGE_PIXELS`, width x height), checked from the
file's header before any pixel is decoded: a small file can hold a huge picture (a 330 KB PNG of
13000 x 13000 16-bit pixels decodes to gigabytes), and no processor needs one. Over it,
:func:`load_image` raises a MediaError with reason `image_too_large` (the data build counts it as an
`image_too_large` skip; chat and generate stop with one line).

Arithmetic is float32 throughout (HF rescales in float64 and casts: the values differ by at most
one float32 ulp, and float64 made these two steps about 3x slower).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageFile, ImageStat, UnidentifiedImageError

from mmloom.errors import MmloomError
from mmloom.processing.media_spec import MediaError, MediaSpec

if TYPE_CHECKING:  # numpy is imported where arrays are made: `mmloom --help` reads the specs without it
    import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_BACKGROUND = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), as LLaVA computes it
# Transparent pixels are composited onto white: transformers 5 `convert_to_rgb` does the same, so
# training (this module) and exported HF image processors agree.
TRANSPARENT_BACKGROUND = (255, 255, 255)
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# The largest picture decoded, in pixels (width x height): 8192 x 8192 = 67.1 Mpx, about five times the
# largest input of today's processors (Qwen2-VL's max_pixels, 12.8 Mpx) and above 48-Mpx phone photos.
# MMLOOM_MAX_IMAGE_PIXELS changes the default; `data build` takes `dataset.max_image_pixels`.
MAX_IMAGE_PIXELS = int(os.environ.get("MMLOOM_MAX_IMAGE_PIXELS", "0") or 0) or 8192 * 8192

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def image_error(path: str | os.PathLike, reason: str, detail: str) -> MediaError:
    """The MediaError of an image file that cannot be used: `reason` is `missing_image` (no such
    file), `image_too_large` (over the pixel budget, read from the header: nothing was decoded) or
    `bad_image` (unreadable, not an image, truncated)."""
    return MediaError(path, reason, detail, f"cannot load image {str(path)!r}: {detail}")


def check_pixel_budget(image: Image.Image, path: str | os.PathLike, max_pixels: int | None = None) -> None:
    """Raise MediaError `image_too_large` when the opened (not yet decoded) `image` has more than
    `max_pixels` (default :data:`MAX_IMAGE_PIXELS`) pixels; its size comes from the header."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    width, height = image.size
    if width * height > limit:
        raise image_error(path, "image_too_large", f"{width} x {height} = {width * height / 1e6:,.1f} Mpx, more than "
                          f"the budget of {limit / 1e6:,.1f} Mpx (dataset.max_image_pixels, MMLOOM_MAX_IMAGE_PIXELS)")


_TRUNCATED_LOCK = threading.Lock()


def load_image(path: str | os.PathLike, convert: str | None = "RGB", max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image (``img.load()``), converted to ``convert`` (None keeps the mode).

    ``convert="RGB"`` (the default) goes through :func:`to_rgb`: 16-bit and float pictures are scaled
    to 8 bit (never clipped to white) and transparent ones composited onto white.

    Raises :class:`~mmloom.processing.media_spec.MediaError` with the data build's skip reason:
    `missing_image` (no such file, or a folder), `image_too_large` (more than `max_pixels` pixels,
    default :data:`MAX_IMAGE_PIXELS`, before anything is decoded) or `bad_image` (not an image,
    unreadable; truncated files too, even when ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was switched
    on elsewhere: it is switched off while this image decodes).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise image_error(p, "missing_image", "file not found")
    if os.path.isdir(p):
        raise image_error(p, "missing_image", "is a directory, not an image file")
    try:
        with open(p, "rb") as f:
            with warnings.catch_warnings():  # PIL's own bomb warning: the budget below is the check
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f)
            check_pixel_budget(img, p, max_pixels)
            with _TRUNCATED_LOCK:
                saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = saved
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise image_error(p, "bad_image", "not a recognised image format (corrupt or not an image)") from None
    except PermissionError as e:
        raise image_error(p, "bad_image", f"permission denied ({e.strerror})") from None
    except Image.DecompressionBombError as e:
        raise image_error(p, "image_too_large", f"too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        reason = (
            "truncated or corrupt image data"
            if "truncated" in msg.lower() or isinstance(e, EOFError)
            else "corrupt image data"
        )
        raise image_error(p, "bad_image", f"{reason} ({msg})") from None
    if convert == "RGB":
        return to_rgb(img)
    if convert is not None and img.mode != convert:
        img = img.convert(convert)
    return img


def _stretch(values: np.ndarray) -> np.ndarray:
    import numpy as np

    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return (values - low) * (255.0 / (high - low))


def to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth image (modes ``I;16*``, ``I``, ``F``) as an 8-bit ``L`` image; others unchanged.

    16-bit data is divided by 257 (rounded), float data in [0, 1] multiplied by 255; data outside
    those ranges is stretched from its minimum and maximum to 0..255 (see the module docstring).
    """
    import numpy as np

    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    if values.size == 0:
        return Image.new("L", image.size)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        values = np.nan_to_num(values, nan=0.0, posinf=finite.max() if finite.size else 0.0,
                               neginf=finite.min() if finite.size else 0.0)
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            values = values * 255.0
        elif not (low >= 0.0 and high <= 255.0):
            values = _stretch(values)
    else:
        low, high = float(values.min()), float(values.max())
        values = values / 257.0 if low >= 0 and high <= 65535 else _stretch(values)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def has_transparency(image: Image.Image) -> bool:
    """An alpha band or a transparent palette index / colour key (transformers 5's test)."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_rgb(image: Image.Image, background: tuple[int, int, int] = TRANSPARENT_BACKGROUND) -> Image.Image:
    """Any PIL image as 8-bit RGB: high bit depths scaled (:func:`to_8bit`), transparency composited
    onto `background` (white by default, as transformers 5's image processors do).

    Raises :class:`~mmloom.errors.MmloomError` when `image` is not a PIL image."""
    if not isinstance(image, Image.Image):
        raise MmloomError(f"expected a PIL image, got {type(image).__name__}")
    if has_transparency(image):
        rgba = to_8bit(image).convert("RGBA") if image.mode in HIGH_BIT_DEPTH_MODES else image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else to_8bit(image).convert("RGB")


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------


def _size_pair(size: Any, step: str) -> tuple[int, int] | int:
    import numpy as np

    if isinstance(size, bool):
        raise MmloomError(f"transform {step!r}: size must be an int or [height, width], got {size!r}")
    if isinstance(size, (int, np.integer)) and size > 0:
        return int(size)
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) in (1, 2):
        vals = [
            int(v) for v in size if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
        ]
        if len(vals) == len(size):
            return vals[0] if len(vals) == 1 else (vals[0], vals[1])
    raise MmloomError(f"transform {step!r}: size must be a positive int or [height, width], got {size!r}")


def _triple(values: Any, step: str, key: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in values)
    except TypeError:
        vals = (float(values),) * 3
    except ValueError:
        raise MmloomError(f"transform {step!r}: {key} must be 3 numbers, got {values!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise MmloomError(
            f"transform {step!r}: {key} must be 3 numbers (one per RGB channel), got {values!r}"
        )
    return vals  # type: ignore[return-value]


class Step:
    """One preprocessing step. ``pil`` says whether it works on PIL images (before to_tensor)."""

    name = ""
    pil = True
    keys: tuple[str, ...] = ()

    def __call__(self, image):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.keys)
        return f"{type(self).__name__}({args})"


class ExpandToSquare(Step):
    """Pad a PIL image to a square with `background_color` (RGB 0-255), the image centred: LLaVA's
    ``expand2square`` (``image_aspect_ratio: pad``)."""

    name = "expand_to_square"
    keys = ("background_color",)

    def __init__(self, background_color=CLIP_BACKGROUND):
        bg = _triple(background_color, self.name, "background_color")
        self.background_color = tuple(int(round(v)) for v in bg)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if w == h:
            return image
        side = max(w, h)
        canvas = Image.new(image.mode, (side, side), self.background_color)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas


class Resize(Step):
    """Resize a PIL image: an int `size` sets the shorter side in pixels (aspect ratio kept, the
    longer side truncated to an int), a (height, width) pair sets both; `interpolation` is a
    `RESAMPLE` name. Raises MmloomError for an unknown interpolation."""

    name = "resize"
    keys = ("size", "interpolation")

    def __init__(self, size, interpolation: str = "bicubic"):
        self.size = _size_pair(size, self.name)
        if interpolation not in RESAMPLE:
            raise MmloomError(
                f"transform 'resize': unknown interpolation {interpolation!r}; valid: {', '.join(RESAMPLE)}"
            )
        self.interpolation = interpolation

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing."""
        if isinstance(self.size, tuple):
            return self.size[1], self.size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, image: Image.Image) -> Image.Image:
        size = self.output_size(*image.size)
        if size == image.size:
            return image
        return image.resize(size, resample=RESAMPLE[self.interpolation])


class CenterCrop(Step):
    """Crop the centre (height, width) of a PIL image or a (..., H, W) array; regions outside the
    image are zeros (black), as transformers' ``center_crop`` does."""

    name = "center_crop"
    keys = ("size",)
    pil = None  # works on both

    def __init__(self, size):
        s = _size_pair(size, self.name)
        self.size = s if isinstance(s, tuple) else (s, s)

    def __call__(self, image):
        import numpy as np

        ch, cw = self.size
        if isinstance(image, Image.Image):
            w, h = image.size
            top, left = (h - ch) // 2, (w - cw) // 2
            if (w, h) == (cw, ch):
                return image
            return image.crop((left, top, left + cw, top + ch))  # out of bounds -> zeros, like HF
        h, w = image.shape[-2:]
        top, left = (h - ch) // 2, (w - cw) // 2
        out = np.zeros(image.shape[:-2] + (ch, cw), dtype=image.dtype)
        src_t, src_l = max(top, 0), max(left, 0)
        src_b, src_r = min(top + ch, h), min(left + cw, w)
        out[..., src_t - top : src_b - top, src_l - left : src_r - left] = image[
            ..., src_t:src_b, src_l:src_r
        ]
        return out


class ToTensor(Step):
    """uint8 HWC PIL image -> float32 CHW array times ``factor`` (1/255), computed in float32
    (within 1 ulp of HF's float64 rescale; float64 arithmetic here cost twice the time)."""

    name = "to_tensor"
    keys = ("factor",)

    def __init__(self, factor: float = 1 / 255):
        self.factor = float(factor)

    def __call__(self, image: Image.Image) -> np.ndarray:
        import numpy as np

        arr = np.array(image, dtype=np.float32).transpose(2, 0, 1)  # a new float32 array (never the input)
        arr *= np.float32(self.factor)
        return arr


class Rescale(ToTensor):
    """:class:`ToTensor` under the name ``rescale`` (transformers' ``do_rescale`` step): uint8 ->
    float32 times `factor`."""

    name = "rescale"

    def __init__(self, factor: float = 1 / 255):
        super().__init__(factor)


class Normalize(Step):
    """Subtract the per-channel `mean` and divide by `std` of a float (3, H, W) array (CLIP's
    statistics by default). Raises MmloomError when a std is zero."""

    name = "normalize"
    keys = ("mean", "std")
    pil = False

    def __init__(self, mean=CLIP_MEAN, std=CLIP_STD):
        self.mean = _triple(mean, self.name, "mean")
        self.std = _triple(std, self.name, "std")
        if any(s == 0 for s in self.std):
            raise MmloomError(f"transform 'normalize': std must be non-zero, got {list(self.std)}")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import numpy as np

        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        out = np.subtract(image, mean, dtype=np.float32)  # float32 throughout, one new array
        out /= std
        return out


STEPS: dict[str, type[Step]] = {
    cls.name: cls for cls in (ExpandToSquare, Resize, CenterCrop, ToTensor, Rescale, Normalize)
}


def build_step(spec: dict, image_size: int) -> Step:
    """One step from a config entry ``{"name": ..., **params}``.
    Raises MmloomError for an entry without a name, an unknown step or unknown parameters."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise MmloomError(f"each transform must be a mapping with a 'name', got {spec!r}")
    name = spec["name"]
    cls = STEPS.get(name)
    if cls is None:
        raise MmloomError(f"unknown image transform {name!r}; valid transforms: {', '.join(STEPS)}")
    params = {k: v for k, v in spec.items() if k != "name"}
    unknown = sorted(set(params) - set(cls.keys))
    if unknown:
        raise MmloomError(
            f"transform {name!r}: unknown parameter(s) {unknown}; valid: {list(cls.keys) or 'none'}"
        )
    if cls in (Resize, CenterCrop):
        params.setdefault("size", image_size)
    return cls(**params)


# --------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------


class ImageTransform:
    """CLIP/LLaVA image preprocessing: PIL image -> ``(3, H, W)`` float32 array.

    ``ImageTransform(336)`` is LLaVA-1.5 phase 1 / HF ``CLIPImageProcessor``;
    ``pad_to_square=True`` adds LLaVA's ``expand2square`` (phase 2, Cerebras). ``background``
    defaults to ``int(mean * 255)`` per channel.
    """

    def __init__(
        self,
        image_size: int = 336,
        pad_to_square: bool = False,
        background=None,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resample: str = "bicubic",
    ):
        steps: list[Step] = []
        if pad_to_square:
            if background is None:
                background = tuple(int(m * 255) for m in _triple(mean, "normalize", "mean"))
            steps.append(ExpandToSquare(background))
        steps += [Resize(image_size, resample), CenterCrop(image_size), ToTensor(), Normalize(mean, std)]
        self._set(steps, image_size)

    def _set(self, steps: list[Step], image_size: int | None) -> None:
        tensor_seen = False
        for s in steps:
            if s.pil is True and tensor_seen:
                raise MmloomError(f"image transform {s.name!r} must come before 'to_tensor'/'rescale'")
            if s.pil is False and not tensor_seen:
                raise MmloomError(f"image transform {s.name!r} must come after 'to_tensor' (or 'rescale')")
            if isinstance(s, ToTensor):
                if tensor_seen:
                    raise MmloomError("image transforms contain 'to_tensor'/'rescale' twice")
                tensor_seen = True
        self.steps = list(steps)
        self.image_size = image_size

    @classmethod
    def from_steps(cls, steps: list[Step], image_size: int | None = None) -> ImageTransform:
        """A transform from already built steps; raises MmloomError when their order breaks the
        constructor's rules (PIL steps before ``to_tensor``, array steps after it, one ``to_tensor``)."""
        self = cls.__new__(cls)
        self._set(steps, image_size)
        return self

    @classmethod
    def from_config(cls, transforms: list[dict] | None, image_size: int) -> ImageTransform:
        """Build from a Cerebras-style ``train_input.transforms`` list (order respected).

        ``None`` gives the default (no padding). ``resize``/``center_crop`` without ``size`` use
        ``image_size``. A pipeline without ``to_tensor`` still returns float32 values in 0..255.

        Raises MmloomError when `transforms` is not a list of such mappings or a step is invalid.
        """
        if transforms is None:
            return cls(image_size=image_size)
        if not isinstance(transforms, (list, tuple)):
            raise MmloomError(
                f"transforms must be a list of {{name: ...}} mappings, got {type(transforms).__name__}"
            )
        return cls.from_steps([build_step(t, image_size) for t in transforms], image_size)

    def __call__(self, image: Image.Image) -> np.ndarray:
        import numpy as np

        if not isinstance(image, Image.Image):
            raise MmloomError(f"ImageTransform expects a PIL image, got {type(image).__name__}")
        x = to_rgb(image)
        for step in self.steps:
            x = step(x)
        if isinstance(x, Image.Image):
            x = np.asarray(x, dtype=np.float32).transpose(2, 0, 1).copy()
        if self.image_size is not None and x.shape[1:] != (self.image_size, self.image_size):
            raise MmloomError(
                f"image transforms produced a {x.shape[1]}x{x.shape[2]} image but image_size is {self.image_size}; "
                "add a 'center_crop' (or fix 'resize') so every image has the same size"
            )
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_config(self) -> list[dict]:
        """The steps as a `transforms` list that `from_config` reads back."""

        def plain(value):
            return list(value) if isinstance(value, tuple) else value

        return [{"name": step.name, **{k: plain(getattr(step, k)) for k in step.keys}} for step in self.steps]

    def __repr__(self) -> str:
        return f"ImageTransform({self.steps!r}, image_size={self.image_size})"


def blank_like(image: Image.Image) -> Image.Image:
    """An image of the same size filled with the image's mean colour (the blanked-image baseline)."""
    mean = tuple(int(round(c)) for c in ImageStat.Stat(image).mean[:3])
    return Image.new("RGB", image.size, mean)


def height_width(image) -> tuple[int, int]:
    """(height, width) of a PIL image or a (C, H, W) / (H, W, C) array."""
    if hasattr(image, "size") and not hasattr(image, "shape"):
        width, height = image.size
        return height, width
    shape = tuple(image.shape)
    return (shape[1], shape[2]) if shape[0] in (1, 3, 4) else (shape[0], shape[1])


@dataclass(frozen=True)
class ImageSpec(MediaSpec):
    """Images (`vision`): PIL images decoded with :func:`load_image`, turned into `pixel_values`
    `(N, 3, H, W)` by `transform` (an :class:`ImageTransform`, a transformers image processor or
    any callable image -> (3, H, W) array).

    Counting (`num_tokens`): a fixed number of feature tokens per image (the data build's
    `dataset.num_patches`, `MultimodalProcessor.num_tokens`), or a variable-resolution rule
    (`mmloom.model.feature_count.variable_token_spec`: Pixtral, Qwen2-VL) read from the image
    processor's outputs; with `anyres` (`AnyresPack` settings) the count follows each image's size.
    `max_pixels` is the decoding budget (None: :data:`MAX_IMAGE_PIXELS`); `dtype` the torch dtype of
    `pixel_values` (None: as the transform gives it).
    """

    noun = "image"
    item_noun = "image"
    processor_arg = "images"
    folder_keys = ("image_dir", "img_data_dir")
    build_key = None
    reasons = ("bad_image_path", "missing_image", "bad_image", "image_too_large", "image_token_mismatch",
               "multiple_images", "image_in_later_turn")
    baseline = "blank-images"
    cli_help = {"item": "an image to talk about (default: none; /image PATH in the session adds one)",
                "dir": "root of the question images (default: the questions file's folder)",
                "baseline": "replace every image by its mean colour (checks that answers come from the image)"}
    default_placeholder = "<image>"
    token_offset = 0
    hf_processor_loader = "AutoImageProcessor"

    modality: str = "vision"
    placeholder: str = "<image>"
    record_key: str = "image"
    num_tokens: int | dict[str, Any] | None = None
    anyres: dict[str, Any] | None = None
    transform: Any = None
    max_pixels: int | None = None
    dtype: Any = None

    @property
    def encoder_processor(self) -> Any:
        return self.transform

    def load(self, path: str | os.PathLike) -> Image.Image:
        """The image at `path`, fully decoded, as 8-bit RGB (:func:`load_image`)."""
        return load_image(path, max_pixels=self.max_pixels)

    def check(self, path: str | os.PathLike) -> None:
        """Fully decode the file within the pixel budget (no conversion: the data build's check)."""
        load_image(path, convert=None, max_pixels=self.max_pixels).close()

    @property
    def fixed_token_count(self) -> int | None:
        return self.num_tokens if isinstance(self.num_tokens, int) and self.anyres is None else None

    def token_counts(self, items: Sequence[Any], inputs: dict[str, Any] | None = None) -> list[int]:
        """Feature tokens per image: anyres from each image's (height, width); a fixed count; or a
        variable-resolution rule read from `inputs` (else from running the image processor).
        Raises MmloomError when the spec has no count."""
        from mmloom.model.callbacks import anyres_num_tokens
        from mmloom.model.feature_count import counts_from_inputs, item_token_counts

        if self.anyres is not None:
            return [anyres_num_tokens(height_width(item), **self.anyres) for item in items]
        if self.num_tokens is None:
            raise MmloomError(f"no feature-token count for {self.modality}: build the processor with from_model()")
        if isinstance(self.num_tokens, dict) and inputs is not None and items:
            counts = counts_from_inputs(self.num_tokens, inputs)
            if counts is not None and len(counts) == len(items):
                return counts
        return item_token_counts(self.num_tokens, list(items), self.transform)

    def encoder_inputs(self, items: Sequence[Any], **kwargs: Any) -> dict[str, Any]:
        """`{"pixel_values": (N, 3, H, W)}` (plus what a transformers processor returns, e.g.
        `image_sizes`; anyres: each image's real views, flattened to (sum of views, 3, H, W))."""
        import numpy as np
        import torch

        if self.transform is None:
            raise MmloomError(f"no image processor for {self.modality} inputs")
        if hasattr(self.transform, "model_input_names"):  # a transformers image processor
            inputs = dict(self.transform(list(items), return_tensors="pt", **kwargs))
            if self.anyres is not None:
                inputs["pixel_values"] = self._anyres_views(inputs)
            return inputs
        return {"pixel_values": torch.stack([torch.as_tensor(np.asarray(self.transform(item)), dtype=self.dtype)
                                             for item in items])}

    def _anyres_views(self, inputs: dict[str, Any]):
        """LLaVA-NeXT processors pad every image to the same number of views, (N, P, C, H, W);
        the model takes each image's real views, flattened: (sum of views, C, H, W)."""
        import torch
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        pixel_values = inputs["pixel_values"]
        if pixel_values.dim() == 4:
            return pixel_values
        views = [image_size_to_num_patches(hw.tolist(), self.anyres["image_grid_pinpoints"], self.anyres["image_size"])
                 for hw in inputs["image_sizes"]]
        return torch.cat([image[:n] for image, n in zip(pixel_values, views, strict=True)])

    def dummy(self) -> tuple[dict[str, Any], int]:
        """A zero image of the transform's size and its fixed token count.
        Raises MmloomError when the transform has no `image_size` or the count is not fixed."""
        import torch

        size = int(getattr(self.transform, "image_size", 0) or 0)
        if size <= 0:
            raise MmloomError("image_transform has no image_size: cannot make the dummy image of text-only samples")
        dtype = self.dtype if self.dtype is not None else torch.float32
        return {"pixel_values": torch.zeros(1, 3, size, size, dtype=dtype)}, int(self.fixed_token_count or 0)

    def blank(self, item: Image.Image) -> Image.Image:
        return blank_like(item)

    @classmethod
    def from_processor(cls, modality: str, encoder_processor: Any, *, placeholder: str, token_id: int | None = None,
                       count: Any = None, anyres: dict[str, Any] | None = None, record_key: str | None = None,
                       sampling: dict[str, Any] | None = None) -> ImageSpec:
        return cls(modality=modality, placeholder=placeholder, record_key=record_key or "image", token_id=token_id,
                   transform=encoder_processor, num_tokens=count, anyres=anyres)

    @classmethod
    def from_build_config(cls, dataset) -> ImageSpec:
        """The images of a data build (the seed's `dataset` keys: `num_patches` slots each, None for a
        build without images; `image_dir`, `image_key`, `image_token`, `max_image_pixels`)."""
        from pathlib import Path

        return cls(placeholder=dataset.image_token, record_key=dataset.image_key,
                   folder=Path(dataset.image_dir) if dataset.image_dir is not None else None,
                   num_tokens=dataset.num_patches, max_pixels=dataset.max_image_pixels)

    @classmethod
    def from_data(cls, data_params: dict[str, Any], folder: str | os.PathLike | None = None, **settings: Any
                  ) -> ImageSpec | None:
        """The images of a built data folder: `image_patch_info.num_patches` slots each (None when the
        data has no image slots), `post-process.image_token_id`, the build's `dataset` keys (image
        key, placeholder, `image_dir`, `max_image_pixels`); `settings` add the transform and dtype."""
        from pathlib import Path

        dataset = data_params.get("dataset") or {}
        count = (data_params.get("image_patch_info") or {}).get("num_patches", dataset.get("num_patches"))
        if count is None:
            return None
        budget = dataset.get("max_image_pixels")
        folder = folder if folder is not None else dataset.get(cls.folder_keys[0])
        return cls(placeholder=dataset.get("image_token", cls.default_placeholder),
                   record_key=dataset.get("image_key", "image"),
                   token_id=(data_params.get("post-process") or {}).get("image_token_id"),
                   folder=Path(folder) if folder is not None else None, num_tokens=int(count),
                   max_pixels=budget if isinstance(budget, int) and budget > 0 else None, **settings)


__all__ = [
    "CLIP_BACKGROUND",
    "CLIP_MEAN",
    "CLIP_STD",
    "TRANSPARENT_BACKGROUND",
    "ImageSpec",
    "ImageTransform",
    "STEPS",
    "blank_like",
    "build_step",
    "has_transparency",
    "load_image",
    "to_8bit",
    "to_rgb",
]
