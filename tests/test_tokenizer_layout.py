"""Real tokenizer families through data build, the processor and training: LLaVA's exact token
layout (tokenizer_image_token), slots located by position (pad = eos, pad = unk with a literal
<unk>), text-only samples, and the stock Vicuna / Llama-2 tokenizer folder."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from mmloom.cli.main import main
from mmloom.processing.templates import VICUNA_SYSTEM, get_template
from mmloom.processing.tokenizer import SentencePieceLlamaTokenizer, load_tokenizer
from tokenizer_families import (
    LLAMA2_TOKENIZER_MODEL,
    SentencePieceReference,
    llama3_style_folder,
    llama_sentencepiece_folder,
    llava_reference_ids,
    qwen2_style_folder,
    stock_vicuna_folder,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
NP = 16
CAPTIONS = ["an astronaut posing in a white space suit", "Two green triangles.", "<unk> is written here.",
            "A red circle  on the left.", "The quick brown fox.", "Yes. No.", "A blue square.", "One yellow star."]
FAMILIES = {  # name: (folder builder, phase-2 template)
    "llama_sentencepiece": (llama_sentencepiece_folder, "vicuna_v1"),
    "llama3_no_pad_no_unk": (llama3_style_folder, "llama3"),
    "qwen2_pad_is_eos": (qwen2_style_folder, "chatml"),
}

# strings where transformers' fast conversion of tokenizer.model differs from SentencePiece
PROBES = ["hello world", "  two leading spaces", "a  b   c    d", "trailing  ", "\n\nnew lines\n", " x",
          "\tTab\tsep", "émoji 😀 ünïcödé 中文", "1234567 3.14159", "don't  stop\n\n\nnow", "   ",
          "a\u00a0b", "x\r\ny", "mixed \n  indent\n    code()", "ﬁ ①", "▁literal", "USER: <b>hi</b>"]


def _image(path: Path, seed: int) -> None:
    from skimage import data

    arr = data.astronaut()[seed * 20 : seed * 20 + 200, :200]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).resize((32, 32)).save(path)


def phase1_records():
    return [{"id": str(i), "image": f"img{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": c}]}
        for i, c in enumerate(CAPTIONS)]


def phase2_records():
    out = []
    for i, c in enumerate(CAPTIONS):
        if i % 4 == 1:  # text-only (ShareGPT-like) samples
            out.append({"id": str(i), "conversations": [
                {"from": "human", "value": "Tell me what shapes are."}, {"from": "gpt", "value": c}]})
        else:
            out.append({"id": str(i), "image": f"img{i}.png", "conversations": [
                {"from": "human", "value": "What is shown in this picture?\n<image>"}, {"from": "gpt", "value": c},
                {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Nothing </s> else."}]})
    return out


def build(root: Path, name: str, tokenizer: Path, records, style: str, msl: int, num_patches: int = NP,
          **dataset) -> dict:
    src = root / f"{name}_jsonl"
    src.mkdir(parents=True, exist_ok=True)
    (src / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = {"setup": {"input_dir": str(src), "output_dir": str(root / f"{name}_h5"), "samples_per_file": 5},
           "processor": {"tokenizer_type": str(tokenizer), "max_sequence_length": msl},
           "dataset": {"num_patches": num_patches, "image_dir": str(root / "images"), "system_prompt_style": style,
                       **dataset}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(root / f"{name}.yaml"), "--quiet", "--overwrite"]) == 0
    return json.loads((root / f"{name}_h5" / "data_params.json").read_text())


def read_h5(folder: Path):
    rows, paths, starts = [], [], []
    for f in sorted(folder.glob("data-*.h5")):
        with h5py.File(f, "r") as h:
            rows.append(h["data"][:])
            paths += [p[0] for p in h["img_path"][:]]
            starts += h["image_start_idx"][:].tolist()
    return np.concatenate(rows), paths, starts


def collapse(ids: list[int], start: int, image_id: int, count: int = NP) -> list[int]:
    """The row's ids with its slot run collapsed to one image id (LLaVA's IMAGE_TOKEN_INDEX)."""
    return ids[:start] + [image_id] + ids[start + count:]


def rendered(style: str, record: dict, tokenizer) -> str:
    """The conversation text LLaVA tokenizes (with <image> moved to the front of its turn)."""
    from mmloom.processing.templates import messages_from_llava

    options = {"terminator": "eos", "eos": tokenizer.eos_token} if style == "plain" else {}
    return get_template(style, **options).render(messages_from_llava(record["conversations"]))


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for i in range(len(CAPTIONS)):
        _image(root / "images" / f"img{i}.png", i)
    out = {}
    for name, (make, style) in FAMILIES.items():
        folder = make(root / name)
        out[name] = {
            "root": root, "tok": folder, "style": style,
            "p1": build(root, f"{name}_p1", folder, phase1_records(), "plain", 64),
            "p2": build(root, f"{name}_p2", folder, phase2_records(), style, 256),
        }
    return out


# ---------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("name", list(FAMILIES))
def test_rows_are_llava_layout_with_exact_masks(families, name):
    fam = families[name]
    for phase, records, style in (("p1", phase1_records(), "plain"), ("p2", phase2_records(), fam["style"])):
        params = fam[phase]
        pp = params["post-process"]
        assert pp["successful_files"] == len(records), pp["skipped"]
        image_id = pp["image_token_id"]
        rows, paths, starts = read_h5(fam["root"] / f"{name}_{phase}_h5")
        tok = load_tokenizer(fam["tok"])
        tok.add_tokens(["<image>"], special_tokens=True)
        template = get_template(style, **({"eos": tok.eos_token} if style == "plain" else {}))
        if isinstance(tok, SentencePieceLlamaTokenizer):  # the reference: sentencepiece itself, not transformers
            reference = SentencePieceReference(fam["tok"] / "tokenizer.model")

            def encode(piece, reference=reference, bos=template.add_bos):
                return reference(piece, bos=bos)
        else:
            def encode(piece, tok=tok, bos=template.add_bos):
                return tok(piece, add_special_tokens=bos)["input_ids"]
        for r, path, start, record in zip(rows, paths, starts, records, strict=True):
            ids, loss, labels, inv = (x.tolist() for x in r)
            n = max(i for i, k in enumerate(inv) if k == 0) + 1
            expected = llava_reference_ids(encode, rendered(style, record, tok), image_id, tok.bos_token_id)
            assert start == params["image_patch_info"]["image_patch_start_idx"]
            if "image" in record:
                assert path == record["image"].encode() and inv[start : start + NP] == [0] * NP
                assert collapse(ids[:n], start, image_id) == expected
            else:  # text-only: attended tokens = the conversation tokenized without an image
                assert path == b"None"
                assert [t for t, k in zip(ids, inv, strict=False) if k == 0] == expected
                assert inv[start : start + NP] == [1] * NP  # masked slots at the dataset's start index
            # the loss mask decodes exactly to the answers and their end tokens
            supervised = [labels[t] for t in range(len(loss)) if loss[t]]
            answers = [m["value"] for m in record["conversations"] if m["from"] == "gpt"]
            want = "".join(template.answer_prefix + a + template.end for a in answers)
            if isinstance(tok, SentencePieceLlamaTokenizer):
                if style == "plain" and not want.startswith(tuple(tok.all_special_tokens)):
                    want = " " + want  # the caption starts the piece after <image>: SentencePiece's prefix
                assert "".join(tok.convert_ids_to_tokens(supervised)).replace("▁", " ") == want
            else:
                assert tok.decode(supervised) == want


def test_processor_prompts_match_training_rows(families):
    """The processor's training ids and generation prompt equal the HDF5 rows (same layout)."""
    from mmloom.processing.processor import MultimodalProcessor

    fam = families["llama_sentencepiece"]
    tok = load_tokenizer(fam["tok"])
    tok.add_tokens(["<image>"], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    processor = MultimodalProcessor({"vision": lambda im: np.zeros((3, 32, 32), np.float32)}, tok, "vicuna_v1",
                                    num_tokens={"vision": NP})
    rows, _, starts = read_h5(fam["root"] / "llama_sentencepiece_p2_h5")
    record = phase2_records()[0]
    batch = processor(conversations=[record], images=[Image.new("RGB", (32, 32))])
    ids = batch["input_ids"][0].tolist()
    n = len(ids)
    row = rows[0, 0, :n].tolist()
    assert [t if not (starts[0] <= i < starts[0] + NP) else image_id for i, t in enumerate(row)] == ids
    prompt = processor(conversations=[record["conversations"][:1]], images=[Image.new("RGB", (32, 32))],
                       add_generation_prompt=True)["input_ids"][0].tolist()
    assert ids[: len(prompt)] == prompt  # the generation prompt is a prefix of the training ids
    raw = processor(text=[f"{VICUNA_SYSTEM} USER: <image>\nWhat is shown in this picture? ASSISTANT:"],
                    images=[Image.new("RGB", (32, 32))])["input_ids"][0].tolist()
    assert raw == prompt  # LLaVA's tokenizer_image_token on the raw prompt gives the same ids


# ---------------------------------------------------------------------------------- training
def train(fam: dict, phase: int, model_dir: Path, *sets: str) -> int:
    name = Path(fam["tok"]).name
    params = fam[f"p{phase}"]
    tok = load_tokenizer(fam["tok"])
    vocab = max(len(tok), params["post-process"]["image_token_id"]) + 1
    args = ["train", str(TINY / f"phase{phase}.yaml"), "--model-dir", str(model_dir)]
    data = fam["root"] / f"{name}_p{phase}_h5"
    sets = [f"train_input.data_dir={data}", f"train_input.img_data_dir={fam['root'] / 'images'}",
            f"eval_input.data_dir={data}", f"eval_input.img_data_dir={fam['root'] / 'images'}",
            f"model.image_start_idx={params['image_patch_info']['image_patch_start_idx']}",
            f"model.text_model.vocab_size={vocab}", f"model.image_token_id={params['post-process']['image_token_id']}",
            f"model.text_model.bos_token_id={tok.bos_token_id or 0}", f"model.text_model.eos_token_id={tok.eos_token_id}",
            f"model.text_model.pad_token_id={params['post-process']['pad_id']}",
            f"model.text_model.max_position_embeddings={256 + 16}",
            "runconfig.max_steps=2", "runconfig.checkpoint_steps=100", "runconfig.checkpoint_path=null",
            "train_input.batch_size=4", "train_input.micro_batch_size=2", *sets]
    for s in sets:
        args += ["--set", s]
    return main(args)


def _losses(model_dir: Path) -> list[float]:
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_two_steps_train_in_every_mode(families, name, tmp_path):
    fam = families[name]
    for phase in (1, 2):
        plain = tmp_path / f"p{phase}"
        assert train(fam, phase, plain) == 0
        packed = tmp_path / f"p{phase}_packed"
        assert train(fam, phase, packed, "train_input.packing=true") == 0
        np.testing.assert_allclose(_losses(packed), _losses(plain), rtol=1e-4)  # packing changes no loss
        assert len(_losses(plain)) >= 1 and all(np.isfinite(_losses(plain)))
    # cached features (phase 1: the frozen encoder's features stand in for the images)
    data = fam["root"] / f"{Path(fam['tok']).name}_p1_h5"
    cache = ["data", "cache-features", str(TINY / "phase1.yaml"), "--quiet",
             "--set", f"train_input.data_dir={data}", "--set", f"train_input.img_data_dir={fam['root'] / 'images'}",
             "--set", f"eval_input.data_dir={data}", "--set", f"eval_input.img_data_dir={fam['root'] / 'images'}",
             "--set", "runconfig.checkpoint_path=null"]
    assert main(cache) == 0
    cached = tmp_path / "p1_cached"
    assert train(fam, 1, cached, "train_input.use_cached_features=true") == 0
    np.testing.assert_allclose(_losses(cached), _losses(tmp_path / "p1"), rtol=1e-3)


# ---------------------------------------------------------------------------------- SentencePiece
def test_sentencepiece_tokenizer_reproduces_sentencepiece(tmp_path):
    """mmloom's loader tokenizes stock Llama folders with sentencepiece itself: equal ids on a probe
    set where transformers' converted fast tokenizer differs (whitespace runs, leading spaces)."""
    folders = [llama_sentencepiece_folder(tmp_path / "trained")]
    if LLAMA2_TOKENIZER_MODEL.is_file():
        folders.append(stock_vicuna_folder(tmp_path / "vicuna-7b-v1.5"))
    for folder in folders:
        tok = load_tokenizer(folder)
        assert isinstance(tok, SentencePieceLlamaTokenizer) and tok.pad_token is None and not tok.legacy
        reference = SentencePieceReference(folder / "tokenizer.model")
        for text in PROBES:
            assert tok(text)["input_ids"] == reference(text), text
            assert tok(text + "</s>USER: x")["input_ids"] == reference(text + "</s>USER: x"), text
        # saved and reloaded: still a stock Llama folder that transformers loads too
        tok.add_tokens(["<image>"], special_tokens=True)
        tok.save_pretrained(tmp_path / "saved")
        config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is False
        assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
        again = load_tokenizer(tmp_path / "saved")
        assert again("USER: <image>\nhi")["input_ids"] == tok("USER: <image>\nhi")["input_ids"]
        assert again.decode(again("Hello\nworld  x")["input_ids"], skip_special_tokens=True) == "Hello\nworld  x"


def test_load_tokenizer_errors(tmp_path):
    from mmloom.errors import MmloomError

    with pytest.raises(MmloomError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "preprocessor_config.json").write_text("{}")
    with pytest.raises(MmloomError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "clip", what="processor.tokenizer_type")


# ---------------------------------------------------------------------------------- the real file
@pytest.mark.skipif(not LLAMA2_TOKENIZER_MODEL.is_file(), reason="needs ../shared/assets (CI has it)")
def test_real_llama2_tokenizer_layout(tmp_path):
    """The stock vicuna-7b-v1.5 tokenizer folder, the seed's MSL 2048 and 576 patches: LLaVA's ids,
    image_patch_start_idx 1 (plain) and 35 (vicuna_v1), the `▁` (29871) after the image span."""
    folder = stock_vicuna_folder(tmp_path / "vicuna-7b-v1.5")
    for i in range(3):
        _image(tmp_path / "images" / f"img{i}.png", i)
    records1 = phase1_records()[:3]
    records2 = phase2_records()[:3]
    p1 = build(tmp_path, "real_p1", folder, records1, "plain", 2048, num_patches=576, plain_terminator="newline")
    p2 = build(tmp_path, "real_p2", folder, records2, "vicuna_v1", 2048, num_patches=576)
    assert p1["image_patch_info"]["image_patch_start_idx"] == 1
    assert p2["image_patch_info"]["image_patch_start_idx"] == 35
    assert p2["post-process"]["pad_id"] == 0 and p2["post-process"]["image_token_id"] == 32000  # pad = unk, as LLaVA
    reference = SentencePieceReference(folder / "tokenizer.model")
    rows, paths, starts = read_h5(tmp_path / "real_p1_h5")
    ids = rows[0, 0].tolist()
    assert ids[:1] == [1] and ids[577] == 385  # '▁an': the caption starts a piece of its own
    prompt = "<image>" + CAPTIONS[0] + "\n"
    n = 577 + len(reference(CAPTIONS[0] + "\n", bos=False))
    assert collapse(ids[:n], 1, -200, 576) == llava_reference_ids(reference, prompt, -200, 1)
    rows, paths, starts = read_h5(tmp_path / "real_p2_h5")
    ids = rows[0, 0].tolist()
    assert ids[33:35] == [29901, 29871] and ids[35 + 576 : 35 + 576 + 3] == [29871, 13, 5618]  # ': ▁ [img] ▁ \n What'
    text_only = rows[1]
    attended = text_only[0][text_only[3] == 0].tolist()
    alone = reference(f"{VICUNA_SYSTEM} USER: Tell me what shapes are. ASSISTANT: {CAPTIONS[1]}</s>")
    assert attended == alone and starts[1] == 35 and paths[1] == b"None"
    assert " ".join(tokenize_words(text_only[0][35 + 576 : 35 + 576 + 2], folder)) == "▁Tell ▁me"


def tokenize_words(ids, folder):
    return load_tokenizer(folder).convert_ids_to_tokens([int(i) for i in ids])
