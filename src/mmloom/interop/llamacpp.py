"""llama.cpp / Ollama: a GGUF language model, an ``mmproj`` GGUF (vision tower + projector) and an
Ollama ``Modelfile``, written with the ``gguf`` package (the format's own Python writer, its tensor
name maps and its quantizers).

    OUT/<name>.gguf          the language model: architecture and hyper-parameters, the tokenizer
                             (vocabulary with scores and types, merges, pre-tokenizer, special ids,
                             add-BOS), the chat template (Jinja, from the model's conversation template)
    OUT/mmproj-<name>.gguf   the vision tower and projector as llama.cpp's multimodal library (``mtmd`` /
                             ``clip``) loads them: projector type ``mlp``, image size, patch size,
                             mean / std, the tower's activation, the feature layer(s)
    OUT/Modelfile            ``ollama create NAME -f OUT/Modelfile``: both files, the chat template in
                             Ollama's Go template syntax, the default system text and the stop tokens

What llama.cpp can represent (read in its ``tools/mtmd/clip.cpp`` and ``models/llava.cpp``):

* the projector: its type ``mlp`` is ``mm.0`` -> GELU -> ``mm.2`` (both with bias): mmloom's
  ``mlp2x_gelu``. A ``linear`` projector or a deeper MLP has no llama.cpp form.
* the tower: CLIP or SigLIP vision transformers. The feature layer is metadata
  (``clip.vision.feature_layer``: hidden-state indices, 0 = the embeddings after the pre-norm, as
  transformers' ``hidden_states``), several layers are concatenated in increasing order, and only
  the layers up to the deepest one are stored. ``post_layernorm`` is never written (llama.cpp would
  apply it to the selected layer). The activation is metadata: ``quick_gelu`` (CLIP's) is the
  default, ``clip.use_gelu`` selects the tanh-approximated GELU (SigLIP's ``gelu_pytorch_tanh``).
* the CLS position: llama.cpp keeps every patch position of a tower and drops the CLS one. A CLIP
  tower maps with the ``patch`` strategy (LLaVA's); a SigLIP tower, which has no CLS, only with
  ``full`` (``cls_patch``), every position kept. llama.cpp's current LLaVA graph concatenates the
  CLS embedding after the patches while its inputs still assume it first (llama.cpp issue 25814,
  fix pending in pull request 25844): with CLIP towers llama.cpp's image answers differ from
  mmloom's until that fix is released. The export is written for the format as specified.
* the language model: Llama and Mistral (GGUF architecture ``llama``; query / key rows reordered
  for llama.cpp's rotary layout) and Qwen2 (``qwen2``); RoPE without scaling or with linear scaling.
* the tokenizer: SentencePiece BPE models (``tokenizer.model``, llama.cpp's ``llama`` vocabulary) and
  byte-level BPE tokenizers whose pre-tokenizer llama.cpp knows (``gpt-2``, ``smollm``, ``qwen2``,
  ``llama-bpe``), recognised from ``tokenizer.json``'s normalizer and pre-tokenizer.

Anything else (an audio encoder, another projector, a custom module, a callback llama.cpp does not
implement, an unknown pre-tokenizer) is refused with one MmloomError line naming what does not map,
before anything is written.

Image preprocessing: llama.cpp resizes every image to the tower's size itself (bicubic, its own
implementation), letterboxing a non-square image with the colour (122, 116, 104); it never
center-crops. Images that are already square at the tower's size reach the tower unchanged.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmloom.errors import MmloomError
from mmloom.files import read_json, write_text
from mmloom.interop.common import Bundle, default_image_processor, vision_parts
from mmloom.interop.hf4 import hf4_vision_state, rope_fields
from mmloom.interop.image_processors import hf_image_processor
from mmloom.interop.tokens import vocab_rows
from mmloom.model.adapters import merge_adapters
from mmloom.model.serialization import weight_bytes
from mmloom.outputs import new_folder
from mmloom.processing.tokenizer_files import save_tokenizer

FORMAT = "gguf"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f16"
# transformers model_type -> (GGUF architecture, query/key rows reordered for llama.cpp's rotary layout)
LLM_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
# vision tower model_type -> whether it has a CLS position
TOWERS = {"clip_vision_model": True, "siglip_vision_model": False}
# tower hidden_act -> clip.cpp's FFN activation ("gelu_quick" when neither use_gelu nor use_silu is set)
TOWER_ACTIVATIONS = {"quick_gelu": "gelu_quick", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu": "gelu",
                     "silu": "silu"}
# projector activations that llama.cpp's "mlp" projector computes (ggml_gelu: tanh-approximated GELU)
PROJECTOR_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new")
LLAMACPP_PAD_COLOR = (122, 116, 104)  # clip.cpp's letterbox colour for the "mlp" projector
# byte-level BPE pre-tokenizer regexes of the tokenizer families llama.cpp recognises (tokenizer.json form)
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values


# ----------------------------------------------------------------------------------- tokenizer
@dataclass
class GgufVocab:
    """The tokenizer as GGUF stores it (``tokenizer.ggml.*``)."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str | None  # llama.cpp's pre-tokenizer name (byte-level BPE only)
    tokens: list[str | bytes]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad / eot -> id
    add_bos: bool = False
    add_space_prefix: bool | None = None  # SentencePiece's dummy prefix
    padded: int = 0  # unused rows added to reach the embedding rows
    notes: list[str] = field(default_factory=list)


