"""The original LLaVA code (llava-torch 1.2.2.post1 on transformers 4.37.2, its own environment) against
mmloom, both ways: `mmloom convert --to llava` exports load with the original builder and compute what
mmloom computes; models built and saved by the original code import into mmloom with equal logits.

Tiny models, the real Llama-2 tokenizer (stock vicuna-7b-v1.5 folder), rope_theta 500000, tied
embeddings with the vocabulary padded to 64, mlp2x_gelu and linear projectors, square and non-square
images. Each side preprocesses with its own code (original: `process_images` + `tokenizer_image_token` +
the vicuna_v1 conversation). Tests marked `layout` compare each side's own token ids: they need mmloom's
token layout to equal `tokenizer_image_token`'s (the `▁` after the image span).
"""

import pytest
import torch
from clients_support import (
    MAX_NEW_TOKENS,
    QUESTION,
    collapse_image_span,
    expand_image_marker,
    images,
    mmloom_side,
    only_in_client_stage,
    run_client,
    save_mmloom,
    stock_vicuna_folder,
    tiny_vicuna_composite,
)
from transformers import CLIPImageProcessor

from mmloom.cli.main import main
from mmloom.processing.image import ImageTransform


def _clip():
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


# name: (projector, image processor saved with the mmloom model, expected image_aspect_ratio, LLM family,
#        text folder, class the original builder must pick, its tokenizer class)
CASES = {
    "mlp2x_gelu-pad": ("mlp2x_gelu", lambda: ImageTransform(32, pad_to_square=True), "pad", "llama",
                       "text_model_llava", "LlavaLlamaForCausalLM", "LlamaTokenizer"),
    "linear-square": ("linear", _clip, "square", "llama", "text_model_llava", "LlavaLlamaForCausalLM", "LlamaTokenizer"),
    "mistral-mlp2x_gelu-pad": ("mlp2x_gelu", lambda: ImageTransform(32, pad_to_square=True), "pad", "mistral",
                               "text_model_llava_mistral", "LlavaMistralForCausalLM", "LlamaTokenizerFast"),
}
ATOL = 1e-4
pytestmark = only_in_client_stage
PROBE = "Hi there.</s>USER: What next?\nASSISTANT: Nothing.</s>"  # as llava_client.job_probe()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case exported by mmloom, run through the original code; (mmloom rows, client results, image id)."""
    root = tmp_path_factory.mktemp("llava-original")
    tokenizer_dir = stock_vicuna_folder(root)
    pictures = images(root)
    ours, job_cases = {}, []
    for name, (projector, processor, _, family, text_folder, _, _) in CASES.items():
        model, tokenizer = tiny_vicuna_composite(tokenizer_dir, projector, family=family)
        folder = save_mmloom(model, tokenizer, processor(), root / f"mmloom-{name}")
        assert main(["convert", "--from", "mmloom", "--to", "llava", str(folder), str(root / f"export-{name}")]) == 0
        image_id = model.placeholder_token_ids["vision"]
        rows = mmloom_side(folder, pictures, vocab_limit=len(tokenizer))
        given = [(collapse_image_span(r["ids"], image_id), r["pixels"]) for r in rows]
        torch.save(given, root / f"given-{name}.pt")
        ours[name] = (rows, image_id, len(tokenizer), tokenizer(PROBE).input_ids)
        job_cases.append({"name": name, "text_folder": str(root / f"export-{name}" / text_folder),
                          "images": [str(p) for p in pictures], "question": QUESTION,
                          "max_new_tokens": MAX_NEW_TOKENS, "given": str(root / f"given-{name}.pt")})
    results = run_client("llava", "llava_client.py", {"action": "exports", "cases": job_cases}, root)
    return ours, results


@pytest.mark.parametrize("name", list(CASES))
def test_original_builder_loads_the_export(exported, name):
    _, results = exported
    loading = results[name]["loading"]
    assert loading["class"] == CASES[name][5]
    assert loading["tokenizer_class"] == CASES[name][6]  # Llama: the slow one, read from tokenizer.model
    assert loading["missing"] == [] and loading["unexpected"] == []
    assert loading["tower_missing"] == [] and loading["tower_unexpected"] == []  # vision_model.* names
    assert loading["rope_theta"] == 500000.0 and loading["rope_scaling"] is None
    assert loading["legacy"] in (False, None) and loading["pad_token"] == "<unk>"  # None: fast, no attribute
    assert loading["image_aspect_ratio"] == CASES[name][2]
    assert loading["tied"]
    assert loading["probe_ids"] == exported[0][name][3]  # multi-turn text tokenized as mmloom does (legacy kept)


