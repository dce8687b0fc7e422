"""Several images per sample (interleaved data) through `mmloom data build` and the HDF5 layout:
records with a list of images, one `<image>` each in any human turn; files of single-image samples
byte-identical to the Cerebras layout; files with a several-image sample carry mmloom's image items."""

from __future__ import annotations

import hashlib
import json

import h5py
import pytest
from PIL import Image

from test_data_layout_cases import rec
from test_tokenizer_layout import build

NP, IMG, PAD = 16, 4, 3


ONE = rec("a.png", ("human", "<image>\nWhat is it?"), ("gpt", "A circle."))
LATER = rec("b.png", ("human", "Hello."), ("gpt", "Hi."), ("human", "What is this?\n<image>"), ("gpt", "A square."))
TEXT = rec(None, ("human", "Tell me a story."), ("gpt", "Once."))
TWO_TURNS = rec(["a.png", "b.png"], ("human", "<image>\nWhat is the first?"), ("gpt", "Red."),
                ("human", "<image>\nAnd this one?"), ("gpt", "Blue."))
THREE = rec(["a.png", "b.png", "c.png"], ("human", "Compare <image> and <image> please."), ("gpt", "Both."),
            ("human", "Hi."), ("gpt", "Hello."), ("human", "<image>\nAnd this?"), ("gpt", "Green."))

# SHA-256 of data-00000.h5 / data-00001.h5 of the single-image build below, as the code of integ 08848e9 (before
# several images per sample existed) wrote them: such files must stay byte for byte what they were. HDF5 files
# differ between HDF5 libraries, so the bytes are recorded per writing stack (h5py, its HDF5, tokenizers): the
# tested set (constraints.txt) and the lowest one (constraints-lowest.txt), each written by 08848e9's code.
SINGLE_IMAGE_SHA256 = {
    ("3.16.0", "2.0.0", "0.23.3"): {
        "data-00000.h5": "998029ee14666e6b63154346fdc341c80cd5ec5eef96e810616baf9fb4abcfa7",
        "data-00001.h5": "97ba732f103da6c32c73b16bef1a99ffbc4a1983e8ad17a3020843c762d69ead",
    },
    ("3.11.0", "1.14.2", "0.23.1"): {
        "data-00000.h5": "de0876187fed3a98e567bc49a23116b045cb0484574d753949efc0546402ee58",
        "data-00001.h5": "18ca28634d8a1c8c18e915269a97f204b80bebe5882602a99c0c8ebc8a229c63",
    },
}


def recorded_sha256() -> dict[str, str]:
    """The recorded single-image files of this machine's writing stack (skips on a stack never recorded)."""
    import tokenizers

    stack = (h5py.__version__, h5py.version.hdf5_version, tokenizers.__version__)
    if stack not in SINGLE_IMAGE_SHA256:
        pytest.skip(f"no single-image build recorded for h5py / HDF5 / tokenizers {stack}")
    return SINGLE_IMAGE_SHA256[stack]


@pytest.fixture()
def root(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "images").mkdir()
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200)), ("c", (30, 200, 30))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "images" / f"{name}.png")
    return tmp_path


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_single_image_files_byte_identical(root):
    build(root, "single", root / "tok", [ONE, TEXT, LATER, ONE, TEXT, ONE, LATER], "vicuna_v1", 200)
    got = {p.name: sha256(p) for p in sorted((root / "single_h5").glob("data-*.h5"))}
    assert got == recorded_sha256()


def item_datasets(folder):
    out = {}
    for f in sorted(folder.glob("data-*.h5")):
        with h5py.File(f, "r") as h:
            out[f.name] = {name: h[name][:] for name in ("image_path", "image_span", "image_offset") if name in h}
            out[f.name]["img_path"] = [p[0] for p in h["img_path"][:]]
            out[f.name]["image_start_idx"] = h["image_start_idx"][:].tolist()
            out[f.name]["data"] = h["data"][:]
    return out