def _components(component: Any) -> list[dict]:
    """A tokenizers normalizer / pre-tokenizer as a flat list (a Sequence unrolled)."""
    if not isinstance(component, dict):
        return []
    children = component.get("pretokenizers", component.get("normalizers"))
    if component.get("type") == "Sequence" and isinstance(children, list):
        return [part for child in children for part in _components(child)]
    return [component]


def bpe_pre_tokenizer(data: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the pre-tokenizer of a byte-level BPE
    ``tokenizer.json`` (`data`): ``gpt-2`` (ByteLevel with GPT-2's regex), ``smollm`` (digits split one by
    one, then GPT-2's regex), ``qwen2`` / ``llama-bpe`` (the Qwen2 / Llama-3 regex, then ByteLevel).
    Raises MmloomError naming the normalizer or pre-tokenizer llama.cpp does not know."""
    normalizers = [n.get("type") for n in _components(data.get("normalizer"))]
    if normalizers not in ([], ["NFC"]):
        raise MmloomError(f"the tokenizer's normalizer {normalizers} has no llama.cpp equivalent (llama.cpp "
                          "applies none before byte-level BPE)")
    parts = _components(data.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]

    def byte_level(part: dict, regex: bool) -> bool:
        return (part.get("type") == "ByteLevel" and not part.get("add_prefix_space", False)
                and bool(part.get("use_regex", True)) == regex)

    def split(part: dict, regex: str) -> bool:
        pattern = part.get("pattern") or {}
        return (part.get("type") == "Split" and pattern.get("Regex") == regex
                and part.get("behavior") == "Isolated" and not part.get("invert", False))

    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
            and byte_level(parts[1], True)):
        return "smollm"
    if len(parts) == 2 and byte_level(parts[1], False):
        if split(parts[0], QWEN2_REGEX) and normalizers in ([], ["NFC"]):
            return "qwen2"
        if split(parts[0], LLAMA3_REGEX) and (data.get("model") or {}).get("ignore_merges"):
            return "llama-bpe"
    raise MmloomError(
        f"the tokenizer's pre-tokenizer {kinds} is not one llama.cpp knows (supported: GPT-2's ByteLevel, "
        "SmolLM's digits + ByteLevel, the Qwen2 and Llama-3 split regexes)"
    )


def _added_tokens(tokenizer) -> dict[int, tuple[str, bool]]:
    """{id: (content, special)} of the tokenizer's added tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {int(i): (str(t), bool(getattr(t, "special", False))) for i, t in decoder.items()}


def _sentencepiece_vocab(folder: Path, tokenizer) -> GgufVocab:
    """The SentencePiece pieces (with their scores and types, read by gguf's SentencePieceVocab), the
    tokenizer's added tokens after them (CONTROL when special, else USER_DEFINED)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto.FromString((folder / "tokenizer.model").read_bytes())
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        kind = model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise MmloomError(f"the SentencePiece model is of type {kind}; llama.cpp's SentencePiece vocabulary "
                          "(Llama / Mistral) is BPE")
    pieces = list(gguf.SentencePieceVocab(folder).sentencepiece_tokens())
    tokens = [text for text, _, _ in pieces]
    scores = [float(score) for _, score, _ in pieces]
    types = [int(kind) for _, _, kind in pieces]
    added = _added_tokens(tokenizer)
    for i in range(len(pieces), len(tokenizer)):
        if i not in added:
            raise MmloomError(f"token id {i} is neither a SentencePiece piece nor an added token")
        content, special = added[i]
        tokens.append(content.encode("utf-8"))
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
    vocab = GgufVocab("llama", None, tokens, scores, types,
                      add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix))
    if getattr(tokenizer, "legacy", True) is False:
        vocab.notes.append(
            "llama.cpp's SentencePiece tokenizer puts the '▁' prefix on text after every special token "
            "(transformers' legacy behaviour); this tokenizer (legacy: false) does not, so the ids of text "
            "that follows '</s>' inside a prompt (later turns of a conversation) differ")
    return vocab


def _bpe_vocab(data: dict, tokenizer) -> GgufVocab:
    """A byte-level BPE ``tokenizer.json`` (`data`): its vocabulary (byte-level strings), merges and
    added tokens (CONTROL when special, else USER_DEFINED)."""
    import gguf

    model = data.get("model") or {}
    decoder = data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise MmloomError(
            f"the tokenizer is neither SentencePiece (no tokenizer.model found) nor byte-level BPE (model "
            f"{model.get('type')!r}, decoder {decoder.get('type')!r}); llama.cpp cannot load it as it is")
    pre = bpe_pre_tokenizer(data)
    by_id: dict[int, tuple[str, int]] = {int(i): (t, int(gguf.TokenType.NORMAL)) for t, i in model["vocab"].items()}
    for token in data.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(token["id"])] = (token["content"], int(kind))
    n = max(by_id) + 1
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise MmloomError(f"the tokenizer's ids are not contiguous: no token for id(s) {missing[:5]}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GgufVocab("gpt2", pre, [by_id[i][0] for i in range(n)], [0.0] * n, [by_id[i][1] for i in range(n)], merges)


def gguf_vocab(bundle: Bundle, rows: int, add_bos: bool) -> GgufVocab:
    """The tokenizer of `bundle` as GGUF stores it, padded with UNUSED ``[PAD{id}]`` tokens up to the
    language model's `rows` embedding rows. Raises MmloomError when there is no tokenizer, it has more
    tokens than the embedding rows, or llama.cpp has no equivalent of it."""
    import gguf

    tokenizer = bundle.tokenizer
    if tokenizer is None:
        raise MmloomError("the model has no tokenizer: a GGUF file carries one; save the processor with the "
                          "model (MultimodalProcessor.save_pretrained) and convert again")
    if len(tokenizer) > rows:
        raise MmloomError(f"the tokenizer has {len(tokenizer)} tokens but the language model only {rows} "
                          "embedding rows")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_tokenizer(tokenizer, folder, search=[bundle.source] if bundle.source else ())
        if (folder / "tokenizer.model").is_file():
            vocab = _sentencepiece_vocab(folder, tokenizer)
        elif (folder / "tokenizer.json").is_file():
            vocab = _bpe_vocab(read_json(folder / "tokenizer.json"), tokenizer)
        else:
            raise MmloomError("the tokenizer saves neither tokenizer.model nor tokenizer.json")
    if len(vocab.tokens) > rows:
        raise MmloomError(f"the tokenizer has {len(vocab.tokens)} tokens but the language model only {rows} "
                          "embedding rows")
    vocab.padded = rows - len(vocab.tokens)
    for i in range(len(vocab.tokens), rows):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.scores.append(-1000.0)
        vocab.types.append(int(gguf.TokenType.UNUSED))
    for kind in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if value is not None:
            vocab.special[kind] = int(value)
    vocab.add_bos = bool(add_bos and "bos" in vocab.special)
    return vocab


# ------------------------------------------------------------------------------- chat templates
def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Jinja string literal (JSON escapes are Python's)


def jinja_chat_template(layout) -> str:
    """A Jinja chat template (HF / llama.cpp ``messages``, ``add_generation_prompt``) that renders
    what the :class:`~mmloom.processing.templates.TurnLayout` renders; the BOS id is not in the text
    (``tokenizer.ggml.add_bos_token`` adds it)."""
    q = _literal
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {q(layout.default_system or '')} -%}}{{%- set turns = messages -%}}"
        "{%- endif -%}"
        f"{{%- if system -%}}{{{{ {q(layout.system_prefix)} + system + {q(layout.system_suffix)} }}}}"
        f"{{%- else -%}}{{{{ {q(layout.no_system_prefix)} }}}}{{%- endif -%}}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{%- if not loop.first -%}}{{{{ {q(layout.next_user)} }}}}{{%- endif -%}}"
        f"{{{{ message['content'] + {q(layout.user_end)} }}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{ {q(layout.generation_prompt + layout.answer_prefix)} + message['content'] + {q(layout.answer_end)} }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {q(layout.generation_prompt)} }}}}{{%- endif -%}}"
    )


def ollama_template(layout) -> str:
    """The same layout in Ollama's Go template syntax (``.System``, ``.Messages``)."""
    pieces = [layout.system_prefix, layout.system_suffix, layout.no_system_prefix, layout.user_end,
              layout.generation_prompt, layout.answer_prefix, layout.answer_end, layout.next_user]
    if any("{{" in p or '"""' in p for p in pieces):
        raise MmloomError("the conversation template's text holds '{{' or '\"\"\"', which an Ollama TEMPLATE "
                          "cannot hold literally")
    return (
        f"{{{{ if .System }}}}{layout.system_prefix}{{{{ .System }}}}{layout.system_suffix}"
        f"{{{{ else }}}}{layout.no_system_prefix}{{{{ end }}}}"
        '{{ $first := true }}{{ $last := "" }}'
        "{{ range .Messages }}"
        f'{{{{ if eq .Role "user" }}}}{{{{ if not $first }}}}{layout.next_user}{{{{ end }}}}'
        f'{{{{ .Content }}}}{layout.user_end}{{{{ $first = false }}}}{{{{ $last = "user" }}}}'
        f'{{{{ else if eq .Role "assistant" }}}}{layout.generation_prompt}{layout.answer_prefix}{{{{ .Content }}}}'
        f'{layout.answer_end}{{{{ $last = "assistant" }}}}{{{{ end }}}}'
        "{{ end }}"
        f'{{{{ if eq $last "user" }}}}{layout.generation_prompt}{{{{ end }}}}'
    )


def modelfile(name: str, layout, stops: list[str]) -> str:
    """The Ollama Modelfile next to the two GGUF files (`layout`: None for a template without chat form)."""
    lines = [
        f"# Ollama: `ollama create {name} -f Modelfile` in this folder, then `ollama run {name}`",
        f"FROM ./{name}.gguf",
        f"FROM ./mmproj-{name}.gguf",
    ]
    if layout is not None:
        lines.append(f'TEMPLATE """{ollama_template(layout)}"""')
        if layout.default_system and '"""' not in layout.default_system:
            lines.append(f'SYSTEM """{layout.default_system}"""')
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- the plan
@dataclass
class Tensor:
    """One GGUF tensor: its name, the source tensor and the GGML type it is written in."""

    name: str
    source: torch.Tensor
    qtype: Any  # gguf.GGMLQuantizationType
    transform: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class GgufPlan:
    """Everything the export writes, checked before a byte is written."""

    name: str
    arch: str
    llm_kv: dict[str, Any]
    vision_kv: dict[str, Any]
    vocab: GgufVocab
    chat_template: str | None
    layout: Any
    stops: list[str]
    llm_tensors: list[Tensor]
    vision_tensors: list[Tensor]
    file_type: Any
    notes: list[str]


def _qtype(outtype: str, array_shape: tuple[int, ...], vision: bool, force_f32: bool = False):
    """The GGML type of a tensor: 1-D tensors (norms, biases) and `force_f32` ones in F32; the vision
    file in F16 when `outtype` is q8_0 (as llama.cpp's published mmproj files are); Q8_0 rows whose
    length is not a multiple of 32 in F16."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(array_shape) <= 1 or force_f32 or outtype == "f32":
        return T.F32
    if outtype == "q8_0":
        return T.F16 if vision or array_shape[-1] % Q8_BLOCK else T.Q8_0
    return {"f16": T.F16, "bf16": T.BF16}[outtype]


def _reorder_rotary(heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """transformers' Llama query / key rows (rotary pairs in two halves per head) -> llama.cpp's
    ``llama`` layout (rotary pairs adjacent)."""
    def apply(w: np.ndarray) -> np.ndarray:
        rows = w.shape[0]
        return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return apply


def _llm_plan(parts, outtype: str, notes: list[str]) -> tuple[str, dict[str, Any], list[Tensor]]:
    import gguf

    llm = parts.language_model
    config = llm.config
    model_type = getattr(config, "model_type", None)
    if model_type not in LLM_ARCHITECTURES:
        raise MmloomError(f"format {FORMAT!r} holds Llama, Mistral and Qwen2 language models; this model's is "
                          f"{model_type!r}")
    arch, reorder = LLM_ARCHITECTURES[model_type]
    for flag in ("attention_bias", "mlp_bias"):
        if model_type != "qwen2" and getattr(config, flag, False):
            raise MmloomError(f"format {FORMAT!r}: a {model_type} model with {flag} is not supported")
    theta, scaling, _ = rope_fields(config)
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv: dict[str, Any] = {
        "context_length": int(config.max_position_embeddings),
        "embedding_length": hidden,
        "block_count": int(config.num_hidden_layers),
        "feed_forward_length": int(config.intermediate_size),
        "head_count": heads,
        "head_count_kv": kv_heads,
        "rope_dimension_count": head_dim,
        "layer_norm_rms_eps": float(config.rms_norm_eps),
        "rope_freq_base": float(theta if theta is not None else 10000.0),
        "vocab_size": vocab_rows(llm),
    }
    if head_dim != hidden // heads:
        kv["key_length"] = kv["value_length"] = head_dim
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind != "linear":
            raise MmloomError(f"format {FORMAT!r}: RoPE scaling {kind!r} is not supported (none or linear)")
        kv["rope_scaling"] = ("linear", float(scaling["factor"]))
    window = getattr(config, "sliding_window", None)
    if window and (model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        notes.append(f"llama.cpp attends over the whole context; the model's sliding window of {window} tokens "
                     "only matters for longer sequences")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     kv["block_count"])
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors, fallback = [], 0
    for key, value in llm.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MmloomError(f"format {FORMAT!r}: the language model weight {key!r} has no llama.cpp name")
        transform = None
        if reorder and key.endswith("self_attn.q_proj.weight"):
            transform = _reorder_rotary(heads)
        elif reorder and key.endswith("self_attn.k_proj.weight"):
            transform = _reorder_rotary(kv_heads)
        qtype = _qtype(outtype, tuple(value.shape), vision=False)
        fallback += outtype == "q8_0" and value.dim() > 1 and qtype != gguf.GGMLQuantizationType.Q8_0
        tensors.append(Tensor(name, value, qtype, transform))
    if fallback:
        notes.append(f"{fallback} language model tensor(s) whose rows are not a multiple of {Q8_BLOCK} values "
                     "are written in f16, not q8_0")
    return arch, kv, tensors


def _feature_layers(parts, num_layers: int) -> list[int]:
    """The selected hidden states as non-negative indices (0 = the embeddings), in increasing order."""
    layers = parts.layer if isinstance(parts.layer, list) else [parts.layer]
    indices = [layer if layer >= 0 else num_layers + 1 + layer for layer in layers]
    if any(i < 0 or i > num_layers for i in indices):
        raise MmloomError(f"vision feature layer(s) {layers} are outside the tower's {num_layers} layers")
    if indices != sorted(set(indices)):
        raise MmloomError(f"format {FORMAT!r}: llama.cpp concatenates feature layers in increasing order without "
                          f"repeats; this model selects {layers}")
    return indices


def _vision_plan(parts, image_processor, outtype: str, llm_hidden: int, notes: list[str]):
    import gguf

    tower = parts.tower
    config = tower.config
    kind = getattr(config, "model_type", None)
    if kind not in TOWERS or type(tower).__name__ not in ("CLIPVisionModel", "SiglipVisionModel"):
        raise MmloomError(f"format {FORMAT!r} holds CLIP and SigLIP vision towers; this model's is {kind!r} "
                          f"({type(tower).__name__})")
    has_cls = TOWERS[kind]
    if has_cls and not parts.drops_cls:
        raise MmloomError(f"format {FORMAT!r}: llama.cpp drops the CLS position of a CLIP tower; this model keeps it "
                          "(feature strategy cls_patch / full); train with the 'patch' strategy to export")
    if not has_cls and parts.drops_cls:
        raise MmloomError(f"format {FORMAT!r}: llama.cpp keeps every position of a SigLIP tower (it has no CLS); this "
                          "model drops the first patch (feature strategy 'patch'); train with the 'full' strategy "
                          "(--feature-strategy full) to export")
    if parts.depth != 2 or not parts.bias or parts.activation not in PROJECTOR_ACTIVATIONS:
        raise MmloomError(
            f"format {FORMAT!r}: llama.cpp's projector 'mlp' is Linear -> GELU -> Linear with biases (mlp2x_gelu); "
            f"this model's is {parts.projector_type!r} (activation {parts.activation}, bias {parts.bias})")
    if parts.activation == "gelu":
        notes.append("the projector's GELU is exact (erf) in mmloom and tanh-approximated in llama.cpp")
    act = getattr(config, "hidden_act", None)
    ffn = TOWER_ACTIVATIONS.get(act)
    if ffn is None:
        raise MmloomError(f"format {FORMAT!r}: the vision tower's activation {act!r} has no llama.cpp equivalent "
                          f"({', '.join(TOWER_ACTIVATIONS)})")
    if act == "gelu":
        notes.append("the vision tower's GELU is exact (erf) in mmloom and tanh-approximated in llama.cpp")
    size, patch = config.image_size, config.patch_size
    if not isinstance(size, int) or not isinstance(patch, int):
        raise MmloomError(f"format {FORMAT!r} holds square towers; image_size {size}, patch_size {patch}")
    num_layers = int(config.num_hidden_layers)
    layers = _feature_layers(parts, num_layers)
    blocks = max(layers)
    processor = image_processor
    if getattr(processor, "do_rescale", True) and abs(float(getattr(processor, "rescale_factor", 1 / 255)) * 255 - 1) > 1e-6:
        raise MmloomError(f"format {FORMAT!r}: llama.cpp scales pixels by 1/255; the image processor by "
                          f"{processor.rescale_factor}")
    if getattr(processor, "do_normalize", True):
        mean, std = [float(v) for v in processor.image_mean], [float(v) for v in processor.image_std]
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    kv = {
        "projector_type": "mlp",
        "image_size": size,
        "patch_size": patch,
        "embedding_length": int(config.hidden_size),
        "feed_forward_length": int(config.intermediate_size),
        "block_count": blocks,
        "projection_dim": llm_hidden,
        "head_count": int(config.num_attention_heads),
        "layer_norm_eps": float(config.layer_norm_eps),
        "image_mean": mean,
        "image_std": std,
        "ffn": ffn,
        "feature_layer": layers,
    }

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, num_layers)
    tensors = []
    for key, value in hf4_vision_state(tower).items():
        if key.startswith(("vision_model.post_layernorm.", "vision_model.head.")) or key.endswith("position_ids"):
            continue  # post_layernorm is never applied to the selected layer; SigLIP's pooling head is unused
        match = re.match(r"vision_model\.encoder\.layers\.(\d+)\.", key)
        if match and int(match.group(1)) >= blocks:
            continue  # deeper than the deepest selected layer
        name = names.get_name(f"vision_tower.{key}", try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MmloomError(f"format {FORMAT!r}: the vision tower weight {key!r} has no llama.cpp name")
        force = name.startswith(("v.position_embd", "v.class_embd"))
        tensors.append(Tensor(name, value, _qtype(outtype, tuple(value.shape), vision=True, force_f32=force)))
    mm_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ]
    for index in (0, 2):
        for suffix, value in parts.projection[index].state_dict().items():
            tensors.append(Tensor(f"{mm_name.format(bid=index)}.{suffix}", value.detach(),
                                  _qtype(outtype, tuple(value.shape), vision=True)))
    return kv, tensors


def preprocessing_notes(processor, pads: bool, size: int) -> list[str]:
    """How llama.cpp's image preprocessing differs from the model's `processor` (a transformers image
    processor; `pads`: it letterboxes to a square first)."""
    crop = getattr(processor, "crop_size", None) or {}
    crops = bool(getattr(processor, "do_center_crop", False)) and not pads
    resample = {2: "bilinear", 3: "bicubic"}.get(int(getattr(processor, "resample", 3)), "another filter")
    if pads:
        colour = tuple(int(m * 255) for m in processor.image_mean)
        how = f"pads non-square images to a square with {colour}, then resizes ({resample}, PIL)"
        if colour != LLAMACPP_PAD_COLOR:
            how += f"; llama.cpp pads with {LLAMACPP_PAD_COLOR}"
    elif crops:
        how = (f"resizes the shorter side to {size} ({resample}, PIL) and center-crops to {crop.get('height', size)}; "
               f"llama.cpp keeps the whole image, letterboxed with {LLAMACPP_PAD_COLOR}")
    else:
        how = f"resizes ({resample}, PIL)"
    return [f"image preprocessing: the model {how}; llama.cpp resizes to {size}x{size} with its own bicubic "
            f"filter. A square image of {size} px reaches the tower unchanged in both; other images give "
            "slightly different pixels (see docs/interop.md for the measured effect)"]


def plan_gguf(bundle: Bundle, outtype: str = DEFAULT_OUTTYPE, name: str = "model") -> GgufPlan:
    """Check that `bundle` maps onto llama.cpp's GGUF files and gather what they hold (see the module
    docstring). Raises MmloomError naming the first thing that does not map."""
    import gguf

    from mmloom.processing.templates import get_template, turn_layout

    if outtype not in OUTTYPES:
        raise MmloomError(f"--outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise MmloomError(f"the GGUF name {name!r} must be letters, digits, '.', '_' or '-' (it names the files)")
    model = bundle.model
    notes: list[str] = []
    merged = merge_adapters(model)
    if merged:
        notes.append(f"merged LoRA adapters of: {', '.join(merged)}")
    parts = vision_parts(model, FORMAT)
    processor = bundle.encoder_processors.get("vision") or default_image_processor(parts.tower.config)
    image_processor, pads = hf_image_processor(processor)
    arch, llm_kv, llm_tensors = _llm_plan(parts, outtype, notes)
    vision_kv, vision_tensors = _vision_plan(parts, image_processor, outtype, llm_kv["embedding_length"], notes)
    notes += preprocessing_notes(image_processor, pads, vision_kv["image_size"])

    tokenizer = bundle.tokenizer
    options = dict(bundle.template_options)
    if bundle.template == "tokenizer":
        options["tokenizer"] = tokenizer
    template = get_template(bundle.template, **options) if bundle.template else None
    vocab = gguf_vocab(bundle, llm_kv["vocab_size"], add_bos=bool(template is not None and template.add_bos))
    notes += vocab.notes
    if vocab.padded:
        notes.append(f"the {vocab.padded} embedding rows beyond the tokenizer's {len(vocab.tokens) - vocab.padded} "
                     "tokens are written as unused [PADn] tokens")
    layout, chat_template = None, None
    try:
        layout = turn_layout(template, tokenizer) if template is not None else None
    except MmloomError as err:
        notes.append(f"{err}: the GGUF carries no chat template and the Modelfile passes prompts as they are")
    if layout is not None:
        chat_template = (getattr(tokenizer, "chat_template", None) if bundle.template == "tokenizer"
                         else jinja_chat_template(layout))
    stop_ids = template.stop_token_ids(tokenizer) if template is not None else [tokenizer.eos_token_id]
    stops = [tokenizer.convert_ids_to_tokens(int(i)) for i in stop_ids if i is not None]
    eos = vocab.special.get("eos")
    eot = next((int(i) for i in stop_ids if i is not None and int(i) != eos), None)
    if eot is not None:
        vocab.special["eot"] = eot
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    if outtype == "q8_0":
        notes.append("the vision tower and projector are written in f16 (q8_0 applies to the language model)")
    return GgufPlan(name, arch, llm_kv, vision_kv, vocab, chat_template, layout, stops, llm_tensors,
                    vision_tensors, file_type, notes)


# ------------------------------------------------------------------------------------ writing
def _array(tensor: Tensor) -> np.ndarray:
    """The tensor's data in its GGML type (the gguf package's quantizers for BF16 / Q8_0)."""
    import gguf

    data = tensor.source.detach().to(torch.float32).cpu().numpy()
    if tensor.transform is not None:
        data = tensor.transform(data)
    T = gguf.GGMLQuantizationType
    if tensor.qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if tensor.qtype == T.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data), tensor.qtype)


def _nbytes(tensor: Tensor) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[tensor.qtype]
    return tensor.source.numel() // block * size


def _write_file(path: Path, arch: str, add_kv: Callable, tensors: list[Tensor]) -> None:
    """One GGUF file: metadata, tensor infos, then each tensor converted as it is written (one at a time
    in memory)."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    add_kv(writer)
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tuple(tensor.source.shape), np.dtype(np.float32), _nbytes(tensor),
                               raw_dtype=tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        writer.write_tensor_data(_array(tensor))
    writer.close()


