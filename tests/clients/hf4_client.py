"""Runs INSIDE the transformers 4.x client environment (a 4.4x release with LlavaForConditionalGeneration,
built by .ci/clients.sh); never imports mmloom. Driven by tests/clients/test_hf_llava_client.py.

    python hf4_client.py JOB.json

JOB["action"] == "exports": for each `mmloom convert --to hf-llava` folder, load it with
`LlavaForConditionalGeneration.from_pretrained` (float32) and `AutoProcessor`, render the question with
the folder's chat template, and record per image: ids, pixels, logits, greedy tokens; then the same
prompts as one left-padded batch (`padding=True`), and logits on caller-given (mmloom) ids and pixels.
JOB["action"] == "several": for each case, one prompt with several images (transformers' chat messages,
`{"type": "image"}` items in any user turn): the folder's processor gives ids and pixels (one row per
image), the model logits and greedy tokens; plus logits on caller-given (mmloom) ids and pixels, and on them with the last image zeroed.
Results go to JOB["out"] (torch.save).
"""

import json
import sys

import torch
import transformers
from PIL import Image


def exports(job):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    results = {}
    for case in job["cases"]:
        model, info = LlavaForConditionalGeneration.from_pretrained(case["folder"], torch_dtype=torch.float32,
                                                                   output_loading_info=True)
        model.eval()
        processor = AutoProcessor.from_pretrained(case["folder"])
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": case["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        gen = dict(max_new_tokens=case["max_new_tokens"], min_new_tokens=case["max_new_tokens"], do_sample=False,
                   num_beams=1)
        rows = []
        pictures = [Image.open(p).convert("RGB") for p in case["images"]]
        for picture in pictures:
            inputs = processor(images=picture, text=text, return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits[0]
                generated = model.generate(**inputs, **gen)[0, inputs["input_ids"].shape[1]:]
            rows.append({"ids": inputs["input_ids"][0].tolist(), "pixels": inputs["pixel_values"][0],
                         "logits": logits, "generated": generated.tolist()})
        processor.tokenizer.padding_side = "left"
        batch = processor(images=pictures, text=[text] * len(pictures), padding=True, return_tensors="pt")
        with torch.no_grad():
            batched = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1]:].tolist()
        given_logits = []
        for ids, pixels in torch.load(case["given"], weights_only=True):
            with torch.no_grad():
                given_logits.append(model(input_ids=torch.tensor([ids]), pixel_values=pixels.unsqueeze(0)).logits[0])
        results[case["name"]] = {
            "loading": {"missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
                        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
                        "image_processor_class": type(processor.image_processor).__name__,
                        "pad_token": processor.tokenizer.pad_token,
                        "rope_theta": model.config.text_config.rope_theta,
                        "transformers": transformers.__version__},
            "prompt": text, "rows": rows, "batched": batched, "given_logits": given_logits,
        }
    return results


def several(job):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(job["folder"], torch_dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(job["folder"])
    gen = dict(max_new_tokens=job["max_new_tokens"], min_new_tokens=job["max_new_tokens"], do_sample=False,
               num_beams=1)
    results = {"transformers": transformers.__version__}
    for case in job["cases"]:
        text = processor.apply_chat_template(case["messages"], add_generation_prompt=True)
        pictures = [Image.open(p).convert("RGB") for p in case["images"]]
        inputs = processor(images=pictures, text=text, return_tensors="pt")
        ids, pixels = torch.load(case["given"], weights_only=True)
        with torch.no_grad():
            logits = model(**inputs).logits[0]
            generated = model.generate(**inputs, **gen)[0, inputs["input_ids"].shape[1]:]
            given_logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
            changed = torch.cat([pixels[:-1], torch.zeros_like(pixels[-1:])])
            changed_logits = model(input_ids=torch.tensor([ids]), pixel_values=changed).logits[0]
        results[case["name"]] = {"prompt": text, "ids": inputs["input_ids"][0].tolist(),
                                 "pixels": inputs["pixel_values"], "logits": logits, "generated": generated.tolist(),
                                 "given_logits": given_logits, "changed_logits": changed_logits}
    return results


def main():
    job = json.loads(open(sys.argv[1]).read())
    torch.save({"exports": exports, "several": several}[job["action"]](job), job["out"])


if __name__ == "__main__":
    main()
