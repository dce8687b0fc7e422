"""Video clips in training: a composite with a video route (`model.video`: frames through the vision
tower and projector, then `FramePool`) reads the clips of a build, its collators concatenate every
clip's frames in placeholder order, packed rows compute exactly what padded rows compute on a mix of
clips, images and text, the clips reach the loss, and `mmloom train` runs (packing and grouping
included) and saves a model that loads back with its route."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmloom.cli.main import main
from mmloom.data.collate import PackedCollator, TrainCollator
from mmloom.data.hdf5_dataset import HDF5LlavaDataset
from mmloom.errors import MmloomError
from mmloom.model.attention import use_packed_attention
from mmloom.model.batch import model_inputs
from mmloom.model.callbacks import FramePool
from mmloom.model.multimodal import MultimodalConfig, MultimodalModel
from mmloom.processing.image import ImageTransform
from mmloom.training.config import InputConfig
from mmloom.training.modalities import media_readers, with_media
from test_packing import TINY, fast_loss_and_grads, row_spans, sample_loss_sums
from video_data import build_video_data, data_params, video_record, write_clip

PAD, NP, FRAMES = 3, 16, 4
CLIP_TOKENS = FRAMES * 4 + 1  # 4 x 4 patches pooled to 2 x 2 per frame, one newline per clip


def records() -> list[dict]:
    """One clip, two clips in two turns, an image and a clip, text only; then the same again."""
    out = []
    for i in range(2):
        out += [
            video_record("a.mkv", "<video>\nWhat changes?", "The gray level." + " Slowly." * i),
            {"id": "two", "video": ["b.mp4", "c.mkv"], "conversations": [
                {"from": "human", "value": "<video>\nFirst clip?"}, {"from": "gpt", "value": "Dark."},
                {"from": "human", "value": "<video>\nAnd this one?"}, {"from": "gpt", "value": "Short."}]},
            {"id": "mix", "image": "img0.png", "video": "c.mkv", "conversations": [
                {"from": "human", "value": "<image>\n<video>\nSame colour?"}, {"from": "gpt", "value": "No."}]},
            {"id": "t", "conversations": [{"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hi." * (i + 1)}]},
        ]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_train")
    write_clip(root / "videos" / "a.mkv", 12, "ffv1")
    write_clip(root / "videos" / "b.mp4", 20, "mpeg4")
    write_clip(root / "videos" / "c.mkv", 3, "ffv1")
    (root / "images").mkdir()
    Image.fromarray(np.full((32, 32, 3), (200, 40, 40), np.uint8)).save(root / "images" / "img0.png")
    assert build_video_data(root, records(), msl=200, video={"num_frames": FRAMES}) == 0
    assert data_params(root)["post-process"]["n_examples"] == 8
    return root


def section(data, **extra) -> InputConfig:
    return InputConfig.model_validate({"data_dir": str(data / "h5"), "img_data_dir": str(data / "images"),
                                       "video_data_dir": str(data / "videos"), "batch_size": 4, **extra})


def video_vlm(data) -> MultimodalModel:
    """The tiny test VLM (CLIP 4 x 4 patches, Llama) with a video route at the data's placeholder id."""
    from helpers import IMAGE_ID, vlm

    base = vlm().float()
    pool = FramePool(base.llm_hidden_size, grid=4, stride=2)
    video_id = data_params(data)["modalities"]["video"]["token_id"]
    return MultimodalModel({"vision": base.vision_encoder}, base.language_model,
                           placeholder_token_ids={"vision": IMAGE_ID, "video": video_id},
                           media={"video": ("vision", pool)}).float()


def items(data, model):
    transform = ImageTransform(image_size=32)
    ds = HDF5LlavaDataset(data / "h5", data / "images", transform, media_readers=media_readers(section(data),
                                                                                              image_transform=transform))
    return ds, [ds[i] for i in range(len(ds))]


