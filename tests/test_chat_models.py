"""Chat models as their users have them: the tokenizer's own chat template by default, generation that stops
at the template's end-of-turn token, the system text in every chat, every template exported as a chat
template transformers serves, a template override of a saved processor, phase-1 models asked text alone,
exports that are the same bytes on repeat, exact LoRA merges (tied embeddings, encoders), towers without a
CLS token. (The shared cases eos-stop-tokenizer-template, chat-system-without-image,
default-template-from-tokenizer, hf-llava-export-chat-template and tied-lora-merge, as project tests.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, LlamaConfig, LlamaForCausalLM

from helpers import vlm
from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel, MultimodalProcessor
from mmloom.cli.main import main
from mmloom.errors import MmloomError
from mmloom.interop.common import Bundle, write_mmloom
from mmloom.processing.templates import TEMPLATE_NAMES, end_of_turn_token_ids, get_template
from mmloom.testing import tiny_clip_vision, tiny_llm, tiny_siglip_vision, tiny_tokenizer
from tokenizer_families import llama3_style_folder, qwen2_style_folder

CLIP_PROC = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + "
         "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def chat_tokenizer(kind: str, folder: Path):
    """A Qwen2-style (EOS <|endoftext|>, turns end with <|im_end|>) or Llama-3-style (EOS <|end_of_text|>,
    turns end with <|eot_id|>) tokenizer with its chat template and <image> added."""
    from mmloom.interop.tokens import ensure_special_token
    from mmloom.processing.tokenizer import load_tokenizer

    tokenizer = load_tokenizer((qwen2_style_folder if kind == "qwen2" else llama3_style_folder)(folder))
    tokenizer.chat_template = CHATML if kind == "qwen2" else LLAMA3
    ensure_special_token(tokenizer, "<image>")
    return tokenizer


def scripted_model(tokenizer, script: list[int]) -> MultimodalModel:
    """A CLIP + 1-layer Llama whose greedy decoding follows `script` (token i -> token i + 1, for every i):
    one-hot embeddings, attention and MLP outputs zero, `lm_head` a transition table."""
    vocab = len(tokenizer)
    hidden = vocab + vocab % 2  # RoPE wants an even head size
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=1, num_key_value_heads=1, head_dim=hidden,
                                       tie_word_embeddings=False, max_position_embeddings=512)).eval()
    with torch.no_grad():
        for p in llm.parameters():
            p.zero_()
        llm.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        llm.model.norm.weight.fill_(1.0)
        llm.model.layers[0].input_layernorm.weight.fill_(1.0)
        llm.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        for current, following in zip(script, script[1:], strict=False):
            llm.lm_head.weight[following, current] = 100.0
    encoder = ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"))
    return MultimodalModel({"vision": encoder}, llm, init_projector_type="mlp2x_gelu",
                           placeholder_token_ids={"vision": tokenizer.convert_tokens_to_ids("<image>")}).eval()


# ------------------------------------------------------------------------------------ stops
@pytest.mark.parametrize("kind, end", [("qwen2", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_generation_stops_at_the_tokenizer_templates_end_of_turn(kind, end, tmp_path):
    """eos-stop-tokenizer-template: the model writes its answer, the end-of-turn token that closes every
    supervised answer, then a new turn; with `template: tokenizer` generation stops at that token (not only at
    the tokenizer's EOS), as with the built-in templates."""
    from mmloom.inference.generate import answer_batch, generation_kwargs

    tokenizer = chat_tokenizer(kind, tmp_path / "tok")
    messages = [{"role": "user", "content": "What colour is it?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    answer = tokenizer("Red.", add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids(end)
    rest = tokenizer("user", add_special_tokens=False)["input_ids"]
    model = scripted_model(tokenizer, [prompt["input_ids"][-1], *answer, end_id, *rest])
    processor = MultimodalProcessor.from_model(model, tokenizer, {"vision": CLIP_PROC}, template="tokenizer")
    assert end_of_turn_token_ids(processor.template, tokenizer) == [end_id] != [tokenizer.eos_token_id]
    assert processor.tokenizer.eos_token_id != end_id
    kwargs = generation_kwargs(processor, 12, model=model)
    assert kwargs["eos_token_id"][:2] == [end_id, tokenizer.eos_token_id]
    assert answer_batch(model, processor, [messages], [None], kwargs) == ["Red."]
    # without the end-of-turn stop the script runs on into a new turn (what the case measured)
    runs_on = answer_batch(model, processor, [messages], [None], {**kwargs, "eos_token_id": [tokenizer.eos_token_id]})
    assert runs_on[0] != "Red." and runs_on[0].startswith("Red.")


def test_end_of_turn_tokens_of_every_template(tmp_path):
    tokenizer = tiny_tokenizer()
    ids = {name: end_of_turn_token_ids(name, tokenizer) for name in TEMPLATE_NAMES if name != "tokenizer"}
    eos = tokenizer.eos_token_id
    assert ids["vicuna_v1"] == ids["llama2"] == ids["mistral"] == ids["zephyr"] == ids["plain"] == [eos]
    assert ids["chatml"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert ids["llama3"] == [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    gemma = tiny_tokenizer()
    gemma.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    gemma.chat_template = GEMMA
    assert end_of_turn_token_ids("tokenizer", gemma) == [gemma.convert_tokens_to_ids("<end_of_turn>")]
    gemma.chat_template = "{% for m in messages %}{{ m['content'] + '\n\n' }}{% endfor %}"  # plain-text turns
    assert end_of_turn_token_ids("tokenizer", gemma) == []


def test_generation_config_eos_ids_stop_too(tmp_path):
    from mmloom.inference.generate import stop_token_ids

    model = vlm().eval()
    model.language_model.generation_config.eos_token_id = [1, 7]
    processor = MultimodalProcessor.from_model(model, tiny_tokenizer(), {"vision": CLIP_PROC}, template="vicuna_v1")
    assert stop_token_ids(processor, model) == [1, 7]


# ----------------------------------------------------------------------------- system text
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved with processors of several templates: {template: folder}."""
    root = tmp_path_factory.mktemp("templates")
    torch.manual_seed(0)
    model = vlm().eval()
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    out = {}
    for name in ("chatml", "vicuna_v1", "plain", "tokenizer", "llama2", "llama3", "zephyr", "mistral"):
        options = {"terminator": "eos"} if name == "plain" else {}
        write_mmloom(Bundle(model, tokenizer, {"vision": CLIP_PROC}, name, options), root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("template", ["chatml", "vicuna_v1"])
def test_chat_system_text_without_an_image(saved, template):
    """chat-system-without-image: the system text reaches the model with or without an image."""
    from mmloom.inference.chat import ChatSession
    from mmloom.inference.generate import load_model_and_processor

    model, processor = load_model_and_processor(saved[template])
    seen = []
    session = ChatSession(model, processor, max_new_tokens=1, system="You are a pirate.", stream=False)
    original = model.generate

    def recording(input_ids, **kwargs):
        seen.append(input_ids[0][kwargs["attention_mask"][0].bool()].tolist())
        return original(input_ids, **kwargs)

    model.generate = recording
    session.ask("What colour is the sea?")
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What colour is the sea?"}]
    want = processor(conversations=[messages], add_generation_prompt=True)["input_ids"][0].tolist()
    assert seen == [want]
    assert "You are a pirate." in processor.tokenizer.decode(want)


def test_generate_takes_a_system_text(saved, tmp_path):
    from mmloom.inference.generate import generate_answers, load_model_and_processor

    model, processor = load_model_and_processor(saved["chatml"])
    seen = []
    original = model.generate
    model.generate = lambda input_ids, **kw: (seen.append(processor.tokenizer.decode(input_ids[0])),
                                              original(input_ids, **kw))[1]
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "text": "Hi?"}) + "\n")
    generate_answers(model, processor, tmp_path / "q.jsonl", tmp_path / "a.jsonl", max_new_tokens=1,
                     system="Be brief.", progress=False)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in seen[0]
    assert main(["generate", str(saved["chatml"]), str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "b.jsonl"),
                 "--system", "Be brief.", "--max-new-tokens", "1"]) == 0


def test_a_phase1_model_asked_text_alone_says_what_to_do(saved, tmp_path, capsys):
    assert main(["chat", str(saved["plain"]), "--prompt", "What is it?", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'plain'" in err and "--image PATH" in err
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 7, "text": "Hi?"}) + "\n")
    assert main(["generate", str(saved["plain"]), str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "a.jsonl")]) == 2
    assert "question 7" in capsys.readouterr().err


def test_template_override_of_a_saved_processor(saved):
    processor = MultimodalProcessor.from_pretrained(saved["plain"], template="tokenizer")  # plain options dropped
    assert processor.template.name == "tokenizer"
    assert MultimodalProcessor.from_pretrained(saved["plain"]).template.terminator == "eos"


# -------------------------------------------------------------------------- default template
def test_no_template_given_takes_the_tokenizers_chat_template(tmp_path, capsys):
    """default-template-from-tokenizer: init (and data build, see test_data_build) without a template use the
    LLM's own chat template when its tokenizer has one, else vicuna_v1, and say which."""
    tiny_clip_vision().save_pretrained(tmp_path / "clip")
    CLIP_PROC.save_pretrained(tmp_path / "clip")
    tokenizer = chat_tokenizer("qwen2", tmp_path / "tok")
    for name, template in (("chat", CHATML), ("base", None)):
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp_path / name)
        tiny_llm(vocab_size=len(tokenizer)).save_pretrained(tmp_path / name)
        capsys.readouterr()
        assert main(["init", "--image-model", str(tmp_path / "clip"), "--text-model", str(tmp_path / name),
                     "--out", str(tmp_path / f"{name}-model")]) == 0
        err = capsys.readouterr().err
        processor = MultimodalProcessor.from_pretrained(tmp_path / f"{name}-model")
        if template is None:
            assert processor.template.name == "vicuna_v1" and "template vicuna_v1: LLaVA-1.5's" in err
            continue
        assert processor.template.name == "tokenizer" and "the LLM tokenizer's own chat_template" in err
        messages = [{"role": "user", "content": "What colour is the shape?"}]
        ids = processor(conversations=[messages], add_generation_prompt=True)["input_ids"][0].tolist()
        assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]


def test_data_build_without_a_template_takes_the_tokenizers_chat_template(tmp_path, capsys):
    import h5py
    import yaml

    tokenizer = chat_tokenizer("qwen2", tmp_path / "tok")
    tokenizer.save_pretrained(tmp_path / "tok")
    Image.new("RGB", (32, 32), (200, 30, 10)).save(tmp_path / "red.png")
    (tmp_path / "in").mkdir()
    record = {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                                    {"from": "gpt", "value": "Red."}]}
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps(record) + "\n")
    config = {"setup": {"input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "h5"), "processes": 1},
              "processor": {"tokenizer_type": str(tmp_path / "tok"), "max_sequence_length": 96},
              "dataset": {"num_patches": 16, "image_dir": str(tmp_path)}}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(config))
    assert main(["data", "build", str(tmp_path / "build.yaml")]) == 0
    assert "template tokenizer: the LLM tokenizer's own chat_template" in capsys.readouterr().out
    params = json.loads((tmp_path / "h5" / "data_params.json").read_text())
    assert params["dataset"]["system_prompt_style"] == "tokenizer"  # recorded with the data
    with h5py.File(next((tmp_path / "h5").glob("*.h5")), "r") as f:
        row = f["data"][0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    want = []
    messages = [{"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "Red."}]
    for token in tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]:
        want += [params["post-process"]["pad_id"]] * 16 if token == image_id else [token]  # slots hold the pad id
    got = row[0][row[3] == 0].tolist()
    assert got == want[:len(got)] and len(want) - len(got) <= 1
    assert tokenizer.decode(row[2][row[1] == 1].tolist()) == "Red.<|im_end|>"


def test_templates_are_documented_in_help_and_docs():
    from mmloom.cli.convert import TEMPLATE_HELP
    from mmloom.processing.templates import _TEMPLATES

    for name, cls in _TEMPLATES.items():
        assert f"{name} (" in TEMPLATE_HELP and cls.source
    docs = (Path(__file__).resolve().parents[1] / "docs" / "templates.md").read_text()
    for name, rendered in template_renderings().items():
        assert f"### `{name}`" in docs and f"```\n{rendered}\n```" in docs, name


def template_renderings() -> dict[str, str]:
    """What each template renders for a two-turn conversation with a system prompt and an image (the
    `tokenizer` template with SmolLM2-Instruct's chat template); docs/templates.md shows exactly these."""
    from mmloom.testing import tiny_tokenizer as tok

    messages = [{"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": "<image>\nWhat is in the picture?"},
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": "Where is it?"},
                {"role": "assistant", "content": "On the left."}]
    smol = tok()
    smol.chat_template = SMOLLM2_TEMPLATE
    out = {}
    for name in TEMPLATE_NAMES:
        template = get_template(name, tokenizer=smol) if name == "tokenizer" else get_template(name)
        bos = "<s>" if template.add_bos else ""
        out[name] = bos + template.render(messages)
    return out


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# -------------------------------------------------------------------------------- exports
@pytest.mark.parametrize("template", ["chatml", "tokenizer", "vicuna_v1", "llama2", "llama3", "zephyr", "mistral",
                                      "plain"])
def test_hf_llava_export_chat_template_gives_mmloom_ids(saved, template, tmp_path, capsys):
    """hf-llava-export-chat-template: every template's export carries a chat template whose ids (image
    expanded) equal mmloom's processor, with a system turn and a second question too; importing the export
    records the template."""
    from transformers import AutoProcessor

    # each template with a tokenizer of its family: BOS added by the tokenizer exactly where the template wants it
    family = {"chatml": "qwen2", "tokenizer": "qwen2", "zephyr": "qwen2", "llama3": "llama3"}.get(template)
    source = saved[template]
    if family is not None:
        tokenizer = chat_tokenizer(family, tmp_path / "tok")
        encoder = ModalEncoderModule(tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"))
        model = MultimodalModel({"vision": encoder}, tiny_llm(vocab_size=len(tokenizer)), init_projector_type="mlp2x_gelu",
                                placeholder_token_ids={"vision": tokenizer.convert_tokens_to_ids("<image>")})
        source = tmp_path / "mm"
        write_mmloom(Bundle(model, tokenizer, {"vision": CLIP_PROC}, template), source)
    capsys.readouterr()
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(source), str(tmp_path / "hf")]) == 0
    assert "no chat template text reproduces" not in capsys.readouterr().err
    hf = AutoProcessor.from_pretrained(tmp_path / "hf")
    ours = MultimodalProcessor.from_pretrained(source)
    image = Image.new("RGB", (32, 32), (200, 30, 10))
    conversations = [
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
         [{"role": "user", "content": "<image>\nWhat is it?"}]),
        ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
          {"role": "user", "content": [{"type": "text", "text": "Colour?"}]}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
          {"role": "assistant", "content": "A square."}, {"role": "user", "content": "Colour?"}]),
    ]
    for theirs, mine in conversations[:1] if template == "plain" else conversations:
        text = hf.apply_chat_template(theirs, add_generation_prompt=True)
        # the image in its message part, as transformers documents it (every 5.x release reads it there)
        with_image = [{**m, "content": [{**part, "image": image} if part["type"] == "image" else part
                                        for part in m["content"]]} for m in theirs]
        got = hf.apply_chat_template(with_image, add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
        assert text.count("<image>") == 1
        want = ours(conversations=[mine], images=[image], add_generation_prompt=True)["input_ids"]
        assert torch.equal(torch.as_tensor(got), want), template
    assert main(["convert", "--from", "hf-llava", "--to", "mmloom", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = MultimodalProcessor.from_pretrained(tmp_path / "back")
    assert back.template.name == template and back.template_options == ours.template_options


def test_exports_are_the_same_bytes_on_repeat(tmp_path):
    """New embedding rows (a <pad> added for LlavaProcessor, the vocabulary padded to 64) are the mean of the
    old rows, not random draws: an export written twice is byte-identical."""
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    write_mmloom(Bundle(vlm().eval(), tokenizer, {"vision": CLIP_PROC}), tmp_path / "mm")
    for name in ("a", "b"):
        assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(tmp_path / "mm"), str(tmp_path / name)]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "a" / "model.safetensors"))
    embed = weights["language_model.model.embed_tokens.weight"]
    assert embed.shape[0] % 64 == 0
    torch.testing.assert_close(embed[-1], embed[:400].mean(0))


