"""Data-layout edge cases: images outside the first turn, several images per record, Cerebras'
text-only `img_path` b"None" both ways, files without mmloom's per-sample slot positions, BOM and
non-UTF-8 input lines, corrupt data_params.json."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from mmloom.cli.main import main
from mmloom.data.collate import LlavaCollator
from mmloom.data.hdf5_dataset import HDF5LlavaDataset
from mmloom.data.jsonl_dataset import JsonlLlavaDataset
from mmloom.errors import MmloomError
from mmloom.processing.image import ImageTransform
from mmloom.processing.processor import MultimodalProcessor
from test_tokenizer_layout import build, read_h5

NP, IMG, PAD = 16, 4, 3


def rec(image, *turns):
    r = {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        r["image"] = image
    return r


FIRST = rec("a.png", ("human", "<image>\nWhat is it?"), ("gpt", "A circle."))
LATER = rec("b.png", ("human", "Hello."), ("gpt", "Hi."), ("human", "What is this?\n<image>"), ("gpt", "A square."))
TEXT = rec(None, ("human", "Tell me a story."), ("gpt", "Once."))
MULTI = rec(["a.png", "b.png"], ("human", "Compare <image> and <image> please."), ("gpt", "Both red."))


@pytest.fixture()
def root(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "images" / "b.png")
    return tmp_path


def test_image_in_later_turn_counted_kept_or_skipped(root, tokenizer):
    params = build(root, "later", root / "tok", [FIRST, LATER, TEXT], "vicuna_v1", 200)
    info = params["image_patch_info"]
    assert info["samples"] == {"image_in_first_turn": 1, "image_in_later_turn": 1, "text_only": 1}
    rows, paths, starts = read_h5(root / "later_h5")
    first_start = info["image_patch_start_idx"]
    assert starts[0] == first_start and starts[2] == first_start and starts[1] > first_start
    assert info["image_in_later_turn_start_idx_counts"] == {str(starts[1]): 1}
    # mmloom's trainer puts the features exactly at the recorded slots of each sample
    ds = HDF5LlavaDataset(root / "later_h5", root / "images", ImageTransform(image_size=32))
    batch = LlavaCollator(IMG, PAD, NP)([ds[0], ds[1], ds[2]])
    for i, start in enumerate(starts):
        where = (batch["input_ids"][i] == IMG).nonzero().flatten().tolist()
        assert where == (list(range(start, start + NP)) if i != 2 else [])
    # the text after the later-turn image is what LLaVA has: "<image>\nWhat is this?"
    after = tokenizer.decode(rows[1, 0, starts[1] + NP : starts[1] + NP + 12])
    assert after.startswith("\nWhat is this?")
    skipped = build(root, "later_skip", root / "tok", [FIRST, LATER, TEXT], "vicuna_v1", 200,
                    image_in_later_turn="skip")
    assert skipped["post-process"]["skipped"] == {"image_in_later_turn": 1}
    assert skipped["image_patch_info"]["samples"]["image_in_later_turn"] == 0


def test_several_images_per_record(root, tokenizer):
    # HDF5 for Cerebras (one image per sample): a counted skip with multiple_images: skip
    params = build(root, "multi", root / "tok", [FIRST, MULTI], "vicuna_v1", 200, multiple_images="skip")
    assert params["post-process"]["skipped"] == {"multiple_images": 1}
    assert params["dataset"]["multiple_images"] == "skip"
    # the jsonl dataset and the processor keep each placeholder where it is
    (root / "multi.jsonl").write_text(json.dumps(MULTI) + "\n")
    ds = JsonlLlavaDataset(root / "multi.jsonl", root / "images", tokenizer, "vicuna_v1", NP, IMG,
                           ImageTransform(image_size=32), 200)
    item = ds[0]
    assert item["pixel_values"].shape == (2, 3, 32, 32)
    ids = item["input_ids"].tolist()
    runs = [i for i in range(len(ids)) if ids[i] == IMG and (i == 0 or ids[i - 1] != IMG)]
    assert len(runs) == 2 and (item["input_ids"] == IMG).sum() == 2 * NP
    between = tokenizer.decode(ids[runs[0] + NP : runs[1]])
    assert between == " and "  # "Compare <image> and <image> please." in place, not moved to the front
    assert float(item["pixel_values"][0].mean()) != float(item["pixel_values"][1].mean())  # order kept
    processor = MultimodalProcessor({"vision": ImageTransform(image_size=32)}, tokenizer, "vicuna_v1",
                                    num_tokens={"vision": NP})
    batch = processor(conversations=[MULTI], images=[[Image.open(root / "images" / "a.png"),
                                                      Image.open(root / "images" / "b.png")]])
    assert batch["input_ids"][0].tolist() == ids and batch["vision"]["pixel_values"].shape[0] == 2


def test_cerebras_files_read_and_written(root, tokenizer):
    """mmloom writes b"None" for text-only samples and reads Cerebras' files: no per-sample
    positions (the dataset's image_patch_start_idx for every sample), img_path b"None"."""
    params = build(root, "cb", root / "tok", [FIRST, TEXT, FIRST], "vicuna_v1", 200)
    start = params["image_patch_info"]["image_patch_start_idx"]
    _, paths, _ = read_h5(root / "cb_h5")
    assert paths == [b"a.png", b"None", b"a.png"]
    for f in (root / "cb_h5").glob("data-*.h5"):  # what Cerebras' preprocessing writes: no image_start_idx
        with h5py.File(f, "a") as h:
            del h["image_start_idx"]
    cerebras = json.loads((root / "cb_h5" / "data_params.json").read_text())  # and no list of its files
    for key in ("output_files", "output_file_info"):
        cerebras["post-process"].pop(key)
    (root / "cb_h5" / "data_params.json").write_text(json.dumps(cerebras))
    ds = HDF5LlavaDataset(root / "cb_h5", root / "images", ImageTransform(image_size=32))
    items = [ds[i] for i in range(3)]
    assert [it["image_start_idx"] for it in items] == [start] * 3
    assert [it["has_image"] for it in items] == [True, False, True]
    assert not items[1]["image_data"].any()  # dummy image, never images/None
    batch = LlavaCollator(IMG, PAD, NP)(items)
    assert (batch["input_ids"] == IMG).sum(1).tolist() == [NP, 0, NP]
    ds.close()
    # an older mmloom file (b"" for text-only) reads the same
    for f in (root / "cb_h5").glob("data-*.h5"):
        with h5py.File(f, "a") as h:
            old = [b"" if p[0] == b"None" else p[0] for p in h["img_path"][:]]
            del h["img_path"]
            h.create_dataset("img_path", data=np.array(old, dtype="S8").reshape(-1, 1))
    assert [HDF5LlavaDataset(root / "cb_h5", root / "images", ImageTransform(image_size=32))[i]["has_image"]
            for i in range(3)] == [True, False, True]


def test_slots_found_by_position_not_by_pad_value(root, tokenizer):
    """A pad id that occurs in attended text (pad = eos) never becomes an image slot."""
    params = build(root, "padeos", root / "tok", [FIRST, TEXT], "vicuna_v1", 200)
    ds = HDF5LlavaDataset(root / "padeos_h5", root / "images", ImageTransform(image_size=32))
    eos = tokenizer.eos_token_id
    batch = LlavaCollator(IMG, eos, NP)([ds[0], ds[1]])  # "pad" = EOS: every answer ends with one
    assert (batch["input_ids"] == IMG).sum(1).tolist() == [NP, 0]
    start = params["image_patch_info"]["image_patch_start_idx"]
    assert start > 0
    with pytest.raises(MmloomError, match="sample 0: image slots .* run past"):
        LlavaCollator(IMG, PAD, NP)([dict(ds[0], image_start_idx=200 - 5)])
    with pytest.raises(MmloomError, match="sample 0: some of its image slots"):
        LlavaCollator(IMG, PAD, NP)([dict(ds[0], image_start_idx=150)])  # into the padding tail
    with pytest.raises(MmloomError, match="sample 0 has an image but no recorded image slots"):
        LlavaCollator(IMG, PAD, NP)([dict(ds[0], image_start_idx=-1)])


def test_text_only_samples_without_slots(root, tokenizer):
    """`text_only_slots: false`: a text-only sample is its text alone (LLaVA's layout) and trains:
    a micro-batch without any image gets one extra unlabelled row that carries the dummy image."""
    from helpers import vlm
    from mmloom.data.collate import TrainCollator
    from mmloom.processing.processor import MultimodalProcessor

    params = build(root, "noslots", root / "tok", [FIRST, TEXT], "vicuna_v1", 200, text_only_slots=False)
    rows, paths, starts = read_h5(root / "noslots_h5")
    assert paths == [b"a.png", b"None"] and starts[1] == -1 and (rows[1, 3, : int((rows[1, 3] == 0).sum())] == 0).all()
    assert params["image_patch_info"]["image_patch_start_idx"] == starts[0]
    ds = HDF5LlavaDataset(root / "noslots_h5", root / "images", ImageTransform(image_size=32))
    batch = TrainCollator(IMG, PAD, NP)([ds[1]])
    n = int(ds[1]["key_padding_mask"].eq(0).sum())
    assert batch["input_ids"].shape == (2, max(n, NP)) and batch["num_samples"] == 1
    assert (batch["input_ids"][1, :NP] == IMG).all() and (batch["labels"][1] == -100).all()
    assert batch["vision"]["pixel_values"].shape == (1, 3, 32, 32) and not batch["vision"]["pixel_values"].any()
    model = vlm().eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    loss = model(**inputs, pixel_values=batch["vision"]["pixel_values"]).loss
    # the same conversation through the processor (no image, no slots): the same loss
    processor = MultimodalProcessor({"vision": ImageTransform(image_size=32)}, tokenizer, "vicuna_v1",
                                    num_tokens={"vision": NP})
    alone = processor(conversations=[TEXT])
    assert alone["input_ids"][0].tolist() == batch["input_ids"][0, :n].tolist()
    torch.testing.assert_close(model(**{k: alone[k] for k in ("input_ids", "attention_mask", "labels")}).loss, loss)


def test_long_text_only_conversation_fits_without_slots(root, tokenizer):
    """MSL 2048, 576 slots: a ~1570-token text-only conversation is dropped (too_long) when text-only
    samples carry masked slots (1570 + 576 > 2048), and kept whole without them; it trains packed."""
    from mmloom.data.collate import PackedCollator, TrainCollator

    story = " ".join(["the red square is left of the blue circle"] * 99)
    long_text = rec(None, ("human", "Tell me a long story."), ("gpt", story))
    seed_layout = build(root, "long_slots", root / "tok", [FIRST, long_text], "vicuna_v1", 2048, num_patches=576)
    assert seed_layout["post-process"]["skipped"] == {"too_long": 1}
    llava_layout = build(root, "long_noslots", root / "tok", [FIRST, long_text], "vicuna_v1", 2048, num_patches=576,
                         text_only_slots=False)
    assert llava_layout["post-process"]["skipped"] == {}
    ds = HDF5LlavaDataset(root / "long_noslots_h5", root / "images", ImageTransform(image_size=32))
    n = int(ds[1]["key_padding_mask"].eq(0).sum())
    assert 2048 - 576 < n <= 2048 and 1500 < n < 1650  # kept whole: it fits only without the slots
    packed = PackedCollator(TrainCollator(IMG, PAD, 576))([ds[1]])
    assert packed["num_attended_tokens"] == n and packed["input_ids"].shape == (1, n + 576)  # + the dummy image
    assert packed["num_loss_tokens"] == int(ds[1]["loss_mask"].sum())


def test_bom_and_non_utf8_lines(root):
    lines = [json.dumps(FIRST), json.dumps(TEXT), json.dumps(FIRST)]
    src = root / "enc_in"
    src.mkdir()
    data = b"\xef\xbb\xbf" + lines[0].encode() + b"\n" + b'{"x": "\xff\xfe"}\n' + "\n".join(lines[1:]).encode() + b"\n"
    (src / "part0.jsonl").write_bytes(data)
    import yaml

    cfg = {"setup": {"input_dir": str(src), "output_dir": str(root / "enc_h5")},
           "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": 200},
           "dataset": {"num_patches": NP, "image_dir": str(root / "images"), "system_prompt_style": "vicuna_v1"}}
    (root / "enc.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(root / "enc.yaml"), "--quiet"]) == 0
    params = json.loads((root / "enc_h5" / "data_params.json").read_text())
    assert params["post-process"]["successful_files"] == 3  # the BOM line is kept
    assert params["post-process"]["skipped"] == {"bad_encoding": 1}  # counted, never silently replaced
    assert main(["data", "build", str(root / "enc.yaml"), "--quiet", "--overwrite", "--strict"]) == 2


def test_image_paths_must_stay_inside_the_image_folder(root):
    outside = [rec("../secret.png", ("human", "<image>\nq"), ("gpt", "a")),
               rec(str(root / "images" / "a.png"), ("human", "<image>\nq"), ("gpt", "a"))]
    params = build(root, "escape", root / "tok", [FIRST, *outside], "vicuna_v1", 200)
    assert params["post-process"]["skipped"] == {"bad_image_path": 2}


def test_zero_records_kept_is_an_error(root, capsys):
    build_dir = root / "none_in"
    build_dir.mkdir()
    (build_dir / "part0.jsonl").write_text(json.dumps(rec("missing.png", ("human", "<image>\nq"), ("gpt", "a"))) + "\n")
    import yaml

    cfg = {"setup": {"input_dir": str(build_dir), "output_dir": str(root / "none_h5")},
           "processor": {"tokenizer_type": str(root / "tok"), "max_sequence_length": 200},
           "dataset": {"num_patches": NP, "image_dir": str(root / "images")}}
    (root / "none.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(root / "none.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no record was kept" in err and "missing_image: 1" in err


def test_corrupt_data_params_is_an_error(root):
    build(root, "corrupt", root / "tok", [FIRST, TEXT], "vicuna_v1", 200)
    (root / "corrupt_h5" / "data_params.json").write_text("{not json")
    from mmloom.data.h5_format import read_data_params

    with pytest.raises(MmloomError, match="data_params.json: malformed JSON at line 1"):
        read_data_params(root / "corrupt_h5")
    with pytest.raises(MmloomError, match="data_params.json"):
        HDF5LlavaDataset(root / "corrupt_h5", root / "images", ImageTransform(image_size=32))