def collators(data, model):
    from helpers import IMAGE_ID

    _, some = items(data, model)
    readers = media_readers(section(data), image_transform=ImageTransform(image_size=32))
    plain = with_media(TrainCollator(IMAGE_ID, PAD, NP), model, readers)
    packed = with_media(PackedCollator(TrainCollator(IMAGE_ID, PAD, NP)), model, readers)
    return plain, packed


def test_dataset_yields_each_clip_with_its_frames(data):
    model = video_vlm(data)
    _, got = items(data, model)
    clips = [len(item.get("video") or []) for item in got]
    assert clips == [1, 2, 1, 0] * 2
    two = got[1]["video"]
    assert [e["pixel_values"].shape[0] for e in two] == [FRAMES, 3]  # c.mkv has 3 frames only
    assert [int(e["video_frames"]) for e in two] == [FRAMES, 3]
    assert [e["span"][1] for e in two] == [CLIP_TOKENS, 3 * 4 + 1]
    assert two[0]["span"][0] < two[1]["span"][0]


def test_collator_concatenates_frames_in_placeholder_order(data):
    model = video_vlm(data)
    _, got = items(data, model)
    plain, _ = collators(data, model)
    batch = plain(got[:4])
    video_id = model.placeholder_token_ids["video"]
    assert batch["num_video"] == 4
    assert batch["video"]["video_frames"].tolist() == [FRAMES, FRAMES, 3, 3]
    assert batch["video"]["pixel_values"].shape == (FRAMES * 2 + 6, 3, 32, 32)
    assert int((batch["input_ids"] == video_id).sum()) == 2 * CLIP_TOKENS + 2 * 13
    frames = torch.cat([e["pixel_values"] for item in got[:4] for e in (item.get("video") or [])])
    torch.testing.assert_close(batch["video"]["pixel_values"], frames)
    text_only = plain([got[3]])  # the dummy clip keeps the vision tower and the newline in the graph
    assert text_only["num_video"] == 0 and text_only["video"]["video_frames"].tolist() == [1]