def _llm_kv(plan: GgufPlan) -> Callable:
    import gguf

    def add(w) -> None:
        kv, vocab = plan.llm_kv, plan.vocab
        w.add_name(plan.name)
        w.add_file_type(plan.file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(kv["context_length"])
        w.add_embedding_length(kv["embedding_length"])
        w.add_block_count(kv["block_count"])
        w.add_feed_forward_length(kv["feed_forward_length"])
        w.add_head_count(kv["head_count"])
        w.add_head_count_kv(kv["head_count_kv"])
        w.add_rope_dimension_count(kv["rope_dimension_count"])
        w.add_layer_norm_rms_eps(kv["layer_norm_rms_eps"])
        w.add_rope_freq_base(kv["rope_freq_base"])
        w.add_vocab_size(kv["vocab_size"])
        if "key_length" in kv:
            w.add_key_length(kv["key_length"])
            w.add_value_length(kv["value_length"])
        if "rope_scaling" in kv:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(kv["rope_scaling"][1])
        w.add_tokenizer_model(vocab.model)
        if vocab.pre is not None:
            w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.types)
        if vocab.merges:
            w.add_token_merges(vocab.merges)
        for kind, value in vocab.special.items():
            getattr(w, f"add_{kind}_token_id")(value)
        w.add_add_bos_token(vocab.add_bos)
        w.add_add_eos_token(False)
        if vocab.add_space_prefix is not None:
            w.add_add_space_prefix(vocab.add_space_prefix)
        if plan.chat_template:
            w.add_chat_template(plan.chat_template)
    return add


