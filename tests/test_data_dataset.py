"""HDF5LlavaDataset + LlavaCollator, and the direct JsonlLlavaDataset, on a tiny built dataset."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmloom.data.build import build
from mmloom.data.build_config import parse_build_config
from mmloom.data.collate import LlavaCollator, collate_jsonl
from mmloom.data.hdf5_dataset import HDF5LlavaDataset
from mmloom.data.jsonl_dataset import JsonlLlavaDataset
from mmloom.errors import MmloomError
from mmloom.processing.image import ImageTransform, load_image
from mmloom.processing.templates import get_template

MSL, NP, SIZE = 160, 16, 32
PAD, IMG = 3, 4

RECORDS = [
    {
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "What is it?\n<image>"},
            {"from": "gpt", "value": "A red circle."},
        ],
    },
    {
        "conversations": [
            {"from": "human", "value": "Is there a circle?"},
            {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "Where?"},
            {"from": "gpt", "value": "Left."},
        ]
    },
    {
        "image": "b.png",
        "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes?"},
            {"from": "gpt", "value": "Two green triangles."},
        ],
    },
]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    from skimage import data

    root = tmp_path_factory.mktemp("ds")
    tokenizer.save_pretrained(root / "tok")
    (root / "images").mkdir()
    Image.fromarray(data.astronaut()).resize((40, 32)).save(root / "images" / "a.png")
    Image.fromarray(data.astronaut()[::-1]).resize((32, 32)).save(root / "images" / "b.png")
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    cfg = parse_build_config(
        {
            "setup": {
                "input_dir": str(root / "in.jsonl"),
                "output_dir": str(root / "h5"),
                "samples_per_file": 2,
            },
            "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": MSL},
            "dataset": {
                "num_patches": NP,
                "image_dir": str(root / "images"),
                "system_prompt_style": "vicuna_v1",
            },
        }
    )
    params = build(cfg, quiet=True)
    assert params["post-process"]["successful_files"] == 3
    return root


@pytest.fixture()
def transform():
    return ImageTransform(image_size=SIZE)


def test_dataset_five_tensors(built, transform):
    ds = HDF5LlavaDataset(built / "h5", built / "images", transform)
    assert len(ds) == 3 and len(ds.files) == 2
    items = [ds[i] for i in range(3)]
    for item, has in zip(items, [True, False, True], strict=True):
        assert set(item) == {
            "image_data",
            "labels",
            "key_padding_mask",
            "text_input_ids",
            "loss_mask",
            "has_image",
            "image_start_idx",
            "index",
        }
        assert item["image_data"].shape == (3, SIZE, SIZE) and item["image_data"].dtype == torch.float32
        for key in ("labels", "key_padding_mask", "text_input_ids", "loss_mask"):
            assert item[key].shape == (MSL,) and item[key].dtype == torch.int32
        assert item["has_image"] is has
        assert torch.equal(item["labels"][:-1], item["text_input_ids"][1:])
    expected = torch.from_numpy(transform(load_image(built / "images" / "a.png")))
    assert torch.equal(items[0]["image_data"], expected)
    assert not items[1]["image_data"].any()  # dummy image for the text-only sample
    assert (
        ds[-1]["has_image"]
        and HDF5LlavaDataset(built / "h5", built / "images", transform, dtype=torch.bfloat16)[0][
            "image_data"
        ].dtype
        == torch.bfloat16
    )
    with pytest.raises(IndexError):
        ds[3]


def test_lazy_open_and_pickle(built, transform):
    ds = HDF5LlavaDataset(built / "h5", built / "images", transform)
    assert not ds.h5.opened
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone.h5.opened
    ds[0]
    assert ds.h5.opened
    clone2 = pickle.loads(pickle.dumps(ds))
    assert not clone2.h5.opened
    assert torch.equal(clone2[2]["text_input_ids"], ds[2]["text_input_ids"])
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, num_workers=1, collate_fn=LlavaCollator(image_token_id=IMG, pad_token_id=PAD, num_feature_tokens=NP)
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (3, MSL) and batch["vision"]["pixel_values"].shape == (2, 3, SIZE, SIZE)


def test_missing_image_at_train_time(built, transform, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(built / "images", images)
    (images / "b.png").unlink()
    ds = HDF5LlavaDataset(built / "h5", images, transform)
    with pytest.raises(MmloomError, match=r"sample 2.*b\.png"):
        ds[2]


def _hand_collate(items, image_id, pad_id):
    out_ids, out_labels = [], []
    for it in items:
        ids = it["text_input_ids"].tolist()
        loss = it["loss_mask"].tolist()
        start = it["image_start_idx"]
        new = [
            image_id if (it["has_image"] and start <= k < start + NP) else t
            for k, t in enumerate(ids)
        ]
        labels = [-100] + [ids[t + 1] if loss[t] else -100 for t in range(len(ids) - 1)]
        out_ids.append(new)
        out_labels.append(labels)
    return torch.tensor(out_ids), torch.tensor(out_labels)


def test_collator_matches_hand_computation(built, transform, tokenizer):
    ds = HDF5LlavaDataset(built / "h5", built / "images", transform)
    items = [ds[1], ds[0], ds[2]]
    batch = LlavaCollator(image_token_id=IMG, pad_token_id=PAD, num_feature_tokens=NP)(items)
    ids, labels = _hand_collate(items, IMG, PAD)
    assert torch.equal(batch["input_ids"], ids) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], labels)
    assert torch.equal(
        batch["attention_mask"], 1 - torch.stack([i["key_padding_mask"] for i in items]).long()
    )
    assert (batch["input_ids"] == IMG).sum(1).tolist() == [0, NP, NP]
    assert torch.equal(batch["vision"]["pixel_values"], torch.stack([items[1]["image_data"], items[2]["image_data"]]))
    assert (
        batch["num_loss_tokens"]
        == int((labels != -100).sum())
        == sum(int(i["loss_mask"].sum()) for i in items)
    )
    assert batch["has_image"].tolist() == [False, True, True]
    # supervised targets are exactly the answers (+ </s>)
    sup = tokenizer.decode(batch["labels"][1][batch["labels"][1] != -100])
    assert sup == " A red circle.</s>"

    trimmed = LlavaCollator(IMG, PAD, NP, trim=True)(items)
    length = int(batch["attention_mask"].any(0).nonzero().max()) + 1  # last column any sample attends to
    assert trimmed["input_ids"].shape == (3, length) and length < MSL
    assert torch.equal(trimmed["labels"], batch["labels"][:, :length])
    assert trimmed["num_loss_tokens"] == batch["num_loss_tokens"]
    assert "vision" not in LlavaCollator(IMG, PAD, NP)([ds[1]])


def test_jsonl_dataset_matches_h5(built, transform, tokenizer):
    jds = JsonlLlavaDataset(
        built / "in.jsonl",
        built / "images",
        tokenizer,
        get_template("vicuna_v1"),
        num_feature_tokens=NP,
        image_token_id=IMG,
        image_transform=transform,
        max_length=MSL,
    )
    assert len(jds) == 3 and not jds.skipped
    h5 = HDF5LlavaDataset(built / "h5", built / "images", transform)
    for i in range(3):
        j, h = jds[i], h5[i]
        coll = LlavaCollator(IMG, PAD, NP)([h])
        n = len(j["input_ids"])
        if h["has_image"]:
            assert torch.equal(coll["input_ids"][0, :n], j["input_ids"])
            assert torch.equal(coll["labels"][0, :n], j["labels"])
            assert int(coll["attention_mask"][0].sum()) == n
            assert torch.equal(j["pixel_values"], h["image_data"][None])  # (N_images, 3, H, W)
        else:  # h5 keeps masked slots for text-only samples, the jsonl path has none
            keep = coll["attention_mask"][0] == 1
            assert torch.equal(coll["input_ids"][0][keep], j["input_ids"])
            assert torch.equal(coll["labels"][0][keep], j["labels"])
            assert j["pixel_values"] is None and (j["input_ids"] != IMG).all()

    for side in ("right", "left"):
        b = collate_jsonl([jds[0], jds[1]], pad_token_id=PAD, padding_side=side)
        n0, n1 = len(jds[0]["input_ids"]), len(jds[1]["input_ids"])
        assert b["input_ids"].shape == (2, max(n0, n1)) and b["vision"]["pixel_values"].shape == (1, 3, SIZE, SIZE)
        assert b["attention_mask"].sum(1).tolist() == [n0, n1]
        short = 1 if n1 < n0 else 0
        pad_cols = b["attention_mask"][short] == 0
        assert (b["input_ids"][short][pad_cols] == PAD).all() and (b["labels"][short][pad_cols] == -100).all()
        assert bool(pad_cols[-1]) == (side == "right")
        assert b["num_loss_tokens"] == int((b["labels"] != -100).sum())

    other = JsonlLlavaDataset(
        built / "in.jsonl", built / "images", tokenizer, "vicuna_v1", NP, 400, transform, MSL
    )  # a model-side image token id that differs from the tokenizer's <image>
    assert (other[0]["input_ids"] == 400).sum() == NP and (other[0]["input_ids"] == IMG).sum() == 0

    small = JsonlLlavaDataset(
        built / "in.jsonl",
        built / "images",
        tokenizer,
        "vicuna_v1",
        num_feature_tokens=NP,
        image_token_id=IMG,
        image_transform=transform,
        max_length=100,
    )
    assert small.skipped["too_long"] >= 1 and len(small) + sum(small.skipped.values()) == 3
    with pytest.raises(MmloomError, match="in.jsonl:"):
        JsonlLlavaDataset(
            built / "in.jsonl",
            built / "images",
            tokenizer,
            "vicuna_v1",
            num_feature_tokens=NP,
            image_token_id=IMG,
            image_transform=transform,
            max_length=100,
            strict=True,
        )


def test_h5_rows_are_the_seed_layout(built):
    import h5py

    with h5py.File(built / "h5" / "data-00000.h5", "r") as f:
        assert f.attrs["n_examples"] == 2 and f["data"].shape == (2, 4, MSL) and f["data"].dtype == np.int32
        assert [p[0] for p in f["img_path"][:]] == [b"a.png", b"None"]
    params = json.loads((built / "h5" / "data_params.json").read_text())
    start = params["image_patch_info"]["image_patch_start_idx"]
    with h5py.File(built / "h5" / "data-00000.h5", "r") as f:
        rows = f["data"][0]
    assert (rows[0, start : start + NP] == PAD).all() and (rows[3, start : start + NP] == 0).all()
    assert Path(built / "h5" / "data-00001.h5").is_file()