def test_packed_loss_equals_padded_loss(data):
    torch.set_num_threads(1)
    model = video_vlm(data)
    _, got = items(data, model)
    plain_c, packed_c = collators(data, model)
    plain, packed = plain_c(got), packed_c(got)
    assert packed["video"]["video_frames"].tolist() == plain["video"]["video_frames"].tolist()
    use_packed_attention(model.language_model)
    with torch.no_grad():
        a = sample_loss_sums(model(**model_inputs(plain), labels=plain["labels"]).logits, plain["labels"],
                             row_spans(plain))
        b = sample_loss_sums(model(**model_inputs(packed), labels=packed["labels"]).logits, packed["labels"],
                             packed["spans"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    denom = torch.tensor(float(plain["num_loss_tokens"]))
    loss_a, ga = fast_loss_and_grads(model, plain, denom)
    loss_b, gb = fast_loss_and_grads(model, packed, denom)
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    assert "video_pool.newline" in ga and ga["video_pool.newline"].abs().sum() > 0
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_frames_matter(data):
    """Blanking the last frame of a clip changes its sample's loss: every frame reaches the LLM."""
    model = video_vlm(data)
    _, got = items(data, model)
    plain, _ = collators(data, model)
    item = got[0]
    clip = item["video"][0]
    pixels = clip["pixel_values"].clone()
    pixels[-1] = 0
    changed = {**item, "video": [{**clip, "pixel_values": pixels}]}
    with torch.no_grad():
        a = model(**model_inputs(plain([item])), labels=plain([item])["labels"]).loss.item()
        b = model(**model_inputs(plain([changed])), labels=plain([changed])["labels"]).loss.item()
    assert abs(a - b) > 1e-6


def train(data, model_dir, *sets) -> dict[int, dict]:
    params = data_params(data)
    args = ["train", str(TINY / "phase2.yaml"), "--model-dir", str(model_dir), "--mode", "train"]
    for s in (f"train_input.data_dir={data / 'h5'}", f"train_input.img_data_dir={data / 'images'}",
              f"train_input.video_data_dir={data / 'videos'}", "eval_input=null",
              f"model.image_start_idx={params['image_patch_info']['image_patch_start_idx']}",
              f"model.image_token_id={params['post-process']['image_token_id']}",
              f"model.video.token_id={params['modalities']['video']['token_id']}",
              "runconfig.checkpoint_path=null", "runconfig.max_steps=2", "runconfig.log_steps=1",
              "runconfig.checkpoint_steps=2", "train_input.batch_size=4", "train_input.micro_batch_size=2", *sets):
        args += ["--set", s]
    assert main(args) == 0
    lines = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def test_train_packed_and_grouped_match_plain_and_save_the_route(data, tmp_path):
    torch.set_num_threads(1)
    plain = train(data, tmp_path / "plain")
    packed = train(data, tmp_path / "packed", "train_input.packing=true")
    grouped = train(data, tmp_path / "grouped", "train_input.group_by_length=true")
    assert sorted(plain) == [1, 2]
    for s in plain:
        for other in (packed, grouped):
            assert abs(other[s]["loss"] - plain[s]["loss"]) < 2e-5, (s, plain[s]["loss"], other[s]["loss"])
            assert other[s]["loss_tokens"] == plain[s]["loss_tokens"]
    final = tmp_path / "plain" / "final_model"
    config = json.loads((final / "config.json").read_text())
    assert config["media"]["video"]["encoder"] == "vision"
    assert config["media"]["video"]["pool"] == {"type": "frame_pool", "hidden_size": 48, "grid": 4, "stride": 2,
                                                 "mode": "bilinear", "newline": "one_token"}
    model = MultimodalModel.from_pretrained(final)
    assert model.media_encoders == {"video": "vision"} and model.pool("video").newline.shape == (48,)


def test_model_config_without_video_is_unchanged():
    from helpers import vlm

    assert "media" not in vlm().config.to_dict()
    assert MultimodalConfig.from_dict(vlm().config.to_dict()).media == {}


def test_data_and_model_must_agree_on_video(data, tmp_path):
    from helpers import vlm
    from mmloom.training.modalities import check_data_media

    with pytest.raises(MmloomError, match="holds video items but the model takes no video .add model.video"):
        check_data_media(vlm(), data / "h5")
    model = video_vlm(data)
    check_data_media(model, data / "h5")
    other = MultimodalModel({"vision": model.vision_encoder}, model.language_model,
                            placeholder_token_ids=model.placeholder_token_ids,
                            media={"video": ("vision", FramePool(48, grid=4, stride=2, mode="average"))})
    with pytest.raises(MmloomError, match="video feature tokens are counted differently"):
        check_data_media(other, data / "h5")


def test_cached_features_refuse_video(data):
    from mmloom.training.data import build_dataset

    with pytest.raises(MmloomError, match="has 8 video clips, and the feature cache holds one image per sample"):
        build_dataset(section(data, use_cached_features=True), 32)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_run")
    torch.set_num_threads(1)
    train(data, out)
    return out / "final_model"


def test_chat_and_generate_take_clips(data, trained, tmp_path, capsys):
    """A trained video model answers about clips: `chat --video` (two clips), `generate` questions with a
    clip or a list, and the Python processor + `MultimodalModel.generate` give the same tokens as chat."""
    from mmloom.inference.generate import load_model_and_processor

    clip_a, clip_c = data / "videos" / "a.mkv", data / "videos" / "c.mkv"
    assert main(["chat", str(trained), "--video", str(clip_a), "--video", str(clip_c), "--prompt", "What changes?",
                 "--max-new-tokens", "4"]) == 0
    chat_answer = capsys.readouterr().out.strip().splitlines()[-1]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 0, "text": "What changes?", "video": ["a.mkv", "c.mkv"]},
        {"question_id": 1, "text": "<video>\nWhat changes?", "video": "c.mkv"},
        {"question_id": 2, "text": "Hello."}]))
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(trained), str(questions), "--output", str(out), "--video-dir", str(data / "videos"),
                 "--max-new-tokens", "4", "--batch-size", "3"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [0, 1, 2]
    assert answers[0]["text"].strip() == chat_answer.removeprefix("ASSISTANT:").strip()
    model, processor = load_model_and_processor(trained)
    batch = processor(conversations=[[{"role": "user", "content": "<video>\n<video>\nWhat changes?"}]],
                      videos=[[str(clip_a), str(clip_c)]], add_generation_prompt=True, return_labels=False)
    assert batch["video"]["video_frames"].tolist() == [FRAMES, 3]
    video_id = model.placeholder_token_ids["video"]
    assert int((batch["input_ids"] == video_id).sum()) == CLIP_TOKENS + 13
    ids = model.generate(**model_inputs(batch), max_new_tokens=4, do_sample=False)
    text = processor.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() == answers[0]["text"].strip()
    blank = tmp_path / "blank.jsonl"
    assert main(["generate", str(trained), str(questions), "--output", str(blank), "--video-dir",
                 str(data / "videos"), "--max-new-tokens", "4", "--blank-videos"]) == 0


