"""Compose a tiny vision-language model from random HF configs, train it briefly, save, reload, generate.

Run with `make demo` (or `python examples/compose_and_train.py --out runs/demo`). Everything is
built from configs: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessor

from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel, MultimodalProcessor
from mmloom.testing import tiny_clip_vision, tiny_llama, tiny_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220)}


def scene(colour: str) -> Image.Image:
    image = Image.new("RGB", (32, 32), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill=COLOURS[colour])
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/compose_and_train")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = tiny_tokenizer()
    model = MultimodalModel(
        encoders={"vision": ModalEncoderModule(tiny_clip_vision(),
                                               postprocess_module_callback=FeatureSelect(-2, "patch"))},
        language_model=tiny_llama(vocab_size=len(tokenizer)),
        init_projector_type="mlp2x_gelu",
        placeholder_token_ids={"vision": tokenizer.convert_tokens_to_ids("<image>")},
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = MultimodalProcessor.from_model(model, tokenizer, {"vision": image_processor}, template="vicuna_v1")

    # A generated batch: the answer (the circle's colour) can only come from the image.
    conversations = [[{"role": "user", "content": "<image>\nWhat colour is the circle?"},
                      {"role": "assistant", "content": colour.capitalize() + "."}] for colour in COLOURS]
    batch = processor(conversations=conversations, images=[scene(c) for c in COLOURS])

    # Train everything (nothing here is pretrained); the falling loss is printed as it goes.
    model.train(encoders_mode={"vision": (True, True)}, llm_mode=True)
    model.trainable_summary()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s")

    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"saved to {args.out}")

    reloaded = MultimodalModel.from_pretrained(args.out)
    reprocessor = MultimodalProcessor.from_pretrained(args.out)
    prompts = [[{"role": "user", "content": "<image>\nWhat colour is the circle?"}] for _ in COLOURS]
    inputs = reprocessor(conversations=prompts, images=[scene(c) for c in COLOURS],
                         add_generation_prompt=True, padding_side="left", return_labels=False)
    output = reloaded.generate(**inputs, max_new_tokens=6, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    prompt_length = inputs["input_ids"].shape[1]
    answers = reprocessor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
    for colour, answer in zip(COLOURS, answers, strict=True):
        print(f"{colour:>5} circle -> model says: {answer.strip()!r}")


if __name__ == "__main__":
    main()
