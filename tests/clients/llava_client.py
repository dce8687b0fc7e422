"""Runs INSIDE the original-LLaVA client environment (transformers 4.37.2 + llava-torch 1.2.2.post1,
built by .ci/clients.sh); never imports mmloom. Driven by tests/clients/test_llava_original_client.py.

    python llava_client.py JOB.json

JOB["action"]:
* "exports": load each mmloom export with the original builder (`load_pretrained_model`), then compute,
  in float32, with the original preprocessing (`process_images`, `tokenizer_image_token`, the vicuna_v1
  conversation): ids, pixels, logits and greedy tokens per image; plus logits on ids and pixels given by
  the caller (mmloom's), to compare the models on identical inputs.
* "build": build tiny models with the original code (phase-2 folder saved by `save_pretrained`, and a
  phase-1 `mm_projector.bin`) and compute their logits the same way.
* "several": one prompt with several images (`<image>` in any human turn of a vicuna_v1 conversation)
  through the original `prepare_inputs_labels_for_multimodal` path: the images as `process_images` stacks
  them (one (N, 3, H, W) tensor) and as a list of (3, H, W) tensors; own ids, pixels, logits and greedy
  tokens, and logits and greedy tokens on caller-given ids and pixels.
Results go to JOB["out"] (torch.save of plain dicts, lists and tensors).
"""

import json
import os
import sys

import torch
from PIL import Image


def prompt_ids(tokenizer, question):
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    return prompt, tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)


def run_model(model, tokenizer, image_processor, image_paths, question, max_new_tokens):
    from llava.mm_utils import process_images

    rows = []
    for path in image_paths:
        image = Image.open(path).convert("RGB")
        prompt, ids = prompt_ids(tokenizer, question)
        pixels = process_images([image], image_processor, model.config)
        with torch.no_grad():
            logits = model(input_ids=ids, images=pixels, image_sizes=[image.size]).logits[0]
            generated = model.generate(ids, images=pixels, image_sizes=[image.size], do_sample=False,
                                       num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                       use_cache=True)
        rows.append({"image": path, "prompt": prompt, "ids": ids[0].tolist(), "pixels": pixels[0],
                     "logits": logits, "generated": generated[0, -max_new_tokens:].tolist()})
    return rows


def job_probe():
    """Multi-turn text with special tokens: `legacy` changes how the text after `</s>` is tokenized."""
    return "Hi there.</s>USER: What next?\nASSISTANT: Nothing.</s>"


