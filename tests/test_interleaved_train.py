"""Several images per sample in training: the HDF5 dataset yields every image of a sample, the
collators put the image id into every image run and stack the images row-major, and packed rows
compute exactly what padded rows compute on a mix of 1-image, 3-image and text-only samples; 2 gloo
ranks (DDP, FSDP2), one with several images per micro-batch and the other with none, train as 1 process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import IMAGE_ID, vlm
from mmloom.cli.main import main
from mmloom.data.collate import PackedCollator, TrainCollator
from mmloom.data.hdf5_dataset import HDF5LlavaDataset
from mmloom.errors import MmloomError
from mmloom.model.attention import use_packed_attention
from mmloom.processing.image import ImageTransform
from test_packing import fast_loss_and_grads, row_spans, run, sample_loss_sums, train

PAD, NP = 3, 16
COLOURS = [(220, 30, 30), (30, 200, 60), (40, 60, 220), (230, 220, 40), (200, 200, 200)]


def rec(images, *turns):
    r = {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}
    if images:
        r["image"] = images
    return r


def records() -> list[dict]:
    """1-image, 3-image (two placeholders in turn 1, one in turn 3), 2-image and text-only records."""
    out = []
    for i in range(12):
        a, b, c = (f"img{(i + k) % 5}.png" for k in range(3))
        kind = i % 4
        if kind == 0:
            out.append(rec(a, ("human", "<image>\nWhat colour is it?"), ("gpt", "Red." if i % 8 else "A blue one.")))
        elif kind == 1:
            out.append(rec([a, b, c], ("human", "<image>\n<image>\nCompare the two."), ("gpt", "The first is darker."),
                           ("human", "Why?"), ("gpt", "Less light."), ("human", "<image>\nAnd this one?"),
                           ("gpt", "Brighter.")))
        elif kind == 2:
            out.append(rec(None, ("human", "Tell me a story."), ("gpt", "Once upon a time." * (1 + i % 3))))
        else:
            out.append(rec([a, b], ("human", "<image>\nFirst?"), ("gpt", "Green."), ("human", "<image>\nSecond?"),
                           ("gpt", "Yellow.")))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mmloom.testing import tiny_tokenizer

    root = tmp_path_factory.mktemp("interleaved")
    tiny_tokenizer().save_pretrained(root / "tok")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, colour in enumerate(COLOURS):
        arr = np.clip(np.full((32, 32, 3), colour, int) + rng.integers(-30, 30, (32, 32, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(root / "images" / f"img{i}.png")
    (root / "jsonl").mkdir()
    (root / "jsonl" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    cfg = {"setup": {"input_dir": str(root / "jsonl"), "output_dir": str(root / "h5"), "samples_per_file": 4},
           "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": 256},
           "dataset": {"num_patches": NP, "image_dir": str(root / "images"), "system_prompt_style": "vicuna_v1"}}
    (root / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(root / "build.yaml"), "--quiet"]) == 0
    return root


def dataset(data) -> HDF5LlavaDataset:
    return HDF5LlavaDataset(data / "h5", data / "images", ImageTransform(image_size=32))


def test_dataset_yields_every_image_and_collator_fills_every_run(data):
    ds = dataset(data)
    transform = ImageTransform(image_size=32)
    expected = [r.get("image") for r in records()]
    items = [ds[i] for i in range(len(ds))]
    for item, images in zip(items, expected, strict=True):
        images = [] if images is None else [images] if isinstance(images, str) else images
        if len(images) > 1:
            assert [e["span"][1] for e in item["vision"]] == [NP] * len(images)
            for entry, name in zip(item["vision"], images, strict=True):
                want = torch.as_tensor(transform(Image.open(data / "images" / name).convert("RGB")))
                torch.testing.assert_close(entry["pixel_values"], want)
            assert item["vision"][0]["span"][0] == item["image_start_idx"]
        assert item["has_image"] == bool(images)
    batch = TrainCollator(IMAGE_ID, PAD, NP)(items[:8])  # files 0 and 1: 1, 3, 0, 2 images each
    assert batch["image_counts"] == [1, 3, 0, 2] * 2 and batch["num_images"] == 12
    assert ((batch["input_ids"] == IMAGE_ID).sum(1) // NP).tolist() == [1, 3, 1, 2] * 2  # + the dummy's masked run
    # row-major: the images in the order of their runs, sample by sample (the text-only ones' dummies between)
    pixels = batch["vision"]["pixel_values"]
    order = [e["pixel_values"] for item in items[:8] for e in (item.get("vision") or
                                                             [{"pixel_values": item["image_data"]}])]
    assert pixels.shape[0] == len(order) == 14
    for got, want in zip(pixels, order, strict=True):
        torch.testing.assert_close(got, want)


def test_packed_loss_equals_padded_loss(data):
    torch.set_num_threads(1)
    model = vlm().float()
    items = [dataset(data)[i] for i in (0, 1, 2, 5, 6, 9)]  # 1, 3, 0, 3, 0, 3 images
    collator = TrainCollator(IMAGE_ID, PAD, NP)
    plain = collator(items)
    packed = PackedCollator(collator)(items)
    assert packed["num_images"] == plain["num_images"] == 10
    assert packed["vision"]["pixel_values"].shape[0] == 10  # packed rows drop the text-only samples' dummies
    assert int((packed["input_ids"] == IMAGE_ID).sum()) == 10 * NP
    use_packed_attention(model.language_model)
    with torch.no_grad():
        a = sample_loss_sums(run(model, plain).logits, plain["labels"], row_spans(plain))
        b = sample_loss_sums(run(model, packed).logits, packed["labels"], packed["spans"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    denom = torch.tensor(float(plain["num_loss_tokens"]))
    loss_a, ga = fast_loss_and_grads(model, plain, denom)
    loss_b, gb = fast_loss_and_grads(model, packed, denom)
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_images_matter(data):
    """Changing the third image of a 3-image sample changes its loss (every image reaches the LLM)."""
    model = vlm().float()
    item = dataset(data)[1]
    collator = TrainCollator(IMAGE_ID, PAD, NP)
    changed = {**item, "vision": [*item["vision"][:2], {**item["vision"][2],
                                                       "pixel_values": torch.zeros_like(item["vision"][2]["pixel_values"])}]}
    with torch.no_grad():
        a = run(model, collator([item])).loss.item()
        b = run(model, collator([changed])).loss.item()
    assert abs(a - b) > 1e-6


def test_trainer_packing_and_grouping_match_plain(data, tmp_path):
    torch.set_num_threads(1)
    plain = train(data, tmp_path / "plain", "runconfig.max_steps=2")
    packed = train(data, tmp_path / "packed", "runconfig.max_steps=2", "train_input.packing=true")
    grouped = train(data, tmp_path / "grouped", "runconfig.max_steps=2", "train_input.group_by_length=true")
    assert sorted(plain) == sorted(packed) == sorted(grouped) == [1, 2]
    for s in plain:
        for other in (packed, grouped):
            assert abs(other[s]["loss"] - plain[s]["loss"]) < 2e-5, (s, plain[s]["loss"], other[s]["loss"])
            assert other[s]["loss_tokens"] == plain[s]["loss_tokens"]


def test_cached_features_refuse_several_images(data, tmp_path):
    from mmloom.training.config import InputConfig
    from mmloom.training.data import build_dataset

    section = InputConfig.model_validate({"data_dir": str(data / "h5"), "img_data_dir": str(data / "images"),
                                          "batch_size": 4, "use_cached_features": True})
    with pytest.raises(MmloomError, match="samples with several images, and the feature cache holds one image"):
        build_dataset(section, 32)


def test_several_images_with_audio_train_packed_as_padded(tmp_path):
    """Records with several images and audio clips: the dataset yields both, and an audio + vision
    composite trains on them with packing to the losses of padded rows (every sample of the data is
    in the two steps of 4)."""
    from audio_data import make_audio_data
    from mmloom.training.config import InputConfig
    from mmloom.training.modalities import media_readers
    from test_audio_train import args_for, losses

    both = [
        {"id": "m1", "image": ["img0.png", "img1.png"], "audio": "clip0.wav", "conversations": [
            {"from": "human", "value": "<image>\n<image>\n<audio>\nWhich picture goes with the tone?"},
            {"from": "gpt", "value": "The first."}]},
        {"id": "m2", "image": ["img1.png", "img2.png", "img0.png"], "audio": ["clip1.wav", "clip2.wav"],
         "conversations": [{"from": "human", "value": "<image>\n<audio>\nLow or high?"}, {"from": "gpt", "value": "High."},
                           {"from": "human", "value": "<image> and <image>, with <audio>: same colour?"},
                           {"from": "gpt", "value": "No."}]},
        {"id": "m3", "image": ["img3.png", "img0.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nSame colour?"}, {"from": "gpt", "value": "No."}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hi."}]},
    ]
    data = make_audio_data(tmp_path / "data", n=4, with_images=True, extra_records=both, msl=256)
    params = json.loads((data / "h5" / "data_params.json").read_text())
    assert params["post-process"]["n_examples"] == 8 and params["image_patch_info"]["samples"]["several_images"] == 3
    section = InputConfig.model_validate({"data_dir": str(data / "h5"), "img_data_dir": str(data / "images"),
                                          "audio_data_dir": str(data / "audio"), "batch_size": 4})
    ds = HDF5LlavaDataset(data / "h5", data / "images", ImageTransform(image_size=32), media_readers=media_readers(section))
    m2 = ds[5]
    assert len(m2["vision"]) == 3 and len(m2["audio"]) == 2
    runs = sorted([(e["span"][0], "image") for e in m2["vision"]] + [(e["span"][0], "audio") for e in m2["audio"]])
    assert [kind for _, kind in runs] == ["image", "audio", "image", "image", "audio"]  # in placeholder order
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    short = ["runconfig.max_steps=2", "train_input.batch_size=4", "train_input.micro_batch_size=2",
             "runconfig.checkpoint_steps=2"]
    assert main(args_for("audio_vision.yaml", data, plain, *short)) == 0
    assert main(args_for("audio_vision.yaml", data, packed, *short, "train_input.packing=true")) == 0
    got, expected = losses(packed), losses(plain)
    assert sorted(expected) == [1, 2]
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-5 * max(1.0, expected[step]), (got, expected)


# ------------------------------------------------------------------------ two ranks
def uneven_records() -> list[dict]:
    """8 records in an order that gives, unshuffled with batches of 4 and micro-batches of 2 on 2 ranks,
    rank 0 several images in every micro-batch and rank 1 none (step 1) or one (step 2)."""
    three = rec(["img0.png", "img1.png", "img2.png"], ("human", "<image>\n<image>\nCompare the two."),
                ("gpt", "The first is darker."), ("human", "<image>\nAnd this one?"), ("gpt", "Brighter."))
    two = rec(["img3.png", "img4.png"], ("human", "<image>\nFirst?"), ("gpt", "Green."), ("human", "<image>\nSecond?"),
              ("gpt", "Yellow."))
    text = rec(None, ("human", "Tell me a story."), ("gpt", "Once upon a time."))
    other = rec(None, ("human", "Hello."), ("gpt", "Hi there, how are you?"))
    one = rec("img2.png", ("human", "<image>\nWhat colour is it?"), ("gpt", "Blue."))
    return [three, two, text, other, two, three, one, text]


@pytest.fixture(scope="module")
def uneven(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    (root / "jsonl").mkdir()
    (root / "jsonl" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in uneven_records()))
    cfg = yaml.safe_load((data / "build.yaml").read_text())
    cfg["setup"].update(input_dir=str(root / "jsonl"), output_dir=str(root / "h5"))
    (root / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(root / "build.yaml"), "--quiet"]) == 0
    (root / "images").symlink_to(data / "images")
    return root


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_ranks_with_several_images_on_one_and_none_on_the_other(uneven, tmp_path, distributed):
    """Everything trainable; rank 0's micro-batches hold 5 images each, rank 1's none, then one: the
    text-only micro-batch runs a dummy image through the tower and projector, so both ranks reduce the
    same parameters (no flag, no reduction error), and 2 gloo ranks give the losses and weights of 1
    process on the same global batches."""
    from mmloom.data.sampling import StepBatchSampler
    from test_packing import TINY
    from test_train_distributed import two_ranks_match_one_process

    counts = [len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r) for r in uneven_records()]
    per_rank = [[[counts[i] for i in mb] for step in range(2)
                 for mb in StepBatchSampler(8, 4, 2, rank, 2, 0, False, 0, 2).step_micro_batches(step)]
                for rank in range(2)]
    assert per_rank == [[[3, 2], [2, 3]], [[0, 0], [1, 0]]]
    start = json.loads((uneven / "h5" / "data_params.json").read_text())["image_patch_info"]["image_patch_start_idx"]
    sets = [f"train_input.data_dir={uneven / 'h5'}", f"train_input.img_data_dir={uneven / 'images'}",
            f"model.image_start_idx={start}", "runconfig.checkpoint_path=null", "runconfig.max_steps=2",
            "runconfig.log_steps=1", "runconfig.checkpoint_steps=2", "train_input.batch_size=4",
            "train_input.micro_batch_size=2", "train_input.shuffle=false", "model.freeze=[]", "eval_input=null"]

    def args(run, *more):
        out = ["train", str(TINY / "phase2.yaml"), "--model-dir", str(run), "--mode", "train"]
        for s in (*sets, *more):
            out += ["--set", s]
        return out

    two_ranks_match_one_process(args, tmp_path, distributed)
