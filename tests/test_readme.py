"""The README's quickstart runs as written, against tiny stand-ins for the real model folders."""

import re
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor

from mmloom.testing import SAMPLE_TEXTS, tiny_clip_vision, tiny_llama
from mmloom.tokenization import train_bpe_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_code_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clip_dir, llm_dir = Path("path/to/clip-vit-large-patch14-336"), Path("path/to/vicuna-7b-v1.5")
    tiny_clip_vision().save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    tokenizer = train_bpe_tokenizer(SAMPLE_TEXTS * 4, vocab_size=300, extra_special_tokens=())  # no <image> yet
    tokenizer.save_pretrained(llm_dir)
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(llm_dir)
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save("photo.jpg")

    section = README.read_text().split("## Quickstart in code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["model"].dtype.is_floating_point and Path("runs/llava/config.json").exists()
