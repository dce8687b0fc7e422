"""One batch format (`mmloom.model.batch`): the HDF5 collators, the jsonl collator and the processor
give the model the same inputs for the same record, and `model_inputs` leaves out labels and
bookkeeping."""

from __future__ import annotations

import json

import torch
from PIL import Image

from helpers import vlm
from mmloom.data.collate import PackedCollator, TrainCollator, collate_jsonl
from mmloom.data.hdf5_dataset import HDF5LlavaDataset
from mmloom.data.jsonl_dataset import JsonlLlavaDataset
from mmloom.model.attention import use_packed_attention
from mmloom.model.batch import batch_to_device, item_count, model_inputs
from mmloom.processing.image import ImageTransform
from mmloom.processing.processor import MultimodalProcessor
from test_tokenizer_layout import build

NP, IMG, PAD = 16, 4, 3
RECORD = {"id": "x", "image": "a.png",
          "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."}]}


def test_collators_and_processor_give_the_model_the_same_inputs(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    build(tmp_path, "one", tmp_path / "tok", [RECORD], "vicuna_v1", 200)
    transform = ImageTransform(image_size=32)
    item = HDF5LlavaDataset(tmp_path / "one_h5", tmp_path / "images", transform)[0]
    padded = TrainCollator(IMG, PAD, NP)([item])
    packed = PackedCollator(TrainCollator(IMG, PAD, NP))([item])
    (tmp_path / "r.jsonl").write_text(json.dumps(RECORD) + "\n")
    jsonl = collate_jsonl([JsonlLlavaDataset(tmp_path / "r.jsonl", tmp_path / "images", tokenizer, "vicuna_v1", NP,
                                             IMG, transform, 200)[0]], PAD)
    processor = MultimodalProcessor({"vision": transform}, tokenizer, "vicuna_v1", num_tokens={"vision": NP})
    processed = processor(conversations=[RECORD], images=[Image.open(tmp_path / "images" / "a.png")])

    model = vlm().eval()
    use_packed_attention(model.language_model)  # packed rows per sample; padded rows as before
    losses = []
    for batch in (padded, jsonl, processed, packed):
        inputs = model_inputs(batch)
        assert "labels" not in inputs and not {"num_loss_tokens", "has_image", "slots", "spans"} & set(inputs)
        assert set(inputs["vision"]) == {"pixel_values"} and item_count(batch, "vision") == 1
        torch.testing.assert_close(inputs["vision"]["pixel_values"], processed["vision"]["pixel_values"])
        ids = inputs["input_ids"][0]
        assert ids[ids != PAD].tolist() == processed["input_ids"][0].tolist()
        with torch.no_grad():
            losses.append(model(**inputs, labels=batch["labels"]).loss)
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])
    # packed rows: positions and boundaries go to the model, no attention mask
    inputs = model_inputs(packed, device="cpu")
    assert inputs["attention_mask"] is None and inputs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs["position_ids"].shape == packed["input_ids"].shape and inputs["max_length_q"] == packed["max_length_q"]


def test_batch_to_device_moves_modality_dicts_and_keeps_bookkeeping():
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "vision": {"pixel_values": torch.zeros(1, 3, 2, 2)},
             "audio": {"input_features": torch.zeros(2, 4, 6)}, "num_samples": 1, "spans": [(0, 0, 3)]}
    moved = batch_to_device(batch, torch.device("meta"))
    assert moved["vision"]["pixel_values"].is_meta and moved["audio"]["input_features"].is_meta
    assert moved["num_samples"] == 1 and moved["spans"] == [(0, 0, 3)]
    assert item_count(batch, "audio") == 2 and item_count(batch, "vision", "module_features") == 0
    assert item_count(batch, "video") == 0
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "vision", "audio"}