def test_several_images_kept_with_their_items(root, tokenizer):
    # samples_per_file 5: file 0 holds the several-image samples, file 1 single-image and text-only ones
    records = [ONE, TWO_TURNS, TEXT, THREE, LATER, ONE, TEXT, LATER]
    params = build(root, "multi", root / "tok", records, "vicuna_v1", 400)
    info = params["image_patch_info"]
    assert params["post-process"]["skipped"] == {}
    assert info["samples"]["several_images"] == 2 and info["images"] == 1 + 2 + 3 + 1 + 1 + 1
    assert "multiple_images" not in params["dataset"]  # the default is not recorded
    files = item_datasets(root / "multi_h5")
    first, second = files["data-00000.h5"], files["data-00001.h5"]
    assert "image_offset" not in second  # no several-image sample in file 1: the Cerebras layout alone
    assert first["image_offset"].tolist() == [0, 1, 3, 3, 6, 7]
    assert first["image_path"].tolist() == [b"a.png", b"a.png", b"b.png", b"a.png", b"b.png", b"c.png", b"b.png"]
    assert first["img_path"] == [b"a.png", b"a.png", b"None", b"a.png", b"b.png"]  # the first image, as before
    spans = first["image_span"]
    assert (spans[:, 1] == NP).all()
    for k, (lo, hi) in enumerate(zip(first["image_offset"][:-1], first["image_offset"][1:], strict=True)):
        if hi > lo:
            assert spans[lo, 0] == first["image_start_idx"][k]
        rows = first["data"][k]
        for start, n in spans[lo:hi]:  # every run: pad ids, attended, not supervised
            assert (rows[0, start:start + n] == PAD).all() and (rows[3, start:start + n] == 0).all()
            assert not rows[1, start - 1:start + n - 1].any()
    # THREE: "Compare <image> and <image> please." keeps both in place; turn 3's lone one stays at its front
    rows = first["data"][3][0].tolist()
    (a, _), (b, _), (c, _) = spans[3:6].tolist()
    assert tokenizer.decode(rows[a + NP:b]) == " and "
    assert tokenizer.decode(rows[c + NP:c + NP + 12]).startswith("\nAnd this?")


def test_several_images_bad_input_is_a_counted_skip(root, capsys):
    missing = rec(["a.png", "nope.png"], ("human", "<image>\n<image>\nTwo?"), ("gpt", "Yes."))
    mismatch = rec(["a.png", "b.png"], ("human", "<image>\nOne placeholder for two."), ("gpt", "No."))
    (root / "images" / "bad.png").write_bytes(b"not a png")
    corrupt = rec(["a.png", "bad.png"], ("human", "<image>\n<image>\nTwo?"), ("gpt", "Yes."))
    long = rec(["a.png", "b.png", "c.png"], ("human", "<image>\n<image>\n<image>\nThree?"), ("gpt", "Yes."))
    params = build(root, "bad", root / "tok", [ONE, missing, mismatch, corrupt, long], "vicuna_v1", 120)
    assert params["post-process"]["skipped"] == {"missing_image": 1, "bad_image": 1, "image_token_mismatch": 1,
                                                 "too_long": 1}
    assert params["post-process"]["n_examples"] == 1
    # --strict stops at the first one, naming file and line
    from mmloom.cli.main import main

    cfg = root / "bad.yaml"
    assert main(["data", "build", str(cfg), "--quiet", "--overwrite", "--strict"]) != 0
    err = capsys.readouterr().err
    assert "part0.jsonl:2: missing_image" in err and "nope.png" in err


def test_multiple_images_skip_is_todays_layout(root):
    build(root, "skip", root / "tok", [ONE, TEXT, TWO_TURNS, LATER, ONE, TEXT, ONE, LATER, THREE], "vicuna_v1", 200,
          multiple_images="skip")
    params = json.loads((root / "skip_h5" / "data_params.json").read_text())
    assert params["post-process"]["skipped"] == {"multiple_images": 2}
    assert params["dataset"]["multiple_images"] == "skip" and "several_images" not in params["image_patch_info"]["samples"]
    got = {p.name: sha256(p) for p in sorted((root / "skip_h5").glob("data-*.h5"))}
    assert got == recorded_sha256()  # the same kept samples as the single-image build: the same bytes


def test_inspect_shows_every_image_run(root, capsys):
    from mmloom.cli.main import main

    build(root, "show", root / "tok", [THREE, ONE, TEXT], "vicuna_v1", 400)
    assert main(["data", "inspect", str(root / "show_h5" / "data-00000.h5"), "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "images: a.png, b.png, c.png" in out and out.count("<image x16 @") == 3
    assert "> and <image" in out  # "Compare <image> and <image>": the text between runs
    assert main(["data", "inspect", str(root / "show_h5" / "data-00000.h5"), "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert "image: a.png" in out and out.count("<image x16 @") == 1