def _vision_kv(plan: GgufPlan) -> Callable:
    import gguf

    def add(w) -> None:
        kv = plan.vision_kv
        w.add_name(f"{plan.name} vision tower + projector")
        w.add_file_type(plan.file_type if plan.file_type != gguf.LlamaFileType.MOSTLY_Q8_0
                        else gguf.LlamaFileType.MOSTLY_F16)
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(kv["projector_type"])
        w.add_vision_image_size(kv["image_size"])
        w.add_vision_patch_size(kv["patch_size"])
        w.add_vision_embedding_length(kv["embedding_length"])
        w.add_vision_feed_forward_length(kv["feed_forward_length"])
        w.add_vision_block_count(kv["block_count"])
        w.add_vision_projection_dim(kv["projection_dim"])
        w.add_vision_head_count(kv["head_count"])
        w.add_vision_attention_layernorm_eps(kv["layer_norm_eps"])
        w.add_vision_image_mean(kv["image_mean"])
        w.add_vision_image_std(kv["image_std"])
        if kv["ffn"] == "gelu":
            w.add_vision_use_gelu(True)
        elif kv["ffn"] == "silu":
            w.add_vision_use_silu(True)
        # clip.cpp reads it (KEY_FEATURE_LAYER); the gguf package has no writer method for it
        w.add_array("clip.vision.feature_layer", kv["feature_layer"])
    return add