def load_export(text_folder):
    """The original builder's objects, and the same model class reloaded in float32 (the builder
    hard-codes float16)."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model
    from transformers import CLIPVisionModel

    name = get_model_name_from_path(text_folder)
    tokenizer, model16, image_processor, _ = load_pretrained_model(text_folder, None, name, device="cpu")
    cls = type(model16)
    del model16
    model, info = cls.from_pretrained(text_folder, torch_dtype=torch.float32, low_cpu_mem_usage=True,
                                      output_loading_info=True)
    model.resize_token_embeddings(len(tokenizer))  # as load_pretrained_model does
    tower = model.get_vision_tower()
    tower.load_model()
    tower.to(torch.float32)
    _, tower_info = CLIPVisionModel.from_pretrained(tower.vision_tower_name, output_loading_info=True)
    loading = {
        "class": cls.__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "image_processor_class": type(image_processor).__name__,
        "missing": list(info["missing_keys"]),
        "unexpected": list(info["unexpected_keys"]),
        "tower_missing": list(tower_info["missing_keys"]),
        "tower_unexpected": list(tower_info["unexpected_keys"]),
        "rope_theta": getattr(model.config, "rope_theta", None),
        "rope_scaling": getattr(model.config, "rope_scaling", None),
        "image_aspect_ratio": getattr(model.config, "image_aspect_ratio", None),
        "legacy": getattr(tokenizer, "legacy", None),
        "probe_ids": tokenizer(job_probe()).input_ids,
        "pad_token": tokenizer.pad_token,
        "vocab_rows": model.get_input_embeddings().weight.shape[0],
        "tied": model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
        "len_tokenizer": len(tokenizer),
    }
    return tokenizer, model.eval(), image_processor, loading


def given_inputs(model, cases, max_new_tokens):
    """Logits and greedy tokens for caller-given (ids with the image span as one -200, pixels)."""
    logits, generated = [], []
    for ids, pixels in cases:
        with torch.no_grad():
            ids, pixels = torch.tensor([ids]), pixels.unsqueeze(0)
            logits.append(model(input_ids=ids, images=pixels).logits[0])
            generated.append(model.generate(ids, images=pixels, do_sample=False, num_beams=1, use_cache=True,
                                            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
                             [0, -max_new_tokens:].tolist())  # 4.37 puts a BOS before tokens generated from embeddings
    return logits, generated


def exports(job):
    results = {}
    for case in job["cases"]:
        tokenizer, model, image_processor, loading = load_export(case["text_folder"])
        rows = run_model(model, tokenizer, image_processor, case["images"], case["question"], case["max_new_tokens"])
        given = torch.load(case["given"], weights_only=True) if case.get("given") else []
        given_logits, given_generated = given_inputs(model, given, case["max_new_tokens"])
        results[case["name"]] = {"loading": loading, "rows": rows, "given_logits": given_logits,
                                 "given_generated": given_generated}
    return results


def build(job):
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_llama import LlavaConfig
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    root = job["root"]
    torch.manual_seed(0)
    image_dir = os.path.join(root, "clip-tiny")
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=4, projection_dim=32))
    clip.save_pretrained(image_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(image_dir)
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"], use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token  # LLaVA's train.py does this for vicuna_v1
    results = {}
    for projector_type in job["projector_types"]:
        torch.manual_seed(1)
        config = LlavaConfig(
            vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
            tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            mm_vision_tower=image_dir, mm_hidden_size=32, mm_projector_type=projector_type, mm_vision_select_layer=-2,
            mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False,
            image_aspect_ratio="pad", mm_patch_merge_type="flat", use_mm_proj=True,
            tokenizer_model_max_length=2048, tokenizer_padding_side="right",
        )
        model = LlavaLlamaForCausalLM(config)
        model.get_vision_tower().load_model()
        model.eval()
        folder = os.path.join(root, f"llava-tiny-{projector_type}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        image_processor = model.get_vision_tower().image_processor
        phase2 = run_model(model, tokenizer, image_processor, job["images"], job["question"], job["max_new_tokens"])
        # phase 1: another projector, saved as the original trainer does (keys from named_parameters)
        torch.manual_seed(2)
        for p in model.get_model().mm_projector.parameters():
            torch.nn.init.normal_(p, std=0.3)
        projector = {k: v.detach().clone() for k, v in model.named_parameters() if "mm_projector" in k}
        bin_path = os.path.join(root, f"mm_projector-{projector_type}.bin")
        torch.save(projector, bin_path)
        phase1 = run_model(model, tokenizer, image_processor, job["images"], job["question"], job["max_new_tokens"])
        results[projector_type] = {"folder": folder, "projector_bin": bin_path, "projector_keys": sorted(projector),
                                   "phase2": phase2, "phase1": phase1}
    return results


def conversation_ids(tokenizer, turns):
    """The vicuna_v1 prompt of `turns` ((role "human"/"gpt", text) pairs, `<image>` in the text) with
    the assistant's turn opened, tokenized by `tokenizer_image_token` (each `<image>` -> -200)."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["vicuna_v1"].copy()
    for role, value in turns:
        conv.append_message(conv.roles[0] if role == "human" else conv.roles[1], value)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    return prompt, tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)


def several(job):
    from llava.mm_utils import process_images

    tokenizer, model, image_processor, loading = load_export(job["text_folder"])
    n = job["max_new_tokens"]
    gen = dict(do_sample=False, num_beams=1, use_cache=True, max_new_tokens=n, min_new_tokens=n)
    pictures = [Image.open(p).convert("RGB") for p in job["images"]]
    prompt, ids = conversation_ids(tokenizer, job["turns"])
    pixels = process_images(pictures, image_processor, model.config)
    sizes = [p.size for p in pictures]
    given_ids, given_pixels = torch.load(job["given"], weights_only=True)
    given_ids = torch.tensor([given_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels, image_sizes=sizes).logits[0]
        as_list = model(input_ids=ids, images=list(pixels), image_sizes=sizes).logits[0]
        generated = model.generate(ids, images=pixels, image_sizes=sizes, **gen)[0, -n:]
        given_logits = model(input_ids=given_ids, images=given_pixels).logits[0]
        given_generated = model.generate(given_ids, images=given_pixels, **gen)[0, -n:]
        # the original's inputs_embeds: every -200 replaced by one image's features, in order
        embeds = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixels)[4][0]
        features = model.encode_images(pixels)
    markers = (ids[0] == -200).nonzero().flatten().tolist()
    return {"loading": loading, "prompt": prompt, "ids": ids[0].tolist(), "pixels": pixels, "logits": logits,
            "list_logits": as_list, "generated": generated.tolist(), "given_logits": given_logits,
            "given_generated": given_generated.tolist(), "embeds": embeds, "features": features,
            "markers": markers}


def main():
    job = json.loads(open(sys.argv[1]).read())
    actions = {"exports": exports, "build": build, "several": several}
    torch.save(actions[job["action"]](job), job["out"])


if __name__ == "__main__":
    main()
