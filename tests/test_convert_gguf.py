"""`mmloom convert --to gguf` (llama.cpp / Ollama): what the files hold as the gguf package's own reader sees
them, the chat template rendered by Jinja (as llama.cpp and transformers render it) equal to mmloom's
templates, every route into the export (mmloom, hf-llava, original LLaVA), and the refusals: one line,
nothing written. Parity in llama.cpp itself is checked in the client stage (tests/clients/test_llamacpp_*)."""

from __future__ import annotations

import gguf
import jinja2
import pytest
import torch

from helpers import IMAGE_ID, audio_vlm, vlm
from mmloom import (
    FeatureSelect,
    ModalEncoderModule,
    MultimodalModel,
    MultimodalProjector,
    MultimodalProjectorConfig,
)
from mmloom.cli.main import main
from mmloom.errors import MmloomError
from mmloom.interop.common import Bundle, write_mmloom
from mmloom.interop.llamacpp import bpe_pre_tokenizer, jinja_chat_template, write_gguf
from mmloom.model.callbacks import AnyresPack
from mmloom.processing.image import ImageTransform
from mmloom.processing.templates import TEMPLATE_NAMES, get_template, turn_layout
from mmloom.testing import tiny_clip_vision, tiny_llm, tiny_siglip_vision, tiny_tokenizer

SIGLIP = ImageTransform(32, mean=[0.5] * 3, std=[0.5] * 3)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"}],
    [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Two?"}],
    [{"role": "system", "content": "S."}, {"role": "user", "content": "One?"}, {"role": "assistant", "content": "Yes."},
     {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "No."}],
]


def siglip_vlm(strategy: str = "full", projector: str = "mlp2x_gelu", llm: str = "llama", **llm_overrides):
    encoder = ModalEncoderModule(tiny_siglip_vision(), postprocess_module_callback=FeatureSelect(-2, strategy))
    return MultimodalModel({"vision": encoder}, tiny_llm(llm, **llm_overrides), init_projector_type=projector,
                           placeholder_token_ids={"vision": IMAGE_ID})


def fields(path) -> tuple[dict, dict]:
    """(metadata, tensors by name) of a GGUF file, read with the gguf package's own reader."""
    reader = gguf.GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return metadata, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def siglip_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    write_mmloom(Bundle(siglip_vlm(), tiny_tokenizer(), {"vision": SIGLIP}, "chatml"), root / "mm")
    assert main(["convert", "--from", "mmloom", "--to", "gguf", str(root / "mm"), str(root / "tiny-vlm")]) == 0
    return root / "tiny-vlm"


