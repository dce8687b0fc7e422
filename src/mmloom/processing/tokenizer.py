"""Loading tokenizer folders, the way LLaVA tokenizes.

`load_tokenizer` is the one place every mmloom command loads a tokenizer folder from (data build,
init, convert, train, chat, generate, saved processors). It never runs remote code.

Llama-family SentencePiece folders (`tokenizer.model` with `tokenizer_class` `LlamaTokenizer`, as
the stock `lmsys/vicuna-7b-v1.5` folder ships: no `tokenizer.json`) load as
`SentencePieceLlamaTokenizer`, which tokenizes with the `sentencepiece` library itself, exactly as
the original LLaVA code does (it loads `LlamaTokenizer(use_fast=False)` of transformers 4.x). The
fast tokenizer that transformers 5 converts from `tokenizer.model` differs from SentencePiece on
whitespace runs and text that starts with a space (e.g. `"a  b"`: SentencePiece `▁a ▁ ▁b`, the
converted one `▁a ▁▁ b`), so a model trained on its ids would not see what LLaVA's training and
evaluation code feeds it. Other folders load with `AutoTokenizer` (fast tokenizers).

Semantics reproduced from transformers 4.x's SentencePiece `LlamaTokenizer` (the class LLaVA-1.5
trains with):

- `add_bos_token` / `add_eos_token` decide the special tokens `tokenizer(text)` adds;
- `legacy: false` (the stock Vicuna v1.5 setting): a text gets one dummy-prefix `▁` at its start
  only; the text after a special token (`</s>USER`) gets none. `legacy: true`: every piece of text
  between special tokens is encoded by SentencePiece with its dummy prefix;
- decoding joins pieces with SentencePiece (byte-fallback pieces such as `<0x0A>` become bytes).

Saved folders keep `tokenizer_class: LlamaTokenizer`, `tokenizer.model` and
`special_tokens_map.json`, so transformers 4.x/5.x and the original LLaVA code load them.
"""

from __future__ import annotations

from pathlib import Path

from mmloom.errors import MmloomError
from mmloom.files import read_json, write_json
from mmloom.remote_code import refuse_remote_code

SPIECE_UNDERLINE = "▁"
SENTENCEPIECE_MODEL = "tokenizer.model"
# tokenizer classes whose tokenizer.model is a Llama-style SentencePiece BPE model
LLAMA_SENTENCEPIECE_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return read_json(path) if path.is_file() else {}


def uses_sentencepiece(folder: str | Path) -> bool:
    """True when `folder` is a Llama-family SentencePiece tokenizer folder (see the module docstring)."""
    folder = Path(folder)
    if not (folder / SENTENCEPIECE_MODEL).is_file():
        return False
    config = _tokenizer_config(folder)
    return config.get("tokenizer_class") in LLAMA_SENTENCEPIECE_CLASSES


# transformers' model families whose folders hold a text generator's tokenizer (an LLM or a multimodal LLM)
_TEXT_GENERATOR_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
)


def _not_a_language_model(folder: Path) -> str | None:
    """The `model_type` of `folder`'s config.json when transformers knows it as a model that does not
    generate text (a CLIP / SigLIP / ViT vision encoder, a BERT encoder, ...), else None (an LLM's
    folder, a tokenizer-only folder, mmloom's own folders, unknown types)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        model_type = read_json(path).get("model_type")
    except (MmloomError, OSError, AttributeError):
        return None
    if not isinstance(model_type, str):
        return None
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        return None
    if any(model_type in getattr(modeling_auto, name, {}) for name in _TEXT_GENERATOR_MAPPINGS):
        return None
    return model_type


def load_tokenizer(path: str | Path, *, what: str = "tokenizer"):
    """The tokenizer saved in folder `path` (see the module docstring for which class).

    `what` names the setting or argument the path came from, for error messages
    (e.g. `"processor.tokenizer_type"`). Raises `MmloomError` (one line, naming the folder) when the
    folder does not exist or holds no loadable tokenizer: a vision-model folder (its config.json
    names a model that generates no text, e.g. `clip`, even when the folder ships CLIP's own text
    tokenizer), a missing `tokenizer.model` dependency, a corrupt file, or a vocabulary of fewer
    than 3 tokens.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MmloomError(f"{what}: tokenizer folder not found: {folder}")
    names = {p.name for p in folder.iterdir()}
    if not names & {"tokenizer.json", SENTENCEPIECE_MODEL, "tokenizer_config.json", "vocab.json", "vocab.txt"}:
        raise MmloomError(
            f"{what}: {folder} holds no tokenizer (no tokenizer.json, tokenizer.model or tokenizer_config.json)"
        )
    refuse_remote_code(folder, what)
    model_type = _not_a_language_model(folder)
    if model_type is not None:
        raise MmloomError(
            f"{what}: {folder} is a {model_type!r} model folder, not a language model's tokenizer folder "
            "(give the LLM's folder, e.g. pretrained/vicuna-7b-v1.5)"
        )
    try:
        if uses_sentencepiece(folder):
            tokenizer = SentencePieceLlamaTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        else:
            tokenizer = _auto_tokenizer(folder)
    except MmloomError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a user-input problem
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MmloomError(f"{what}: cannot load a tokenizer from {folder}: {first}") from None
    if len(tokenizer) < 3:
        raise MmloomError(
            f"{what}: {folder} gives a tokenizer of {len(tokenizer)} tokens: not a language model's tokenizer folder"
        )
    return tokenizer


