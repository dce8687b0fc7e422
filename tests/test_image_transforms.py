"""Image preprocessing: parity with HF's PIL CLIP image processor, padding, config, load errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data

from mmloom.errors import MmloomError
from mmloom.processing.image import (
    CLIP_BACKGROUND,
    CLIP_MEAN,
    CLIP_STD,
    CenterCrop,
    ExpandToSquare,
    ImageTransform,
    Normalize,
    Resize,
    ToTensor,
    load_image,
)
from mmloom.processing.media_spec import MediaError

LLAVA_TRANSFORMS = [
    {"name": "expand_to_square", "background_color": [122, 116, 104]},
    {"name": "resize", "size": 336, "interpolation": "bicubic"},
    {"name": "center_crop", "size": 336},
    {"name": "to_tensor"},
    {"name": "normalize", "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
]


@pytest.fixture(scope="module")
def hf_clip():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=False
    )


IMAGES = {
    "astronaut": lambda: Image.fromarray(data.astronaut()),  # 512x512
    "chelsea_tall": lambda: Image.fromarray(
        np.ascontiguousarray(data.chelsea()[:, 40:300])
    ),  # 300x260 (h x w)
    "chelsea_wide": lambda: Image.fromarray(np.ascontiguousarray(data.chelsea()[20:211, :])),  # 191x451
    "astronaut_small_gray": lambda: Image.fromarray(data.astronaut()[100:300:2, 50:400:2]).convert("L"),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_parity_with_hf_clip_processor(hf_clip, name):
    """Same PIL bicubic resize, HF's floor crop offsets, rescale and normalize: max |diff| is 0
    here (measured); asserted < 1e-5."""
    img = IMAGES[name]()
    ref = hf_clip(img, return_tensors="np")["pixel_values"][0]
    ours = ImageTransform(336)(img)
    assert ours.shape == ref.shape == (3, 336, 336)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5


def test_default_background_and_constants():
    assert CLIP_BACKGROUND == (122, 116, 104)
    t = ImageTransform(336, pad_to_square=True)
    assert isinstance(t.steps[0], ExpandToSquare) and t.steps[0].background_color == (122, 116, 104)
    assert [type(s) for s in t.steps] == [ExpandToSquare, Resize, CenterCrop, ToTensor, Normalize]
    assert [type(s) for s in ImageTransform(224).steps] == [Resize, CenterCrop, ToTensor, Normalize]


def _expand2square(img, bg):  # LLaVA's function, for reference
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), bg)
        out.paste(img, (0, (w - h) // 2))
    else:
        out = Image.new(img.mode, (h, h), bg)
        out.paste(img, ((h - w) // 2, 0))
    return out


def test_pad_to_square_gives_mean_border(hf_clip):
    # a wide image (3:1) -> padded bands of the mean colour above and below
    arr = np.full((100, 300, 3), 255, dtype=np.uint8)
    out = ImageTransform(336, pad_to_square=True)(Image.fromarray(arr))
    assert out.shape == (3, 336, 336)
    # the background (122,116,104) normalizes to ~0 (int() truncation of mean*255: |x| < 1/255/std)
    border = np.concatenate([out[:, :100, :], out[:, -100:, :]], axis=1)
    expected = (np.array(CLIP_BACKGROUND) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.abs(border - expected[:, None, None]).max() < 1e-5
    assert np.abs(expected).max() < 0.02
    # centre rows are the white image
    white = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.abs(out[:, 130:200, :] - white[:, None, None]).max() < 1e-4
    # equals LLaVA's expand2square followed by the HF processor
    img = IMAGES["chelsea_wide"]()
    ref = hf_clip(_expand2square(img, CLIP_BACKGROUND), return_tensors="np")["pixel_values"][0]
    assert np.abs(ImageTransform(336, pad_to_square=True)(img) - ref).max() < 1e-5
    # custom background
    t = ImageTransform(64, pad_to_square=True, background=(0, 0, 0))
    assert np.abs(t(Image.fromarray(arr))[:, 0, 0] - (-np.array(CLIP_MEAN) / np.array(CLIP_STD))).max() < 1e-5


def test_from_config_llava_list(hf_clip):
    t = ImageTransform.from_config(LLAVA_TRANSFORMS, image_size=336)
    assert [type(s) for s in t.steps] == [ExpandToSquare, Resize, CenterCrop, ToTensor, Normalize]
    img = IMAGES["chelsea_tall"]()
    assert np.array_equal(t(img), ImageTransform(336, pad_to_square=True)(img))
    assert np.array_equal(ImageTransform.from_config(None, 336)(img), ImageTransform(336)(img))


def test_from_config_order_and_defaults():
    img = IMAGES["chelsea_wide"]()
    # center crop before resize is a different pipeline, and the order is respected
    t = ImageTransform.from_config(
        [{"name": "center_crop", "size": 150}, {"name": "resize", "size": 32}, {"name": "to_tensor"}],
        image_size=32,
    )
    assert [s.name for s in t.steps] == ["center_crop", "resize", "to_tensor"]
    out = t(img)
    manual = (
        np.asarray(img.crop((150, 20, 300, 170)).resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255
    )
    assert np.abs(out - manual.transpose(2, 0, 1)).max() < 1e-6
    # size defaults to image_size; rescale with a factor; no normalize
    t2 = ImageTransform.from_config(
        [
            {"name": "resize", "interpolation": "bilinear"},
            {"name": "center_crop"},
            {"name": "rescale", "factor": 1.0},
        ],
        image_size=48,
    )
    out2 = t2(img)
    assert out2.shape == (3, 48, 48) and out2.max() > 1.5  # 0..255
    assert t2.steps[0].interpolation == "bilinear" and t2.steps[0].size == 48


def test_from_config_errors():
    with pytest.raises(MmloomError) as e:
        ImageTransform.from_config([{"name": "random_flip"}], 336)
    assert "'random_flip'" in str(e.value)
    for valid in ("expand_to_square", "resize", "center_crop", "to_tensor", "normalize"):
        assert valid in str(e.value)
    with pytest.raises(MmloomError, match="unknown parameter"):
        ImageTransform.from_config([{"name": "resize", "sise": 3}], 336)
    with pytest.raises(MmloomError, match="interpolation"):
        ImageTransform.from_config([{"name": "resize", "interpolation": "cubic"}], 336)
    with pytest.raises(MmloomError, match="must come after 'to_tensor'"):
        ImageTransform.from_config([{"name": "normalize"}, {"name": "to_tensor"}], 336)
    with pytest.raises(MmloomError, match="must come before"):
        ImageTransform.from_config([{"name": "to_tensor"}, {"name": "resize"}], 336)
    with pytest.raises(MmloomError, match="mean must be 3 numbers"):
        ImageTransform.from_config([{"name": "to_tensor"}, {"name": "normalize", "mean": [0.5, 0.5]}], 336)
    with pytest.raises(MmloomError, match="'name'"):
        ImageTransform.from_config([{"size": 3}], 336)
    # a pipeline that does not produce image_size x image_size is reported on use
    t = ImageTransform.from_config([{"name": "resize"}, {"name": "to_tensor"}], 32)
    with pytest.raises(MmloomError, match="center_crop"):
        t(IMAGES["chelsea_wide"]())


def test_center_crop_larger_than_image_zero_pads_like_hf(hf_clip):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = IMAGES["chelsea_wide"]()
    hf = CLIPImageProcessorPil(size={"shortest_edge": 100}, crop_size={"height": 121, "width": 121})
    ref = hf(img, return_tensors="np")["pixel_values"][0]
    ours = ImageTransform.from_config(
        [
            {"name": "resize", "size": 100},
            {"name": "center_crop", "size": 121},
            {"name": "to_tensor"},
            {"name": "normalize"},
        ],
        121,
    )(img)
    assert np.abs(ours - ref).max() < 1e-5
    # the numpy path (crop after to_tensor) agrees with the PIL path
    ours_np = ImageTransform.from_config(
        [
            {"name": "resize", "size": 100},
            {"name": "to_tensor"},
            {"name": "center_crop", "size": 121},
            {"name": "normalize"},
        ],
        121,
    )(img)
    assert np.abs(ours_np - ours).max() < 1e-6


def test_modes_converted_to_rgb():
    rgba = Image.fromarray(np.zeros((40, 50, 4), np.uint8), "RGBA")
    gray = Image.fromarray(np.zeros((40, 50), np.uint8))
    t = ImageTransform(32)
    assert t(rgba).shape == t(gray).shape == (3, 32, 32)
    with pytest.raises(MmloomError, match="PIL image"):
        t(np.zeros((4, 4, 3)))


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()[:256, :256]).save(buf, format=fmt)
    return buf.getvalue()


def test_load_image_ok(tmp_path):
    p = tmp_path / "ok.png"
    p.write_bytes(_encoded("PNG"))
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (256, 256)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(gray)
    assert load_image(gray).mode == "RGB"
    assert load_image(gray, convert=None).mode == "L"


def test_load_image_missing(tmp_path):
    p = tmp_path / "nope" / "missing.jpg"
    with pytest.raises(MediaError, match="file not found") as e:
        load_image(p)
    assert str(p) in str(e.value) and e.value.path == str(p)
    assert isinstance(e.value, MmloomError)
    with pytest.raises(MediaError, match="directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("allow_truncated", [False, True])
def test_load_image_truncated(tmp_path, fmt, allow_truncated, monkeypatch):
    raw = _encoded(fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(raw[: len(raw) // 2])
    # even with PIL's global LOAD_TRUNCATED_IMAGES switched on, truncation is reported
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", allow_truncated)
    with pytest.raises(MediaError, match="truncated") as e:
        load_image(p)
    assert str(p) in str(e.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is allow_truncated  # restored


def test_load_image_not_an_image(tmp_path):
    p = tmp_path / "text.jpg"
    p.write_text("this is not an image")
    with pytest.raises(MediaError, match="not a recognised image") as e:
        load_image(p)
    assert str(p) in str(e.value)
    header_only = tmp_path / "header.png"
    header_only.write_bytes(_encoded("PNG")[:60])
    with pytest.raises(MediaError, match=str(header_only.name)):
        load_image(header_only)


# ------------------------------------------------------------------ bit depth and transparency
def _gradient() -> np.ndarray:
    """32x32 horizontal gradient 0..255 with a dark disc (every 8-bit level well represented)."""
    yy, xx = np.mgrid[:32, :32]
    img = (xx * 255 // 31).astype(np.uint8)
    img[(yy - 16) ** 2 + (xx - 16) ** 2 < 64] = 40
    return img


def test_16bit_png_scaled_not_clipped(tmp_path):
    eight = _gradient()
    Image.fromarray(eight).save(tmp_path / "g8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I;16B", "I")
    loaded = np.asarray(load_image(tmp_path / "g16.png"))
    assert loaded.shape == (32, 32, 3) and np.array_equal(loaded[..., 0], eight)
    t = ImageTransform(32)
    assert np.abs(t(load_image(tmp_path / "g16.png")) - t(load_image(tmp_path / "g8.png"))).max() == 0
    # the transform itself decodes a high-bit-depth PIL image the same way
    assert np.abs(t(Image.open(tmp_path / "g16.png")) - t(load_image(tmp_path / "g8.png"))).max() == 0


@pytest.mark.parametrize("scale, expect", [(1 / 255, "same"), (1.0, "same"), (1000.0, "stretched")])
def test_float_tiff_scaled(tmp_path, scale, expect):
    eight = _gradient()
    Image.fromarray(eight.astype(np.float32) * np.float32(scale), "F").save(tmp_path / "f.tiff")
    assert Image.open(tmp_path / "f.tiff").mode == "F"
    got = np.asarray(load_image(tmp_path / "f.tiff"))[..., 0].astype(int)
    if expect == "same":  # [0, 1] data times 255, [0, 255] data as it is
        assert np.abs(got - eight).max() <= 1
    else:  # out of range: min..max stretched to 0..255, never clipped to white
        assert got.min() == 0 and got.max() == 255 and (got == 255).mean() < 0.1
        assert np.abs(got - eight).max() <= 1  # the gradient starts at 0 and ends at 255


def test_32bit_integer_out_of_16bit_range_is_stretched():
    values = (_gradient().astype(np.int32) * 70000) - 5
    img = Image.fromarray(values, "I")
    got = np.asarray(ImageTransform(32, mean=0, std=1)(img))[0] * 255
    assert abs(got.min()) < 1e-3 and abs(got.max() - 255) < 1e-3


def _transparent_disc():
    """A red disc on a fully transparent background whose stored colour is black (RGBA uint8)."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 100
    rgba[disc] = (220, 30, 30, 255)
    rgba[5:9, 5:9] = (0, 0, 255, 128)  # half-transparent blue
    return rgba