def test_files_and_language_model_metadata(siglip_export):
    # the three files, and the marker that says `mmloom convert` wrote the folder (--overwrite replaces it)
    assert sorted(p.name for p in siglip_export.iterdir()) == [
        ".mmloom-output.json", "Modelfile", "mmproj-tiny-vlm.gguf", "tiny-vlm.gguf"]
    kv, tensors = fields(siglip_export / "tiny-vlm.gguf")
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokenizer = tiny_tokenizer()
    assert len(kv["tokenizer.ggml.tokens"]) == tensors["token_embd.weight"].shape[-1] == kv["llama.vocab_size"]
    assert kv["tokenizer.ggml.tokens"][:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert kv["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert kv["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # chatml's end of turn
    assert kv["tokenizer.ggml.add_bos_token"] is False  # chatml puts no BOS first
    assert kv["llama.rope.dimension_count"] == 12 and kv["llama.attention.head_count_kv"] == 2
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # 1-D stays f32
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert "output.weight" in tensors  # tiny_llm does not tie its embeddings
    modelfile = (siglip_export / "Modelfile").read_text()
    assert "FROM ./tiny-vlm.gguf\nFROM ./mmproj-tiny-vlm.gguf\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "{{ .Content }}<|im_end|>\n" in modelfile


def test_mmproj_metadata(siglip_export):
    kv, tensors = fields(siglip_export / "mmproj-tiny-vlm.gguf")
    assert kv["general.architecture"] == "clip" and kv["clip.projector_type"] == "mlp"
    assert kv["clip.vision.feature_layer"] == [1]  # hidden_states[-2] of a 2-layer tower: index 1
    assert kv["clip.vision.block_count"] == 1 and kv["clip.use_gelu"] is True  # SigLIP: gelu_pytorch_tanh
    assert kv["clip.vision.image_mean"] == [0.5] * 3 and kv["clip.vision.image_size"] == 32
    assert not any(name.startswith(("v.post_ln", "v.blk.1.")) for name in tensors)  # never applied / not needed
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.patch_embd.weight", "v.position_embd.weight"} <= set(tensors)
    assert tensors["v.position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_q8_0_quantizes_rows_of_32_and_keeps_the_vision_file_f16(tmp_path):
    torch.manual_seed(0)
    write_mmloom(Bundle(siglip_vlm(hidden_size=64), tiny_tokenizer(), {"vision": SIGLIP}, "chatml"), tmp_path / "mm")
    assert main(["convert", "--from", "mmloom", "--to", "gguf", "--outtype", "q8_0", "--name", "q",
                 str(tmp_path / "mm"), str(tmp_path / "out")]) == 0
    _, tensors = fields(tmp_path / "out" / "q.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    original = MultimodalModel.from_pretrained(tmp_path / "mm").language_model.model.layers[0].mlp.up_proj.weight.detach()
    data = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert float((torch.from_numpy(data.copy()).reshape(original.shape) - original).abs().max()) < 0.01
    _, vision = fields(tmp_path / "out" / "mmproj-q.gguf")
    assert vision["mm.0.weight"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("name", [n for n in TEMPLATE_NAMES if n not in ("plain", "tokenizer")])
def test_chat_template_renders_like_the_template(name):
    template = get_template(name)
    jinja = jinja2.Environment().from_string(jinja_chat_template(turn_layout(template)))
    for messages in CONVERSATIONS:
        for gen in ((True, False) if messages[-1]["role"] == "user" else (False,)):
            assert jinja.render(messages=messages, add_generation_prompt=gen) == template.render(messages, gen)


def test_tokenizer_template_layout_and_plain_refused():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = get_template("tokenizer", tokenizer=tokenizer)
    layout = turn_layout(template, tokenizer)
    for messages in CONVERSATIONS:
        assert layout.render(messages, messages[-1]["role"] == "user") == template.render(
            messages, messages[-1]["role"] == "user")
    with pytest.raises(MmloomError, match="template 'plain' has no fixed text around its turns"):
        turn_layout(get_template("plain"))


def test_every_route_writes_the_same_tensors(tmp_path):
    """mmloom, its hf-llava export and its original-LLaVA export all give the same GGUF tensors."""
    torch.manual_seed(0)
    write_mmloom(Bundle(vlm(), tiny_tokenizer(), {"vision": ImageTransform(32)}), tmp_path / "mm")
    assert main(["convert", "--from", "mmloom", "--to", "hf-llava", str(tmp_path / "mm"), str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from", "mmloom", "--to", "llava", str(tmp_path / "mm"), str(tmp_path / "llava")]) == 0
    outputs = {}
    for fmt, src in (("mmloom", "mm"), ("hf-llava", "hf"), ("llava", "llava")):
        assert main(["convert", "--from", fmt, "--to", "gguf", "--outtype", "f32", "--name", "m",
                     str(tmp_path / src), str(tmp_path / f"gguf-{fmt}")]) == 0
        outputs[fmt] = [fields(tmp_path / f"gguf-{fmt}" / name)[1] for name in ("m.gguf", "mmproj-m.gguf")]
    for fmt in ("hf-llava", "llava"):
        for reference, other in zip(outputs["mmloom"], outputs[fmt], strict=True):
            # hf-llava adds <pad> and pads the vocabulary to 64 rows: the rows mmloom has must be equal
            for name, tensor in reference.items():
                a, b = tensor.data, other[name].data
                rows = min(a.shape[0], b.shape[0])
                assert (a[:rows] == b[:rows]).all(), (fmt, name)


def _custom_projector_model():
    projector = MultimodalProjector(MultimodalProjectorConfig(), projection=torch.nn.Sequential(
        torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48)))
    return MultimodalModel({"vision": ModalEncoderModule(tiny_siglip_vision(), projector=projector,
                                                         postprocess_module_callback=FeatureSelect(-2, "full"))},
                           tiny_llm("llama"), placeholder_token_ids={"vision": IMAGE_ID})


def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    tok = tiny_tokenizer()
    with pytest.warns(UserWarning, match="only the tokenizer is saved"):
        write_mmloom(Bundle(audio_vlm(), tok, {}), tmp_path / "audio")
    clip_keeps_cls = MultimodalModel({"vision": ModalEncoderModule(
        tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "cls_patch"))}, tiny_llm("llama"),
        placeholder_token_ids={"vision": IMAGE_ID})
    anyres = MultimodalModel({"vision": ModalEncoderModule(
        tiny_clip_vision(), postprocess_module_callback=FeatureSelect(-2, "patch"),
        postprocess_projector_callback=AnyresPack(48, [[32, 64], [64, 32]], patch_grid=4, image_size=32))},
        tiny_llm("llama"), placeholder_token_ids={"vision": IMAGE_ID})
    models = {"linear": (siglip_vlm(projector="linear"), "projector 'mlp' is Linear -> GELU -> Linear"),
              "anyres": (anyres, "cannot represent the vision encoder's postprocess_projector_callback"),
              "relu": (siglip_vlm(projector="mlp2x_relu"), "this model's is 'mlp2x_relu'"),
              "siglip-patch": (siglip_vlm(strategy="patch"), "train with the 'full' strategy"),
              "clip-cls": (clip_keeps_cls, "llama.cpp drops the CLS position of a CLIP tower"),
              "gemma": (siglip_vlm(llm="gemma"), "holds Llama, Mistral and Qwen2 language models")}
    for name, (model, _) in models.items():
        write_mmloom(Bundle(model, tok, {"vision": SIGLIP}), tmp_path / name)
    cases = {"audio": "exactly one encoder named 'vision'", **{k: v for k, (_, v) in models.items()}}
    for name, message in cases.items():
        capsys.readouterr()
        assert main(["convert", "--from", "mmloom", "--to", "gguf", str(tmp_path / name), str(tmp_path / f"{name}-out")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"{name}-out").exists()
    # a custom projector module (the library route: its folder needs the module to load at all)
    with pytest.raises(MmloomError, match="cannot represent a custom projector module"):
        write_gguf(Bundle(_custom_projector_model(), tok, {"vision": SIGLIP}), tmp_path / "custom-out")
    assert not (tmp_path / "custom-out").exists()


def test_unknown_pre_tokenizer_is_named():
    data = {"normalizer": None, "model": {"type": "BPE"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "ByteLevel"}]}}
    with pytest.raises(MmloomError, match=r"pre-tokenizer \['Whitespace', 'ByteLevel'\] is not one llama.cpp knows"):
        bpe_pre_tokenizer(data)
    data["normalizer"] = {"type": "Lowercase"}
    with pytest.raises(MmloomError, match=r"normalizer \['Lowercase'\] has no llama.cpp equivalent"):
        bpe_pre_tokenizer(data)


def test_options_belong_to_gguf(tmp_path, capsys):
    torch.manual_seed(0)
    write_mmloom(Bundle(siglip_vlm(), tiny_tokenizer(), {"vision": SIGLIP}), tmp_path / "mm")
    for args, message in ((["--to", "hf-llava", "--outtype", "q8_0"], "--outtype and --name apply to --to gguf only"),
                          (["--to", "gguf", "--dtype", "float16"], "--dtype does not apply"),
                          (["--to", "gguf", "--name", "a/b"], "must be letters, digits")):
        capsys.readouterr()
        assert main(["convert", "--from", "mmloom", *args, str(tmp_path / "mm"), str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_an_earlier_gguf_export_is_replaced_only_on_request(tmp_path, capsys):
    """A GGUF export is claimed like every export: converting again onto it is refused in one line unless
    --overwrite is given, and then the folder is replaced whole (the files of the new export, nothing else)."""
    torch.manual_seed(0)
    write_mmloom(Bundle(siglip_vlm(), tiny_tokenizer(), {"vision": SIGLIP}, "chatml"), tmp_path / "mm")
    argv = ["convert", "--from", "mmloom", "--to", "gguf", str(tmp_path / "mm"), str(tmp_path / "out")]
    assert main(argv) == 0
    (tmp_path / "out" / "stray.txt").write_text("left by the user")
    capsys.readouterr()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "stray.txt").exists()
    assert main([*argv, "--outtype", "q8_0", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".mmloom-output.json", "Modelfile", "mmproj-out.gguf", "out.gguf"]