# ------------------------------------------------------------------------------------ LoRA
def adapted(model, target_modules, parts=("language_model",)):
    from types import SimpleNamespace

    from mmloom.model.adapters import add_lora

    add_lora(model, SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=target_modules, parts=list(parts)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(std=0.5)  # a trained adapter: nonzero updates
    return model.eval()


def model_logits(model):
    torch.manual_seed(2)
    ids = torch.tensor([[0] + [4] * 16 + [30, 31, 32, 33]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 32, 32)).logits


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "lm_head"], ["embed_tokens", "o_proj"]])
def test_lora_on_a_tied_embedding_merges_exactly(targets, tmp_path):
    """tied-lora-merge: an adapter on lm_head (or embed_tokens) of an LLM with tied embeddings: the merged
    model, saved and loaded, computes the adapter model's logits (the head gets its own weight)."""
    from mmloom.model.adapters import merge_adapters

    model = adapted(vlm("qwen2", tie_word_embeddings=True), targets)
    want = model_logits(model)
    merged = merge_adapters(model)
    layer = "lm_head" if "lm_head" in targets else "model.embed_tokens"
    assert merged == [f"language model ({layer} untied from the shared embedding weight)"]
    assert float((model_logits(model) - want).abs().max()) < 1e-5
    model.save_pretrained(tmp_path / "merged")
    again = MultimodalModel.from_pretrained(tmp_path / "merged")
    assert not again.language_model.config.tie_word_embeddings
    assert float((model_logits(again) - want).abs().max()) < 1e-5


