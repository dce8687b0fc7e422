"""mmloom image transforms <-> transformers image processors and LLaVA's ``image_aspect_ratio``.

Exports need a transformers image processor: the processor mmloom saves with a trained model is
often its own :class:`~mmloom.processing.image.ImageTransform` (what ``mmloom train`` applies). Its
steps map one to one onto a CLIP-style processor, in transformers' fixed order:

==================================  ==========================================================
ImageTransform step                 transformers (``CLIPImageProcessor`` / ``LlavaImageProcessor``)
==================================  ==========================================================
``expand_to_square(background)``    ``LlavaImageProcessor(do_pad=True)``; original LLaVA:
                                    ``image_aspect_ratio: "pad"`` (``expand2square``). Both paint
                                    the border ``int(image_mean * 255)``, so the background must be that.
``resize(size, interpolation)``     ``size={"shortest_edge": size}`` (or ``{"height", "width"}``), ``resample``
``center_crop(size)``               ``crop_size``, ``do_center_crop``
``to_tensor`` / ``rescale(f)``      ``do_rescale``, ``rescale_factor``
``normalize(mean, std)``            ``do_normalize``, ``image_mean``, ``image_std``
==================================  ==========================================================

A transform whose steps come in another order, or repeat, has no transformers equivalent and is
refused with :class:`~mmloom.errors.MmloomError` (it is never silently approximated).
"""

from __future__ import annotations

from typing import Any

from mmloom.errors import MmloomError
from mmloom.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    RESAMPLE,
    CenterCrop,
    ExpandToSquare,
    ImageTransform,
    Normalize,
    Resize,
    ToTensor,
)

ORDER = (ExpandToSquare, Resize, CenterCrop, ToTensor, Normalize)


def llava_background(image_mean) -> tuple[int, ...]:
    """The pad colour of LLaVA's ``expand2square`` and transformers' ``LlavaImageProcessor``."""
    return tuple(int(m * 255) for m in image_mean)


def _check_order(transform: ImageTransform) -> dict[type, Any]:
    steps: dict[type, Any] = {}
    last = -1
    for step in transform.steps:
        kind = next((k for k in ORDER if isinstance(step, k)), None)
        position = ORDER.index(kind) if kind is not None else -1
        if kind is CenterCrop:
            position = max(position, last)  # a crop commutes with rescale / normalize
        if kind is None or kind in steps or position < last:
            raise MmloomError(
                f"the image transform {transform!r} has no transformers image processor equivalent: its steps "
                "must be a subsequence of expand_to_square, resize, center_crop, to_tensor/rescale, normalize"
            )
        steps[kind] = step
        last = position
    return steps


def transform_to_hf(transform: ImageTransform, pad_class: str = "LlavaImageProcessor"):
    """(an equivalent transformers image processor, pads_to_square) for an :class:`ImageTransform`.

    The processor is a ``CLIPImageProcessor`` when the transform does not pad to a square, else
    `pad_class` (``LlavaImageProcessor`` with ``do_pad=True``; pass ``"CLIPImageProcessor"`` for the
    original LLaVA layout, where ``image_aspect_ratio: "pad"`` does the padding).
    Raises MmloomError when no processor reproduces the transform."""
    import transformers

    steps = _check_order(transform)
    resize: Resize | None = steps.get(Resize)
    crop: CenterCrop | None = steps.get(CenterCrop)
    rescale: ToTensor | None = steps.get(ToTensor)
    normalize: Normalize | None = steps.get(Normalize)
    pad: ExpandToSquare | None = steps.get(ExpandToSquare)
    if normalize is not None:
        mean, std = list(normalize.mean), list(normalize.std)
    elif pad is not None:  # only the pad colour reads image_mean: choose the mean that gives it back
        mean, std = [(c + 0.5) / 255 for c in pad.background_color], list(CLIP_STD)
    else:
        mean, std = list(CLIP_MEAN), list(CLIP_STD)
    if pad is not None and tuple(pad.background_color) != llava_background(mean):
        raise MmloomError(
            f"the image transform pads with {tuple(pad.background_color)}, but transformers' LlavaImageProcessor "
            f"and the original LLaVA code pad with int(image_mean * 255) = {llava_background(mean)}; "
            "no exported processor can reproduce it"
        )
    kwargs: dict[str, Any] = {
        "do_resize": resize is not None,
        "do_center_crop": crop is not None,
        "do_rescale": rescale is not None,
        "rescale_factor": rescale.factor if rescale is not None else 1 / 255,
        "do_normalize": normalize is not None,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
    }
    size = transform.image_size or 224
    if resize is not None:
        kwargs["size"] = ({"shortest_edge": resize.size} if isinstance(resize.size, int)
                          else {"height": resize.size[0], "width": resize.size[1]})
        kwargs["resample"] = int(RESAMPLE[resize.interpolation])
    else:
        kwargs["size"] = {"shortest_edge": size}
    crop_size = crop.size if crop is not None else (size, size)
    kwargs["crop_size"] = {"height": crop_size[0], "width": crop_size[1]}
    if pad is not None and pad_class == "LlavaImageProcessor":
        return transformers.LlavaImageProcessor(do_pad=True, **kwargs), True
    return transformers.CLIPImageProcessor(**kwargs), pad is not None