@pytest.mark.parametrize("name", list(CASES))
def test_same_pixels(exported, name):
    ours, results = exported
    for mine, theirs in zip(ours[name][0], results[name]["rows"], strict=True):
        assert mine["pixels"].shape == theirs["pixels"].shape
        assert float((mine["pixels"] - theirs["pixels"]).abs().max()) < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_same_logits_and_greedy_tokens_on_identical_inputs(exported, name):
    ours, results = exported
    rows, _, vocab, _ = ours[name]
    for mine, logits, generated in zip(rows, results[name]["given_logits"], results[name]["given_generated"],
                                       strict=True):
        assert logits.shape == (mine["logits"].shape[0], vocab)
        assert float((mine["logits"][:, :vocab] - logits).abs().max()) < ATOL
        assert mine["generated"] == generated


@pytest.mark.layout
@pytest.mark.parametrize("name", list(CASES))
def test_own_preprocessing_gives_the_same_ids(exported, name):
    ours, results = exported
    rows, image_id, _, _ = ours[name]
    for mine, theirs in zip(rows, results[name]["rows"], strict=True):
        assert mine["ids"] == expand_image_marker(theirs["ids"], image_id)


@pytest.mark.layout
@pytest.mark.parametrize("name", list(CASES))
def test_own_preprocessing_gives_the_same_logits_and_greedy_tokens(exported, name):
    ours, results = exported
    rows, _, vocab, _ = ours[name]
    for mine, theirs in zip(rows, results[name]["rows"], strict=True):
        assert mine["logits"].shape[0] == theirs["logits"].shape[0]
        assert float((mine["logits"][:, :vocab] - theirs["logits"]).abs().max()) < ATOL
        assert mine["generated"] == theirs["generated"]


# ----------------------------------------------------------------------- models the original code saved
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-built")
    pictures = images(root)
    job = {"action": "build", "root": str(root), "tokenizer": str(stock_vicuna_folder(root)),
           "projector_types": ["mlp2x_gelu", "linear"], "images": [str(p) for p in pictures], "question": QUESTION,
           "max_new_tokens": MAX_NEW_TOKENS}
    return root, pictures, run_client("llava", "llava_client.py", job, root)


def _mmloom_on(folder, rows, pictures):
    """mmloom's logits and greedy tokens on the original's ids and pixels, and its own pixels and ids."""
    from mmloom import MultimodalModel, MultimodalProcessor
    from mmloom.processing.image import load_image

    model = MultimodalModel.from_pretrained(folder).eval()
    processor = MultimodalProcessor.from_pretrained(folder)
    image_id = model.placeholder_token_ids["vision"]
    out = []
    for row, path in zip(rows, pictures, strict=True):
        ids = torch.tensor([expand_image_marker(row["ids"], image_id)])
        pixels = row["pixels"].unsqueeze(0)
        vocab = row["logits"].shape[-1]
        rows_total = model.language_model.get_input_embeddings().weight.shape[0]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits[0]
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                       max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                       suppress_tokens=list(range(vocab, rows_total)) or None)
        own = processor(conversations=[{"conversations": [{"from": "human", "value": "<image>\n" + QUESTION}]}],
                        images=[load_image(path)], add_generation_prompt=True, return_labels=False)
        new = generated[0, ids.shape[1]:] if generated.shape[1] > MAX_NEW_TOKENS else generated[0]
        out.append({"logits": logits[:, :vocab], "generated": new.tolist(),
                    "pixels": own["vision"]["pixel_values"][0], "ids": own["input_ids"][0].tolist(),
                    "expected_ids": ids[0].tolist()})
    return out


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_original_phase2_folder_and_phase1_projector_import(built, tmp_path, projector):
    _, pictures, results = built
    result = results[projector]
    folder = tmp_path / "imported"
    assert main(["convert", "--from", "llava", "--to", "mmloom", result["folder"], str(folder)]) == 0
    for mine, theirs in zip(_mmloom_on(folder, result["phase2"], pictures), result["phase2"], strict=True):
        assert float((mine["logits"] - theirs["logits"]).abs().max()) < ATOL
        assert mine["generated"] == theirs["generated"]
        assert float((mine["pixels"] - theirs["pixels"]).abs().max()) < 1e-5  # pad -> expand2square, CLIP mean
    # phase 1: only mm_projector.bin, imported into that model
    assert all(k.startswith("model.mm_projector.") for k in result["projector_keys"])
    phase1 = tmp_path / "phase1"
    assert main(["convert", "--from", "llava-projector", "--to", "mmloom", result["projector_bin"], str(phase1),
                 "--base", str(folder)]) == 0
    for mine, theirs in zip(_mmloom_on(phase1, result["phase1"], pictures), result["phase1"], strict=True):
        assert float((mine["logits"] - theirs["logits"]).abs().max()) < ATOL
        assert mine["generated"] == theirs["generated"]


@pytest.mark.layout
@pytest.mark.parametrize("projector", ["mlp2x_gelu"])
def test_imported_processor_gives_the_original_ids(built, tmp_path, projector):
    _, pictures, results = built
    folder = tmp_path / "imported"
    assert main(["convert", "--from", "llava", "--to", "mmloom", results[projector]["folder"], str(folder)]) == 0
    for mine in _mmloom_on(folder, results[projector]["phase2"], pictures):
        assert mine["ids"] == mine["expected_ids"]