@pytest.mark.parametrize("fmt", ["hf-llava", "llava", "gguf"])
def test_exports_refuse_the_video_route_in_one_line(trained, tmp_path, capsys, fmt):
    """LLaVA's layouts and llama.cpp have no per-frame pooling: the export is refused, naming the format
    that serves the model (mmloom's own), and nothing is written."""
    assert main(["convert", "--from", "mmloom", "--to", fmt, str(trained), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"format '{fmt}' cannot represent this model's video input" in err and "--to mmloom" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_ranks_with_clips_on_one_and_none_on_the_other(data, tmp_path, distributed):
    """Everything trainable; unshuffled, rank 0's micro-batches hold clips and rank 1's none (an image
    in one): rank 1 runs the dummy clip (one zero frame) through the tower, projector and FramePool, so
    both ranks reduce the same parameters, and 2 gloo ranks give the losses and weights of 1 process."""
    from mmloom.data.sampling import StepBatchSampler
    from test_train_distributed import two_ranks_match_one_process

    clip, two, _, text = records()[:4]
    image = {"id": "img", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]}
    uneven = [clip, two, text, text, two, clip, image, text]
    clips = [len(r["video"]) if isinstance(r.get("video"), list) else int("video" in r) for r in uneven]
    per_rank = [[[clips[i] for i in mb] for step in range(2)
                 for mb in StepBatchSampler(8, 4, 2, rank, 2, 0, False, 0, 2).step_micro_batches(step)]
                for rank in range(2)]
    assert per_rank == [[[1, 2], [2, 1]], [[0, 0], [0, 0]]]
    root = tmp_path / "uneven"
    root.mkdir()
    for name in ("videos", "images"):
        (root / name).symlink_to(data / name)
    assert build_video_data(root, uneven, msl=200, video={"num_frames": FRAMES}) == 0

    def args(run, *more):
        out = ["train", str(TINY / "phase2.yaml"), "--model-dir", str(run), "--mode", "train"]
        params = data_params(root)
        for s in (f"train_input.data_dir={root / 'h5'}", f"train_input.img_data_dir={root / 'images'}",
                  f"train_input.video_data_dir={root / 'videos'}", "eval_input=null",
                  f"model.image_start_idx={params['image_patch_info']['image_patch_start_idx']}",
                  f"model.image_token_id={params['post-process']['image_token_id']}",
                  f"model.video.token_id={params['modalities']['video']['token_id']}", "model.freeze=[]",
                  "runconfig.checkpoint_path=null", "runconfig.max_steps=2", "runconfig.log_steps=1",
                  "runconfig.checkpoint_steps=2", "train_input.batch_size=4", "train_input.micro_batch_size=2",
                  "train_input.shuffle=false", *more):
            out += ["--set", s]
        return out

    first = two_ranks_match_one_process(args, tmp_path, distributed)
    assert "video_pool.newline" in first