def _auto_tokenizer(folder: Path):
    """`AutoTokenizer.from_pretrained(folder)` without the noise of the folder's *model* config:
    transformers reads config.json to find the tokenizer class and warns about model settings
    (e.g. a transformers-4 `rope_scaling`, an unknown `llava_llama` type) that do not concern the
    tokenizer. The warnings raised while reading that config and transformers' log lines below
    ERROR during the load are dropped; errors still raise."""
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"transformers\.configuration_utils")
            warnings.filterwarnings("ignore", module=r"transformers\.models\.auto\.configuration_auto")
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(verbosity)


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` when it is a single token of `tokenizer` (in its vocabulary or added
    tokens, not mapped to unk, and tokenized to exactly that id), else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return int(tid) if list(ids) == [tid] else None


def _sentencepiece_backend():
    try:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    except ImportError as exc:  # pragma: no cover - depends on the installed transformers
        raise MmloomError(
            f"this transformers release has no SentencePieceBackend ({exc}); install the versions in constraints.txt"
        ) from None
    return SentencePieceBackend


class SentencePieceLlamaTokenizer(_sentencepiece_backend()):
    """Llama / Vicuna / Mistral-v0.1 tokenizer backed by the `sentencepiece` library.

    Built on transformers' `SentencePieceBackend`; behaves as transformers 4.x's slow
    `LlamaTokenizer` (see the module docstring). Use `load_tokenizer(folder)` rather than this class.
    """

    vocab_files_names = {"vocab_file": SENTENCEPIECE_MODEL}
    model_input_names = ["input_ids", "attention_mask"]
    saved_class_name = "LlamaTokenizer"  # what tokenizer_config.json says, for transformers and LLaVA

    def __init__(
        self,
        vocab_file: str,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool | None = None,
        add_prefix_space: bool | None = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        kwargs.pop("tokenizer_class", None)
        kwargs.pop("special_tokens_pattern", None)
        # transformers 5 saves `add_prefix_space: null` for "unset": the SentencePiece default, a prefix
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.add_prefix_space = add_prefix_space
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            legacy=True if legacy is None else bool(legacy),  # transformers 4.x: unset means legacy
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            add_prefix_space=add_prefix_space,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            special_tokens_pattern="none",
            **kwargs,
        )

    # -- encoding ---------------------------------------------------------------------------
    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Pieces of `text`; added/special tokens stay whole. See the module docstring for `legacy`."""
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        text = text.replace(SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = SPIECE_UNDERLINE + text
        tokens = super().tokenize(text, **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._special_pieces():
            tokens = tokens[1:]  # the dummy prefix alone before a special token is dropped
        return tokens

    def _special_pieces(self) -> set[str]:
        """Special tokens, including added tokens flagged `special` (a folder saved by transformers 5's
        fast tokenizer lists a placeholder such as `<image>` only there, not among the special tokens)."""
        flagged = {str(t) for t in self.added_tokens_decoder.values() if getattr(t, "special", False)}
        return set(self.all_special_tokens) | flagged

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """BOS (`add_bos_token`) + ids + EOS (`add_eos_token`), per sequence."""
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        """1 where `build_inputs_with_special_tokens` adds a special token, else 0."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [1] if self.add_eos_token and self.eos_token_id is not None else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    # -- decoding ---------------------------------------------------------------------------
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces -> text with SentencePiece's decoder; special tokens are copied as they are."""
        tokens = list(tokens)
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]  # the dummy prefix of the text's start
        specials = set(self.all_special_tokens)
        out, run, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in specials:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(run) + token
                run, prev_special = [], True
            else:
                if prev_special and i == 1 and self.add_prefix_space and not token.startswith(SPIECE_UNDERLINE):
                    out += " "
                run.append(token)
                prev_special = False
        return out + self.sp_model.decode(run)

    # -- saving -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a stock Llama tokenizer folder: `tokenizer.model`, `tokenizer_config.json` (class
        `LlamaTokenizer`, `add_bos_token`, `add_eos_token`, `legacy`) and `special_tokens_map.json`."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path)
        config.update(
            tokenizer_class=self.saved_class_name,
            add_bos_token=self.add_bos_token,
            add_eos_token=self.add_eos_token,
            add_prefix_space=self.add_prefix_space,
            legacy=self.legacy,
        )
        for key in ("special_tokens_pattern", "backend", "is_local", "local_files_only"):
            config.pop(key, None)
        write_json(config_path, config, sort_keys=True)
        special = {key: str(value) for key, value in self.special_tokens_map.items() if isinstance(value, str)}
        write_json(folder / "special_tokens_map.json", special, sort_keys=True)
        return files


__all__ = ["SentencePieceLlamaTokenizer", "load_tokenizer", "token_id", "uses_sentencepiece"]
