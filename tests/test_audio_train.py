"""Audio-LLM and audio+vision-LLM composites through the real CLI: build, train (packing off and on,
resume, two gloo ranks under DDP and FSDP), the saved model + processor, generate and chat, the
mmloom format round trip, and the checks that refuse data a model cannot read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from audio_data import make_audio_data
from mmloom.cli.main import main
from test_train_distributed import assert_same_losses, torchrun
from test_train_loop import losses, weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory) -> Path:
    return make_audio_data(tmp_path_factory.mktemp("audio_data"), n=16)


@pytest.fixture(scope="module")
def av_data(tmp_path_factory) -> Path:
    return make_audio_data(tmp_path_factory.mktemp("av_data"), n=12, with_images=True)


def args_for(config: str, data: Path, run: Path, *sets: str) -> list[str]:
    out = ["train", str(TINY / config), "--model-dir", str(run)]
    paths = [f"{s}.data_dir={data / 'h5'}" for s in ("train_input", "eval_input")]
    paths += [f"{s}.audio_data_dir={data / 'audio'}" for s in ("train_input", "eval_input")]
    if (data / "images").is_dir():
        paths += [f"{s}.img_data_dir={data / 'images'}" for s in ("train_input", "eval_input")]
        start = json.loads((data / "h5" / "data_params.json").read_text())["image_patch_info"]["image_patch_start_idx"]
        paths.append(f"model.image_start_idx={start}")
    for value in [*paths, "runconfig.log_steps=1", *sets]:
        out += ["--set", value]
    return out


SHORT = ["runconfig.max_steps=2", "runconfig.checkpoint_steps=1", "train_input.batch_size=4",
         "train_input.micro_batch_size=2"]


def write_questions(data: Path, with_image: bool) -> Path:
    rows = [{"question_id": "q1", "audio": "clip0.wav", "text": "Is the tone low or high?"},
            {"question_id": "q2", "audio": ["clip2.wav", "clip2b.wav"], "text": "Is the first tone low or high?"},
            {"question_id": "q3", "text": "Is it loud?"}]
    if with_image:
        rows[0]["image"], rows[1]["image"] = "img0.png", "img2.png"
    path = data / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["audio", "audio_vision"])
def test_train_pack_save_load_generate(kind, audio_data, av_data, tmp_path, capsys):
    data = audio_data if kind == "audio" else av_data
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    assert main(args_for(f"{kind}.yaml", data, plain, *SHORT)) == 0
    assert main(args_for(f"{kind}.yaml", data, packed, *SHORT, "train_input.packing=true")) == 0
    got, expected = losses(packed), losses(plain)
    assert sorted(expected) == [1, 2]
    for step in expected:  # packing changes the rows, not the loss
        assert abs(got[step] - expected[step]) < 1e-5 * max(1.0, expected[step]), (got, expected)
    final = plain / "final_model"
    assert (final / "audio_processor" / "preprocessor_config.json").exists()

    from mmloom import MultimodalModel, MultimodalProcessor

    model, processor = MultimodalModel.from_pretrained(final), MultimodalProcessor.from_pretrained(final)
    assert model.audio_encoder.postprocess_module_callback.stride == 2
    assert processor.num_tokens["audio"] == {"type": "audio_frames", "downsample": 2, "stride": 2}
    assert processor.placeholder_ids["audio"] == model.placeholder_token_ids["audio"] == 5

    questions = write_questions(data, with_image=kind == "audio_vision")
    answers = tmp_path / "answers.jsonl"
    gen = ["generate", str(final), str(questions), "--output", str(answers), "--audio-dir", str(data / "audio"),
           "--max-new-tokens", "3", "--device", "cpu"]
    if kind == "audio_vision":
        gen += ["--image-dir", str(data / "images")]
    assert main(gen) == 0
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == ["q1", "q2", "q3"]
    silenced = tmp_path / "silenced.jsonl"
    assert main([*gen[:4], str(silenced), *gen[5:], "--silence-audio"]) == 0
    assert len(silenced.read_text().splitlines()) == 3

    chat = ["chat", str(final), "--audio", str(data / "audio" / "clip1.wav"), "--prompt", "Low or high?",
            "--max-new-tokens", "3", "--device", "cpu"]
    if kind == "audio_vision":
        chat += ["--image", str(data / "images" / "img1.png")]
    capsys.readouterr()
    assert main(chat) == 0
    assert capsys.readouterr().out.strip()

    # the mmloom format round trip keeps every encoder, callback and processor
    from mmloom.interop.common import read_mmloom, write_mmloom

    copy = tmp_path / "copy"
    write_mmloom(read_mmloom(final), copy)
    again = MultimodalModel.from_pretrained(copy)
    assert again.encoder_names == model.encoder_names
    assert MultimodalProcessor.from_pretrained(copy).num_tokens == processor.num_tokens
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor)
    # LLaVA formats hold one vision encoder: a clear refusal
    capsys.readouterr()
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(final), str(tmp_path / "hf")]) == 2
    assert "mmloom format" in capsys.readouterr().err


def test_resume_gives_the_uninterrupted_run(audio_data, tmp_path):
    run = tmp_path / "run"
    args = args_for("audio.yaml", audio_data, run, *SHORT, "runconfig.save_trainable_only=true")
    assert main(args) == 0
    first, first_losses = weights(run / "final_model"), losses(run)
    shutil.rmtree(run / "checkpoint-2")
    shutil.rmtree(run / "final_model")
    assert main(args) == 0  # resumes from checkpoint-1 (optimizer, RNG, data position)
    assert losses(run) == first_losses
    for name, tensor in weights(run / "final_model").items():
        torch.testing.assert_close(tensor, first[name], rtol=0, atol=1e-6)


DIST = ["runconfig.max_steps=2", "runconfig.checkpoint_steps=2", "train_input.batch_size=4",
        "train_input.micro_batch_size=1", "train_input.shuffle=false"]


def test_two_gloo_ranks_match_one_process(audio_data, av_data, tmp_path):
    """Micro-batches without audio (text-only samples) get a dummy clip, so DDP/FSDP see the same
    parameters on both ranks; the losses are those of one process."""
    cases = [("audio.yaml", audio_data, ["runconfig.distributed=ddp", "train_input.packing=true"]),
             ("audio_vision.yaml", av_data, ["runconfig.distributed=fsdp"])]
    for config, data, dist in cases:
        reference, run = tmp_path / f"{config}-one", tmp_path / f"{config}-two"
        assert main(args_for(config, data, reference, *DIST, *dist[1:])) == 0
        torchrun(args_for(config, data, run, *DIST, *dist), tmp_path)
        assert_same_losses_two(run, reference)


def assert_same_losses_two(run: Path, reference: Path) -> None:
    got, expected = losses(run), losses(reference)
    assert sorted(got) == sorted(expected) == [1, 2]
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-4 * max(1.0, abs(expected[step])), (step, got, expected)


def test_data_the_model_cannot_read_is_refused(audio_data, tmp_path, capsys):
    # pooling stride 1 in the model, stride 2 in the data
    assert main(args_for("audio.yaml", audio_data, tmp_path / "a", *SHORT, "model.encoders.audio.pooling.stride=1")) == 2
    assert "counted differently" in capsys.readouterr().err
    # audio data for a vision-only model
    vision_only = args_for("audio.yaml", audio_data, tmp_path / "b", *SHORT)
    vision_only[1] = str(TINY / "phase2.yaml")
    vision_only += ["--set", "runconfig.checkpoint_path=null", "--set", f"train_input.img_data_dir={audio_data}"]
    assert main(vision_only) == 2
    assert "no audio encoder" in capsys.readouterr().err
    # the placeholder id of the data and of the model differ
    assert main(args_for("audio.yaml", audio_data, tmp_path / "c", *SHORT, "model.encoders.audio.token_id=7")) == 2
    assert "token_id: 5" in capsys.readouterr().err


assert assert_same_losses  # the distributed helpers come from test_train_distributed