def test_merge_lora_folds_every_adapted_part(tmp_path, capsys):
    """Adapters on the vision encoder and the LLM: merge-lora folds both (it used to fold the LLM's only)."""
    from mmloom.model.adapters import adapted_parts

    model = adapted(vlm(), ["q_proj", "v_proj"], parts=("language_model", "vision"))
    want = model_logits(model)
    model.save_pretrained(tmp_path / "adapters")
    assert main(["merge-lora", str(tmp_path / "adapters"), str(tmp_path / "merged")]) == 0
    assert "vision encoder; language model" in capsys.readouterr().out
    merged = MultimodalModel.from_pretrained(tmp_path / "merged")
    assert adapted_parts(merged) == []
    assert float((model_logits(merged) - want).abs().max()) < 1e-5


def test_an_adapter_no_merge_can_fold_exactly_is_refused_at_training_start():
    model = vlm()
    layers = model.language_model.model.layers
    layers[1].mlp.down_proj.weight = layers[0].mlp.down_proj.weight  # a weight shared outside the embedding tie
    with pytest.raises(MmloomError, match="shares its weight with .*leave down_proj out"):
        adapted(model, ["down_proj"])


# ----------------------------------------------------------------------------- towers without CLS
def test_a_tower_without_cls_gets_full_features(tmp_path, capsys):
    tiny_siglip_vision().save_pretrained(tmp_path / "siglip")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "llm")
    tiny_llm(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "llm")
    common = ["init", "--image-model", str(tmp_path / "siglip"), "--text-model", str(tmp_path / "llm")]
    assert main([*common, "--out", str(tmp_path / "model")]) == 0
    model = MultimodalModel.from_pretrained(tmp_path / "model")
    assert model.vision_encoder.postprocess_module_callback.strategy == "full"
    assert model.num_feature_tokens("vision") == 16  # every patch of 32 px / 8 px
    capsys.readouterr()
    assert main([*common, "--feature-strategy", "patch", "--out", str(tmp_path / "dropped")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CLS token" in err and not (tmp_path / "dropped").exists()


def test_a_training_config_gives_a_tower_without_cls_full_features():
    from mmloom.training.builder import build_model
    from mmloom.training.config import ModelSection

    siglip = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    llm = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    model = build_model(ModelSection(image_model=siglip, text_model=llm))
    assert model.vision_encoder.postprocess_module_callback.strategy == "full"
    assert model.num_feature_tokens("vision") == 16
    clip = {**siglip, "model_type": "clip_vision_model"}
    assert build_model(ModelSection(image_model=clip, text_model=llm)).num_feature_tokens("vision") == 16  # CLS dropped
    with pytest.raises(MmloomError, match="model.image_feature_select_mode 'patch' drops the first position"):
        build_model(ModelSection(image_model=siglip, text_model=llm, image_feature_select_mode="patch"))