def _transparent_variants(tmp_path):
    rgba = _transparent_disc()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    pal = Image.fromarray(rgba, "RGBA").convert("P")
    pal.save(tmp_path / "palette.png", transparency=pal.getpixel((0, 0)))
    Image.fromarray(rgba[..., :3]).save(tmp_path / "colour_key.png", transparency=(0, 0, 0))
    return ["rgba", "la", "palette", "colour_key"]


def test_transparent_images_composited_on_white_like_transformers(tmp_path):
    """Every transparency kind: the loaded pixels are the image over white, and the training transform
    equals transformers' CLIP image processor (which composites onto white) on the raw file."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    t = ImageTransform(32)
    for name in _transparent_variants(tmp_path):
        raw = Image.open(tmp_path / f"{name}.png")
        loaded = np.asarray(load_image(tmp_path / f"{name}.png"))
        assert (loaded[0, 0] == 255).all(), name  # the transparent corner is white, not the stored black
        assert np.abs(t(load_image(tmp_path / f"{name}.png")) - hf(raw, return_tensors="np")["pixel_values"][0]).max() < 1e-5
        assert np.abs(t(raw) - t(load_image(tmp_path / f"{name}.png"))).max() == 0
    half = np.asarray(load_image(tmp_path / "rgba.png"))[6, 6].astype(int)
    assert np.abs(half - [127, 127, 255]).max() <= 1  # 50% blue over white


def test_rescale_and_normalize_compute_in_float32():
    """to_tensor and normalize work in float32 (bit-equal to float32 arithmetic; float64 then a cast,
    as before, differs by one ulp at some pixels and took ~3x the time), and never modify their input."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    out = ImageTransform.from_config([{"name": "to_tensor"}, {"name": "normalize"}], 40)(img)
    pixels = np.asarray(img).astype(np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
    assert out.dtype == np.float32 and np.array_equal(out, (pixels - mean) / std)
    array = pixels.copy()
    Normalize()(array)
    assert np.array_equal(array, pixels)
