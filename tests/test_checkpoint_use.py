"""Intermediate checkpoints (`checkpoint-N`, trainable weights only) are usable like final models: they hold
the processor files; a LoRA checkpoint loads on its base with the recorded PEFT spec applied (API `base=`),
or without a base on the starting model its run config describes; `chat`, `generate`, `convert` and
`merge-lora` take them. Reference: the run's final_model, saved at the same step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmloom import MultimodalModel
from mmloom.cli.main import main
from mmloom.training.model_loading import load_model
from test_train_loop import make_data, train_args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Phase 1 (2 steps, projector only) then LoRA phase 2 (2 steps, checkpoint at step 2 = final_model)."""
    root = tmp_path_factory.mktemp("ckpt_use")
    data = make_data(root / "data", n=8)
    phase1, lora = root / "phase1", root / "lora"
    assert main(train_args(data, 1, phase1, "runconfig.max_steps=2", "runconfig.checkpoint_steps=2",
                           "train_input.batch_size=4", "train_input.micro_batch_size=4")) == 0
    assert main(train_args(data, 2, lora, f"runconfig.checkpoint_path={phase1}", "runconfig.max_steps=2",
                           "runconfig.checkpoint_steps=2", "train_input.batch_size=4", "train_input.micro_batch_size=4",
                           "model.lora={r: 4, alpha: 8, dropout: 0.0}", "optimizer.lr=1e-2")) == 0
    return data, phase1, lora


def logits(model, seed=0):
    torch.manual_seed(seed)
    ids = torch.tensor([[0] + [4] * 16 + [30, 31, 32, 1]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def test_checkpoints_hold_processor_and_run_config(runs):
    _, phase1, lora = runs
    for ckpt in (phase1 / "checkpoint-2", lora / "checkpoint-2"):
        assert json.loads((ckpt / "config.json").read_text())["trainable_only"]
        for name in ("mmloom_processor.json", "tokenizer_config.json", "run_config.yaml"):
            assert (ckpt / name).exists(), (ckpt, name)


def test_lora_checkpoint_on_its_base_equals_final_model(runs):
    _, phase1, lora = runs
    reference = logits(MultimodalModel.from_pretrained(lora / "final_model"))
    on_base = MultimodalModel.from_pretrained(lora / "checkpoint-2", base=phase1 / "final_model")
    assert hasattr(on_base.language_model, "peft_config")  # the recorded spec was applied to the plain base
    assert float((logits(on_base) - reference).abs().max()) < 1e-5
    rebuilt = load_model(lora / "checkpoint-2")  # no base: the run config's starting model
    assert float((logits(rebuilt) - reference).abs().max()) < 1e-5
    assert float((logits(load_model(phase1 / "checkpoint-2")) -
                  logits(MultimodalModel.from_pretrained(phase1 / "final_model"))).abs().max()) < 1e-5


def test_merge_lora_chat_generate_and_convert_take_a_checkpoint(runs, tmp_path, capsys):
    data, _, lora = runs
    ckpt = lora / "checkpoint-2"
    assert main(["merge-lora", str(ckpt), str(tmp_path / "merged")]) == 0
    merged = MultimodalModel.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.language_model, "peft_config")
    reference = logits(MultimodalModel.from_pretrained(lora / "final_model"))
    assert float((logits(merged) - reference).abs().max()) < 1e-4
    assert (tmp_path / "merged" / "mmloom_processor.json").exists()
    image = data / "images" / "img0.png"
    assert main(["chat", str(ckpt), "--image", str(image), "--prompt", "What colour is the shape?",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "img0.png", "text": "What colour?"}) + "\n")
    assert main(["generate", str(ckpt), str(questions), "--output", str(tmp_path / "a.jsonl"), "--image-dir",
                 str(data / "images"), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "a.jsonl").read_text())["question_id"] == 1
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(ckpt), str(tmp_path / "hf")]) == 0
    from transformers import LlavaForConditionalGeneration

    assert isinstance(LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf"), LlavaForConditionalGeneration)


def test_checkpoint_without_run_config_or_with_other_frozen_weights_is_refused(runs, tmp_path, capsys):
    _, phase1, lora = runs
    alone = tmp_path / "checkpoint-2"
    shutil.copytree(lora / "checkpoint-2", alone)
    (alone / "run_config.yaml").unlink()
    assert main(["merge-lora", str(alone), str(tmp_path / "out")]) == 2
    assert "give the full model it was trained on as the base" in capsys.readouterr().err
    # a run config whose starting model differs (no start folder, another seed): the fingerprint check refuses it
    shutil.copyfile(lora / "checkpoint-2" / "run_config.yaml", alone / "run_config.yaml")
    text = (alone / "run_config.yaml").read_text().replace(f"checkpoint_path: {phase1}", "checkpoint_path: null")
    (alone / "run_config.yaml").write_text(text.replace("  seed: 0", "  seed: 1"))
    assert main(["merge-lora", str(alone), str(tmp_path / "out")]) == 2
    assert "differ from those the run trained with" in capsys.readouterr().err


def test_gguf_export_takes_a_lora_checkpoint(runs, tmp_path):
    """`convert --to gguf` of a trainable-only LoRA checkpoint writes the merged weights: the same GGUF tensors
    as the export of the run's final_model."""
    import gguf

    _, _, lora = runs
    for name, src in (("ckpt", lora / "checkpoint-2"), ("final", lora / "final_model")):
        assert main(["convert", "--from", "mmloom", "--to", "gguf", "--outtype", "f32", "--name", "m", str(src),
                     str(tmp_path / name)]) == 0
    for file in ("m.gguf", "mmproj-m.gguf"):
        ckpt, final = (gguf.GGUFReader(tmp_path / name / file).tensors for name in ("ckpt", "final"))
        assert [t.name for t in ckpt] == [t.name for t in final]
        for a, b in zip(ckpt, final, strict=True):
            assert float(abs(a.data - b.data).max()) < 1e-5, a.name
