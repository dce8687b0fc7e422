"""`mmloom data build` / `mmloom data inspect` through the real CLI, on tiny images and a tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from mmloom.cli.main import main
from mmloom.data.build_config import load_build_config, parse_build_config
from mmloom.errors import MmloomError
from mmloom.processing.templates import VICUNA_SYSTEM

MSL = 64  # phase 1
MSL2 = 160  # phase 2 (the vicuna system prompt is ~70 tokens with the tiny tokenizer)
NP = 16
PAD, BOS, EOS, IMG = 3, 0, 1, 4


def _image(path: Path, seed: int = 0) -> None:
    from skimage import data

    arr = data.astronaut()[seed * 16 : seed * 16 + 256, :256]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).resize((32, 32)).save(path)


def rec(image, *turns):
    r = {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("build")
    tokenizer.save_pretrained(root / "tok")
    for i in range(4):
        _image(root / "images" / f"img{i}.png", i)
    return root


def write_cfg(ws: Path, name: str, records_or_lines, style: str, msl: int = MSL2, **extra) -> Path:
    src = ws / f"{name}_in"
    src.mkdir(exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records_or_lines]
    (src / "part0.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = {
        "setup": {
            "input_dir": str(src),
            "output_dir": str(ws / f"{name}_out"),
            "processes": 1,
            "samples_per_file": 3,
        },
        "processor": {"tokenizer_type": str(ws / "tok"), "max_sequence_length": msl},
        "dataset": {"num_patches": NP, "image_dir": str(ws / "images"), "system_prompt_style": style},
    }
    for key, value in extra.items():
        section, k = key.split("__")
        cfg[section][k] = value
    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def read_out(out: Path, msl: int = MSL2):
    rows, paths = [], []
    for f in sorted(out.glob("data-*.h5")):
        with h5py.File(f, "r") as h:
            assert h["data"].dtype == np.int32 and h["data"].shape[1:] == (4, msl)
            assert h.attrs["n_examples"] == h["data"].shape[0] == h["img_path"].shape[0]
            assert h["data"].compression == "gzip"
            rows.append(h["data"][:])
            paths += [p[0].decode() for p in h["img_path"][:]]
            assert h["image_start_idx"].shape == (h["data"].shape[0],)
    params = json.loads((out / "data_params.json").read_text())
    return np.concatenate(rows), paths, params


def check_common(r: np.ndarray, msl: int = MSL2):
    ids, loss, labels, inv = r
    n = int((inv == 0).nonzero()[0].max()) + 1
    assert len(ids) == msl
    assert (labels[: n - 1] == ids[1:n]).all() and (labels[n - 1 :] == PAD).all()  # labels = shift
    assert (ids[n:] == PAD).all() and (inv[n:] == 1).all() and (loss[n - 1 :] == 0).all()
    return n


CAPTIONS = ["A red circle on the left.", "Two green triangles.", "The quick brown fox.", "Yes. No."]


def test_build_phase1_plain_layout(ws, tokenizer, capsys):
    records = [
        rec(f"img{i}.png", ("human", "Describe the picture.\n<image>"), ("gpt", c))
        for i, c in enumerate(CAPTIONS)
    ]
    cfg = write_cfg(ws, "p1", records, "plain", msl=MSL)
    assert main(["data", "build", str(cfg)]) == 0
    assert "kept" in capsys.readouterr().out
    rows, paths, params = read_out(ws / "p1_out", MSL)
    assert len(rows) == 4 and paths == [f"img{i}.png" for i in range(4)]
    assert len(list((ws / "p1_out").glob("data-*.h5"))) == 2  # samples_per_file = 3
    for r, caption in zip(rows, CAPTIONS, strict=True):
        ids, loss, labels, inv = r
        n = check_common(r, MSL)
        cap = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert ids[:n].tolist() == [BOS] + [PAD] * NP + cap + [EOS]
        assert (inv[:n] == 0).all()  # slots attended
        # loss: the last slot (predicts the first caption token) + every caption token (-> next / EOS)
        expected = np.zeros(MSL, dtype=np.int32)
        expected[NP : NP + 1 + len(cap)] = 1
        assert loss.tolist() == expected.tolist()
        assert labels[NP] == cap[0]
    pp = params["post-process"]
    assert params["image_patch_info"] == {
        "image_patch_start_idx": 1, "num_patches": NP,
        "samples": {"image_in_first_turn": 4, "image_in_later_turn": 0, "text_only": 0},
    }
    assert pp["processed_files"] == pp["successful_files"] == pp["n_examples"] == 4 and pp["skipped"] == {}
    assert pp["discarded_files"] == 0
    assert (pp["eos_id"], pp["pad_id"], pp["vocab_size"]) == (EOS, PAD, len(tokenizer))
    assert (
        params["processor"]["max_sequence_length"] == MSL
        and params["dataset"]["system_prompt_style"] == "plain"
    )
    st = params["h5_dataset_stats"]
    assert st["num_sequences"] == 4 and st["num_tokens"] == 4 * MSL
    # Cerebras' collect_stats: non-pad = row-0 ids that are neither EOS nor pad (image slots hold pad)
    assert st["loss_valid_tokens"] == int(rows[:, 1].sum()) and st["non_pad_tokens"] == int(
        ((rows[:, 0] != EOS) & (rows[:, 0] != PAD)).sum()
    )
    assert st["detokenized_chars"] == sum(len(tokenizer.decode(r[0].tolist())) for r in rows)
    assert params["setup"]["processes"] == 1 and params["setup"]["output_dir"] == str((ws / "p1_out").resolve())
    assert pp["raw_chars_count"] == sum(len(c) + len("Describe the picture.\n<image>") for c in CAPTIONS)
    assert st["detokenized_chars"] > 0


def test_build_phase2_vicuna_layout_and_text_only(ws, tokenizer):
    records = [
        rec(
            "img0.png",
            ("human", "What is in the image?\n<image>"),
            ("gpt", "A red circle."),
            ("human", "Where?"),
            ("gpt", "Left."),
        ),
        rec(None, ("human", "Is there a circle?"), ("gpt", "Yes.")),
        rec("img1.png", ("human", "<image>\nHow many shapes?"), ("gpt", "Two.")),
    ]
    cfg = write_cfg(ws, "p2", records, "vicuna_v1", msl=MSL)
    assert main(["data", "build", str(cfg), "--quiet", "--set", f"processor.max_sequence_length={MSL2}"]) == 0
    rows, paths, params = read_out(ws / "p2_out")
    assert paths == ["img0.png", "None", "img1.png"]  # Cerebras writes b"None" for text-only samples
    prefix = [BOS] + tokenizer(VICUNA_SYSTEM + " USER: ", add_special_tokens=False)["input_ids"]
    start = len(prefix)
    assert params["image_patch_info"]["image_patch_start_idx"] == start
    assert params["image_patch_info"]["samples"] == {"image_in_first_turn": 2, "image_in_later_turn": 0, "text_only": 1}
    for k, r in enumerate(rows):
        ids, loss, labels, inv = r
        n = check_common(r)
        assert ids[:start].tolist() == prefix and (ids[start : start + NP] == PAD).all()
        assert (loss[: start + NP] == 0).all()  # nothing before the user text is supervised
        assert (inv[start : start + NP] == (1 if k == 1 else 0)).all()  # text-only: slots masked
        text = tokenizer.decode(ids[start + NP : n])
        sup = tokenizer.decode(labels[loss == 1])
        if k == 0:
            assert (
                text
                == "\nWhat is in the image? ASSISTANT: A red circle.</s>USER: Where? ASSISTANT: Left.</s>"
            )
            assert sup == " A red circle.</s> Left.</s>"
        elif k == 1:  # text-only: the attended text is the conversation tokenized without an image
            assert text.lstrip() == "Is there a circle? ASSISTANT: Yes.</s>"
            attended = ids[inv == 0].tolist()
            alone = [BOS] + tokenizer(VICUNA_SYSTEM + " USER: Is there a circle? ASSISTANT: Yes.</s>",
                                      add_special_tokens=False)["input_ids"]
            assert attended == alone
            assert sup == " Yes.</s>"
    assert params["post-process"]["successful_files"] == 3


def test_processes_2_byte_identical(ws):
    records = []
    for i in range(150):  # several work chunks and several files
        img = f"img{i % 4}.png" if i % 5 else None
        q = "<image>\nWhat is it?" if img else "What colour?"
        records.append(rec(img, ("human", q), ("gpt", CAPTIONS[i % 4] + " " + str(i))))
    records.insert(7, rec("img0.png", ("human", "no placeholder"), ("gpt", "x")))
    cfg1 = write_cfg(ws, "par1", records, "vicuna_v1", setup__samples_per_file=40)
    assert main(["data", "build", str(cfg1), "--quiet"]) == 0
    two = ["--set", "setup.processes=2", "--set", f"setup.output_dir={ws / 'par2_out'}"]
    assert main(["data", "build", str(cfg1), "--quiet", *two]) == 0
    out1, out2 = ws / "par1_out", ws / "par2_out"
    names = sorted(p.name for p in out1.iterdir())
    assert names == sorted(p.name for p in out2.iterdir())
    assert names == ["data-00000.h5", "data-00001.h5", "data-00002.h5", "data-00003.h5", "data_params.json"]
    for name in names[:-1]:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    params = json.loads((out1 / "data_params.json").read_text())
    params2 = json.loads((out2 / "data_params.json").read_text())
    assert params2["setup"].pop("processes") == 2 and params["setup"].pop("processes") == 1
    params2["setup"].pop("output_dir"), params["setup"].pop("output_dir")
    params2["post-process"].pop("output_files"), params["post-process"].pop("output_files")
    assert params == params2
    assert params["post-process"]["skipped"] == {"image_token_mismatch": 1}
    # rebuilding into a non-empty folder needs --overwrite
    assert main(["data", "build", str(cfg1), "--quiet"]) == 2
    assert main(["data", "build", str(cfg1), "--quiet", "--overwrite"]) == 0


GOOD = [
    rec("img0.png", ("human", "<image>\nWhat is it?"), ("gpt", "A red circle.")),
    rec(None, ("human", "Is there a circle?"), ("gpt", "Yes.")),
    rec("img2.png", ("human", "Where is the square?\n<image>"), ("gpt", "Left of the circle.")),
]


def _bad_lines(ws: Path):
    trunc = ws / "images" / "trunc.png"
    full = (ws / "images" / "img3.png").read_bytes()
    trunc.write_bytes(full[: len(full) // 2])
    (ws / "images" / "junk.png").write_bytes(b"not an image at all")
    long_answer = " ".join(["shapes"] * 80)
    return [
        json.dumps(GOOD[0]),
        '{"image": "img0.png", "conversations": [',  # bad_json (line 2)
        json.dumps(rec("nope.png", ("human", "<image>\nq"), ("gpt", "a"))),  # missing_image
        json.dumps(rec("trunc.png", ("human", "<image>\nq"), ("gpt", "a"))),  # bad_image
        json.dumps(rec("junk.png", ("human", "<image>\nq"), ("gpt", "a"))),  # bad_image
        json.dumps(GOOD[1]),
        json.dumps(rec(None, ("gpt", "only an answer"))),  # no_human_turn
        json.dumps(rec(None, ("human", "q"), ("human", "q again"))),  # roles_not_alternating
        json.dumps(rec(None, ("human", "q"), ("gpt", "   "))),  # empty_answer
        json.dumps(rec("img0.png", ("human", "<image> and <image>"), ("gpt", "a"))),  # image_token_mismatch
        json.dumps(rec(None, ("human", "<image>\nq"), ("gpt", "a"))),  # image_token_mismatch
        json.dumps(rec("img0.png", ("human", "q"), ("gpt", "<image> a"))),  # image_token_mismatch
        json.dumps(rec("img1.png", ("human", "<image>\nq"), ("gpt", long_answer))),  # too_long
        "",
        json.dumps(GOOD[2]),
    ]


def test_bad_records_skipped_and_counted(ws, tokenizer):
    cfg = write_cfg(ws, "bad", _bad_lines(ws), "vicuna_v1")
    assert main(["data", "build", str(cfg), "--quiet"]) == 0
    rows, paths, params = read_out(ws / "bad_out")
    pp = params["post-process"]
    assert pp["skipped"] == {
        "bad_json": 1,
        "missing_image": 1,
        "bad_image": 2,
        "no_human_turn": 1,
        "roles_not_alternating": 1,
        "empty_answer": 1,
        "image_token_mismatch": 3,
        "too_long": 1,
    }
    assert pp["processed_files"] == 14 and pp["successful_files"] == 3 and pp["discarded_files"] == 11
    assert pp["processed_files"] == pp["successful_files"] + sum(pp["skipped"].values())
    decoded = [tokenizer.decode(r[0][r[3] == 0]) for r in rows]
    for record, text in zip(GOOD, decoded, strict=True):
        answer = record["conversations"][1]["value"]
        assert text.endswith(f"ASSISTANT: {answer}</s>")
    assert paths == ["img0.png", "None", "img2.png"]


def test_strict_stops_with_file_line_reason(ws, capsys):
    cfg = write_cfg(ws, "strict", _bad_lines(ws), "vicuna_v1")
    assert main(["data", "build", str(cfg), "--strict", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "part0.jsonl:2: bad_json" in err and len(err.strip().splitlines()) == 1


def test_config_errors(ws, capsys):
    cfg = write_cfg(ws, "cfgerr", [json.dumps(GOOD[1])], "vicuna_v1")
    with pytest.raises(
        MmloomError, match=r"unknown key 'dataset.num_patchs'; did you mean 'dataset.num_patches'"
    ):
        load_build_config(cfg, ["dataset.num_patchs=4"])
    with pytest.raises(MmloomError, match=r"'processor.max_sequence_length'"):
        load_build_config(cfg, ["processor.max_sequence_length=lots"])
    with pytest.raises(MmloomError, match="missing required key 'setup.output_dir'"):
        parse_build_config(
            {
                "setup": {"input_dir": "x"},
                "processor": {"tokenizer_type": "t", "max_sequence_length": 8},
                "dataset": {"num_patches": 1},
            }
        )
    assert main(["data", "build", str(cfg), "--set", "dataset.system_prompt_style=nope"]) == 2
    assert "unknown conversation template 'nope'" in capsys.readouterr().err
    assert main(["data", "build", str(cfg), "--set", "processor.tokenizer_type=/no/such/tok"]) == 2
    assert "/no/such/tok" in capsys.readouterr().err


def test_inspect_marks_supervised_spans_and_slots(ws, capsys):
    out = ws / "p1_out"
    if not out.exists():
        pytest.skip("needs the phase-1 build")
    assert main(["data", "inspect", str(out / "data-00000.h5"), "--index", "1"]) == 0
    text = capsys.readouterr().out
    assert f"<image x{NP} @ 1..{NP}>" in text
    assert "[[Two green triangles.</s>]]" in text
    assert "img1.png" in text and "supervised: " in text
    assert main(["data", "inspect", str(out / "data-00000.h5"), "--index", "9"]) == 2


def test_tokenizer_without_image_token(ws, tmp_path):
    from mmloom.testing import SAMPLE_TEXTS
    from mmloom.tokenization import train_bpe_tokenizer

    tok = train_bpe_tokenizer(SAMPLE_TEXTS * 4, vocab_size=300, extra_special_tokens=())
    tok.save_pretrained(tmp_path / "tok")
    records = [rec("img0.png", ("human", "<image>\nWhat is it?"), ("gpt", "A red circle."))]
    cfg = write_cfg(ws, "noimgtok", records, "plain", msl=MSL)
    assert (
        main(["data", "build", str(cfg), "--quiet", "--set", f"processor.tokenizer_type={tmp_path / 'tok'}"])
        == 0
    )
    rows, _, params = read_out(ws / "noimgtok_out", MSL)
    assert params["post-process"]["vocab_size"] == 300 and (rows[:, 0] < 300).all()
    assert rows[0, 0, 1 : 1 + NP].tolist() == [PAD] * NP


def test_the_tokenizer_is_loaded_once_and_chunk_counts_add_up(ws, monkeypatch):
    """The build loads the tokenizer once (forked workers share it), and its totals are the sum of
    the chunks' counts (`BuildCounts +=`): the first skip of the earliest chunk is kept."""
    import mmloom.data.build as build_module
    from mmloom.data.build import BuildCounts

    loads = []
    real = build_module.load_tokenizer
    monkeypatch.setattr(build_module, "load_tokenizer", lambda *a, **k: loads.append(a) or real(*a, **k))
    records = [GOOD[i % 3] for i in range(150)]  # three chunks of CHUNK_LINES
    cfg = write_cfg(ws, "once", records, "vicuna_v1", setup__processes=2)
    assert main(["data", "build", str(cfg), "--quiet"]) == 0
    assert len(loads) == 1
    params = json.loads((ws / "once_out" / "data_params.json").read_text())
    assert params["post-process"]["n_examples"] == 150 and params["image_patch_info"]["samples"]["text_only"] == 50

    a, b = BuildCounts(n_read=2), BuildCounts(n_read=3)
    a.skip(0, 2, "bad_json", "x")
    b.skip(0, 70, "too_long", "y")
    b.skip(1, 1, "bad_json", "z")
    b.kept_per_file[0] += 1
    b.stats["vision.items"] += 4
    a += b
    assert (a.n_read, a.kept, a.first_skip) == (5, 1, (0, 2, "bad_json", "x"))
    assert a.skipped == {"bad_json": 2, "too_long": 1} and a.stats["vision.items"] == 4