def write_gguf(bundle: Bundle, dst: str | Path, outtype: str | None = None, name: str | None = None,
               **_: Any) -> None:
    """Write OUT/<name>.gguf, OUT/mmproj-<name>.gguf and OUT/Modelfile (see the module docstring),
    atomically; `name` defaults to the name of `dst`, `outtype` to f16. Raises MmloomError, before
    anything is written, when the model does not map onto llama.cpp (:func:`plan_gguf`)."""
    dst = Path(dst)
    plan = plan_gguf(bundle, outtype or DEFAULT_OUTTYPE, name or dst.name)
    # claimed by `convert`; written beside, marked as `mmloom convert` output and swapped in (a full disk:
    # one line naming DST and the bytes needed, at most the float32 size of the model)
    with new_folder(dst, "convert", needed=weight_bytes(bundle.model) + 2**20) as tmp:
        _write_file(tmp / f"{plan.name}.gguf", plan.arch, _llm_kv(plan), plan.llm_tensors)
        _write_file(tmp / f"mmproj-{plan.name}.gguf", "clip", _vision_kv(plan), plan.vision_tensors)
        write_text(tmp / "Modelfile", modelfile(plan.name, plan.layout, plan.stops))
    bundle.notes += plan.notes + [
        f"wrote {plan.name}.gguf ({plan.arch}, {outtype or DEFAULT_OUTTYPE}), mmproj-{plan.name}.gguf and Modelfile; "
        f"run: llama-mtmd-cli -m {dst / (plan.name + '.gguf')} --mmproj {dst / ('mmproj-' + plan.name + '.gguf')} "
        "--image IMAGE -p PROMPT"]