def hf_image_processor(processor, pad_class: str = "LlavaImageProcessor"):
    """(a transformers image processor, pads_to_square) for what mmloom keeps as a vision processor:
    an :class:`ImageTransform` (converted by :func:`transform_to_hf`) or a transformers image processor
    (returned as it is; it pads when it has ``do_pad``). For `pad_class` "CLIPImageProcessor" a padding
    ``LlavaImageProcessor`` becomes a CLIPImageProcessor plus the pad flag.
    Raises MmloomError for a processor that is neither."""
    import transformers

    if isinstance(processor, ImageTransform):
        return transform_to_hf(processor, pad_class)
    if not hasattr(processor, "preprocess") or not hasattr(processor, "to_dict"):
        raise MmloomError(
            f"the vision processor {type(processor).__name__} is neither an mmloom ImageTransform nor a "
            "transformers image processor; no export can hold it"
        )
    pads = bool(getattr(processor, "do_pad", False)) and "Llava" in type(processor).__name__
    if pads and pad_class == "CLIPImageProcessor":
        settings = {k: v for k, v in processor.to_dict().items()
                    if k not in ("do_pad", "image_processor_type", "processor_class", "_processor_class")}
        return transformers.CLIPImageProcessor(**settings), True
    return processor, pads


def transform_from_hf(image_processor, pad_to_square: bool) -> ImageTransform:
    """The :class:`ImageTransform` that reproduces a CLIP-style transformers image processor, with
    LLaVA's ``expand2square`` first when `pad_to_square` (``image_aspect_ratio: "pad"``).
    Raises MmloomError when its resample has no PIL equivalent or its size is neither ``shortest_edge`` nor
    height/width."""
    from mmloom.processing.image import build_step

    get = lambda key, default=None: getattr(image_processor, key, default)  # noqa: E731
    mean = list(get("image_mean") or CLIP_MEAN)
    std = list(get("image_std") or CLIP_STD)
    size, crop = get("size") or {}, get("crop_size") or {}
    resample = int(get("resample", 3))
    interpolation = next((name for name, value in RESAMPLE.items() if int(value) == resample), None)
    if interpolation is None:
        raise MmloomError(f"image processor resample {resample!r} has no PIL equivalent")
    if "shortest_edge" in size:
        resize_size: Any = int(size["shortest_edge"])
    elif "height" in size and "width" in size:
        resize_size = [int(size["height"]), int(size["width"])]
    else:
        raise MmloomError(f"image processor size {size!r} is neither shortest_edge nor height/width")
    steps = []
    if pad_to_square:
        steps.append({"name": "expand_to_square", "background_color": list(llava_background(mean))})
    if get("do_resize", True):
        steps.append({"name": "resize", "size": resize_size, "interpolation": interpolation})
    if get("do_center_crop", True) and crop:
        steps.append({"name": "center_crop", "size": [int(crop["height"]), int(crop["width"])]})
    if get("do_rescale", True):
        steps.append({"name": "rescale", "factor": float(get("rescale_factor", 1 / 255))})
    if get("do_normalize", True):
        steps.append({"name": "normalize", "mean": mean, "std": std})
    image_size = int(crop["height"]) if crop and get("do_center_crop", True) else (
        resize_size if isinstance(resize_size, int) else resize_size[0])
    return ImageTransform.from_steps([build_step(s, image_size) for s in steps], image_size)
